"""The base model: inspect its configs before training (cheap) and load its components (generic, from the folder).

Nothing is hard-coded for Stable Diffusion 1.x: the component classes come from ``model_index.json``, the VAE scale
factor from the VAE's ``block_out_channels``, the token length from the tokenizer, the latent channels from the
UNet. Stable Diffusion 1.x and 2.x (epsilon and v-prediction) work; two-text-encoder models (SDXL) are recognised
and refused with a clear message until they are supported.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["BaseModelInfo", "Components", "inspect_base_model", "check_lora_targets", "load_components"]

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class BaseModelInfo:
    """What training needs to know about the base model before loading it.

    Attributes:
        name_or_path: as given.
        components: ``{name: (library, class name)}`` from ``model_index.json``.
        vae_scale_factor: image pixels per latent pixel (``2 ** (len(vae.block_out_channels) - 1)``; 8 for SD).
        unet_downsample_factor: latent pixels per UNet bottleneck pixel (``2 ** number of down-samplers``).
        latent_channels: the UNet's input channels.
        prediction_type: the scheduler's ``prediction_type`` (epsilon or v_prediction).
        pipeline_class: ``_class_name`` of ``model_index.json``.
    """

    name_or_path: str
    components: dict[str, tuple[str, str]]
    vae_scale_factor: int
    unet_downsample_factor: int
    latent_channels: int
    prediction_type: str
    pipeline_class: str


def _looks_local(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``C:\\x``) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or ":" in name


def _read_json(config: TrainConfig, filename: str, subfolder: str | None = None) -> dict[str, Any]:
    """Read ``[subfolder/]filename`` of the base model (local folder or the Hub)."""
    name = config.pretrained_model_name_or_path
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / subfolder / filename if subfolder else local / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"`pretrained_model_name_or_path` {name!r} is not a diffusers pipeline folder: "
                f"{str(path)!r} is missing."
            )
        return json.loads(path.read_text(encoding="utf-8"))
    if local.exists():
        raise NotADirectoryError(f"`pretrained_model_name_or_path` {name!r} is a file; give a diffusers folder.")
    if _looks_local(name):
        raise FileNotFoundError(f"`pretrained_model_name_or_path` folder {name!r} does not exist.")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, filename, subfolder=subfolder, revision=config.revision)
    except Exception as exc:  # offline, unknown repo, gated repo...: one message naming the argument
        raise FileNotFoundError(
            f"`pretrained_model_name_or_path` {name!r} is neither a local folder nor a reachable Hub model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        ) from exc
    return json.loads(Path(path).read_text(encoding="utf-8"))


def inspect_base_model(config: TrainConfig) -> BaseModelInfo:
    """Read ``model_index.json`` and the VAE / UNet / scheduler configs (no weights) and check ``resolution``.

    Raises:
        FileNotFoundError: the base model folder or Hub id does not exist.
        ValueError: a required component is missing, the model has two text encoders, or the VAE cannot take
            ``resolution``.
    """
    index = _read_json(config, "model_index.json")
    components = {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0]}
    name = config.pretrained_model_name_or_path
    if "text_encoder_2" in components:
        raise ValueError(
            f"`pretrained_model_name_or_path` {name!r} is a two-text-encoder model ({index.get('_class_name')}, "
            "e.g. SDXL); this trainer supports Stable Diffusion 1.x / 2.x for now."
        )
    missing = [c for c in _REQUIRED if c not in components]
    if missing:
        raise ValueError(f"`pretrained_model_name_or_path` {name!r} has no {', '.join(missing)} component.")
    vae_cfg = _read_json(config, "config.json", "vae")
    unet_cfg = _read_json(config, "config.json", "unet")
    sched_cfg = _read_json(config, "scheduler_config.json", "scheduler")
    vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    down_blocks = len(unet_cfg.get("down_block_types", ()))
    info = BaseModelInfo(
        name_or_path=name,
        components=components,  # type: ignore[arg-type]
        vae_scale_factor=vae_scale_factor,
        unet_downsample_factor=2 ** max(down_blocks - 1, 0),
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        prediction_type=str(sched_cfg.get("prediction_type", "epsilon")),
        pipeline_class=str(index.get("_class_name", "")),
    )
    check_resolution(config.resolution, info)
    if info.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"the base model's scheduler has prediction_type {info.prediction_type!r}; training supports "
            "'epsilon' and 'v_prediction'."
        )
    return info


def check_resolution(resolution: int, info: BaseModelInfo) -> None:
    """The VAE encodes ``resolution`` exactly only when it is a multiple of its scale factor.

    The UNet accepts any latent size (diffusers forwards the up-sampling sizes when the latent side is not a
    multiple of its down-sampling factor), so the VAE is the hard constraint; a latent side that is not a multiple
    of the UNet's factor costs an interpolation per up-block, so it gets a warning.
    """
    factor = info.vae_scale_factor
    if resolution % factor or resolution < factor:
        lower, upper = max(factor, resolution - resolution % factor), resolution - resolution % factor + factor
        raise ValueError(
            f"`resolution` must be a multiple of the VAE's scale factor {factor} for {info.name_or_path!r}, got "
            f"{resolution} (try {lower} or {upper})."
        )
    latent = resolution // factor
    if latent % info.unet_downsample_factor:
        logger.warning(
            "`resolution` %d gives %d-pixel latents, not a multiple of the UNet's down-sampling factor %d; the "
            "UNet interpolates its skip connections (works, but %d would be cleaner).",
            resolution, latent, info.unet_downsample_factor, factor * info.unet_downsample_factor,
        )


def check_lora_targets(config: TrainConfig, info: BaseModelInfo) -> None:
    """Check ``lora_target_modules`` (and the text encoder's) against the model, before any weight is loaded.

    The UNet and text encoder are built from their configs without weights (``init_empty_weights``), so a typo
    fails here and not after the masks and the class images are made.

    Raises:
        ValueError: a target name matches no module.
    """
    if config.train_mode != "lora":
        return
    from accelerate import init_empty_weights

    from persam_dreambooth.training.lora import check_targets

    unet_cls = _component_class(info, "unet")
    with init_empty_weights():
        unet = unet_cls.from_config(_read_json(config, "config.json", "unet"))
    check_targets(unet, config.lora_target_modules, "lora_target_modules")
    if config.train_text_encoder:
        te_cls = _component_class(info, "text_encoder")
        te_config = te_cls.config_class.from_dict(_read_json(config, "config.json", "text_encoder"))
        with init_empty_weights():
            text_encoder = te_cls(te_config)
        check_targets(text_encoder, config.text_encoder_lora_target_modules, "text_encoder_lora_target_modules")


@dataclass
class Components:
    """The loaded base model (weights on the CPU, frozen; the trainer moves them and adds adapters)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    info: BaseModelInfo

    @property
    def token_length(self) -> int:
        """Token sequence length: the tokenizer's ``model_max_length`` when sane, else the encoder's positions."""
        length = getattr(self.tokenizer, "model_max_length", None)
        positions = getattr(self.text_encoder.config, "max_position_embeddings", None)
        if length is None or length > 100_000:  # transformers' "unset" sentinel is ~1e30
            length = positions
        if length is None:
            raise ValueError("cannot tell the text encoder's token length; set `tokenizer_max_length`.")
        return int(length)


def _component_class(info: BaseModelInfo, name: str) -> Any:
    library, class_name = info.components[name]
    module = importlib.import_module(library)
    return getattr(module, class_name)


def load_components(config: TrainConfig, info: BaseModelInfo, weight_dtype: torch.dtype = torch.float32) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler (same betas) from the base model.

    Frozen modules load directly in ``weight_dtype``; trained ones (the UNet in full fine-tuning, the text encoder
    when ``train_text_encoder`` without LoRA) in float32. Everything is frozen; the trainer unfreezes what it trains.
    """
    from diffusers import DDPMScheduler

    name = config.pretrained_model_name_or_path
    common: dict[str, Any] = {"revision": config.revision}
    lora = config.train_mode == "lora"
    unet_dtype = weight_dtype if lora else torch.float32
    te_dtype = weight_dtype if lora or not config.train_text_encoder else torch.float32
    tokenizer = _component_class(info, "tokenizer").from_pretrained(name, subfolder="tokenizer", **common)
    weights = {**common, "variant": config.variant}
    text_encoder = _component_class(info, "text_encoder").from_pretrained(
        name, subfolder="text_encoder", dtype=te_dtype, **weights)
    vae = _component_class(info, "vae").from_pretrained(name, subfolder="vae", dtype=weight_dtype, **weights)
    unet = _component_class(info, "unet").from_pretrained(name, subfolder="unet", dtype=unet_dtype, **weights)
    # Training adds noise with the DDPM forward process of the model's own schedule (betas, prediction type).
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=noise_scheduler, info=info)
