"""Load a text-to-image pipeline for generation: a base model, optionally with a trained LoRA, or a fully
fine-tuned pipeline folder.

A training output folder holds either ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format, loaded with
``pipe.load_lora_weights``) or a complete diffusers pipeline (``model_index.json``); :func:`find_run_weights` says
which, and fails with a clear message when it holds neither (for example a run that never finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from persam_dreambooth.config import flag_name
from persam_dreambooth.generation.config import GenerationConfig

__all__ = [
    "LORA_WEIGHT_NAME",
    "RunWeights",
    "find_run_weights",
    "weights_fingerprint",
    "read_run_config",
    "read_base_model",
    "resolve_dtype",
    "model_geometry",
    "check_image_size",
    "load_pipeline",
    "offline_hint",
    "LORA_SCALE_KEYWORDS",
    "lora_scale_kwargs",
    "family_call_kwargs",
]

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_CONFIG_NAME = "config.resolved.yaml"
DTYPES = ("float32", "float16", "bfloat16")


def _flag(name: str) -> str:
    """The flag of a :class:`GenerationConfig` field (``compare`` spells the shared ones the same), for errors."""
    return flag_name(GenerationConfig, name, dashes=True)


@dataclass(frozen=True)
class RunWeights:
    """What a training output folder holds: ``kind`` ``"lora"`` (LoRA file in ``path``) or ``"full"`` (a pipeline)."""

    kind: Literal["lora", "full"]
    path: Path


def find_run_weights(folder: str | os.PathLike[str], arg_name: str | None = None) -> RunWeights:
    """Find the trained weights in a training output folder.

    Args:
        folder: the trainer's ``output_dir``.
        arg_name: the argument the folder came from, for error messages (default: ``generate``'s ``--lora``).

    Raises:
        FileNotFoundError: the folder does not exist, or holds neither a LoRA file nor a pipeline.
    """
    arg_name = arg_name or _flag("lora")
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"`{arg_name}` folder {str(path)!r} does not exist (or is not a folder).")
    if (path / LORA_WEIGHT_NAME).is_file():
        return RunWeights("lora", path)
    if (path / "model_index.json").is_file():
        return RunWeights("full", path)
    raise FileNotFoundError(
        f"`{arg_name}` folder {str(path)!r} holds no trained weights: expected {LORA_WEIGHT_NAME} (LoRA) or "
        "model_index.json (full fine-tune). Did the training finish?"
    )


def _safetensors_tensor_digest(path: Path) -> str:
    """SHA-256 over a ``.safetensors`` file's tensors (name, dtype, shape, bytes; sorted by name), ignoring the
    ``__metadata__`` block, whose key order diffusers' writer does not keep stable between two saves of the same
    weights."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))  # header length, little-endian u64
        header = json.loads(handle.read(size))
        data = handle.read()
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        start, end = entry["data_offsets"]
        digest.update(f"{name}:{entry['dtype']}:{entry['shape']}\n".encode())
        digest.update(data[start:end])
    return digest.hexdigest()


def weights_fingerprint(weights: RunWeights) -> str:
    """A short id of the trained weights, recorded with every generated image so a rerun notices retrained weights.

    LoRA: the SHA-256 of the weight file's tensors (a few MB; metadata left out). Full pipeline: the names, sizes
    and modification times of its weight files (hashing gigabytes on every rerun would be slow), so copying the
    folder without keeping the times counts as a change too.
    """
    if weights.kind == "lora":
        return "sha256:" + _safetensors_tensor_digest(weights.path / LORA_WEIGHT_NAME)[:16]
    # Only the pipeline's components (model_index.json keys such as unet/, text_encoder/), not checkpoint-N/ folders
    # that a training run may prune later.
    index = json.loads((weights.path / "model_index.json").read_text(encoding="utf-8"))
    components = sorted(k for k in index if not k.startswith("_") and (weights.path / k).is_dir())
    digest = hashlib.sha256()
    for path in sorted(p for c in components for p in (weights.path / c).rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth"):
            stat = path.stat()
            digest.update(f"{path.relative_to(weights.path).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return "files:" + digest.hexdigest()[:16]


def read_run_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The trainer's ``config.resolved.yaml`` in ``folder`` as a dict, or ``None`` when there is none."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a mapping of config keys, got {type(data).__name__}.")
    return data


def read_base_model(folder: str | os.PathLike[str]) -> str | None:
    """The ``pretrained_model_name_or_path`` a run was trained from (from its resolved config), if recorded."""
    cfg = read_run_config(folder)
    if cfg is None:
        return None
    value = cfg.get("pretrained_model_name_or_path")
    return str(value) if value else None


def resolve_dtype(dtype: str) -> Any:
    """``"float32" | "float16" | "bfloat16"`` -> the ``torch.dtype``."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"`{_flag('dtype')}` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    return getattr(torch, dtype)


def offline_hint(model_id: str, flag: str, local: str = "a local folder") -> str:
    """How to get ``model_id`` onto a machine without Hub access (appended to loading errors).

    Args:
        model_id: the Hub id (or path) that failed to load.
        flag: the CLI flag it came from.
        local: what the local folder must hold, e.g. "a local folder holding the model and its processor files".
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return (
        ("HF_HUB_OFFLINE is set, so only already-downloaded models can be used. " if offline else "")
        + f"Download it first on a machine with internet (`hf download {model_id}`, or `huggingface-cli download "
        f"{model_id}` with older huggingface_hub) into the Hugging Face cache, or pass {local}: "
        f"`{flag} /path/to/model`."
    )


def model_geometry(pretrained_model_name_or_path: str) -> tuple[int, int]:
    """``(size_factor, default_size)`` of a text-to-image pipeline, read from its configs only.

    For a model family the trainer knows (``persam_dreambooth.training.families``, detected from
    ``model_index.json``), ``size_factor`` is the family's latent x patch factor (the VAE scale factor for SD and
    SDXL, twice it for FLUX's 2x2 packing) and the default side is the denoiser's ``sample_size`` x the VAE scale
    factor (128 x 8 when the config has no ``sample_size``, diffusers' default for its transformer pipelines). Other
    Stable Diffusion style pipelines: ``vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)`` and
    ``unet.sample_size``. Nothing is loaded but small JSON files.
    """
    from persam_dreambooth.training.families import ModelFiles, UnsupportedModelError, family_for_class_name

    name, flag = str(pretrained_model_name_or_path), _flag("pretrained_model_name_or_path")
    files = ModelFiles(name, arg_name=flag)
    try:
        index = files.model_index()
        family = family_for_class_name(str(index.get("_class_name", "")), arg_name=flag, value=name)
        info = family.inspect(files, index)
        denoiser_cfg = files.read_json("config.json", family.denoiser_name)
    except UnsupportedModelError:
        return _unet_geometry(name)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"Could not read the model configs of `{flag}` {name!r}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}. "
            + offline_hint(name, flag)
        ) from exc
    sample = denoiser_cfg.get("sample_size") or 128
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return info.resolution_multiple, int(sample) * info.vae_scale_factor


def _unet_geometry(pretrained_model_name_or_path: str) -> tuple[int, int]:
    """``(vae_scale_factor, unet.sample_size * vae_scale_factor)`` of a pipeline no training family covers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        vae_cfg = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae")
        unet_cfg = UNet2DConditionModel.load_config(pretrained_model_name_or_path, subfolder="unet")
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"Could not read the model configs of `{_flag('pretrained_model_name_or_path')}` "
            f"{pretrained_model_name_or_path!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}. "
            + offline_hint(pretrained_model_name_or_path, _flag("pretrained_model_name_or_path"))
        ) from exc
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    sample = unet_cfg["sample_size"]
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return scale, int(sample) * scale


#: The ``pipeline.__call__`` keywords that carry the LoRA scale: SD / SDXL, SD3 / FLUX.1 / Z-Image, FLUX.2 /
#: Qwen-Image (``{"scale": s}`` in each).
LORA_SCALE_KEYWORDS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def lora_scale_kwargs(pipe: Any, scale: float) -> dict[str, Any]:
    """``{keyword: {"scale": scale}}`` for the LoRA-scale keyword that ``pipe.__call__`` takes (derived from its
    signature, so any diffusers pipeline with one works).

    Raises:
        ValueError: the pipeline takes none of :data:`LORA_SCALE_KEYWORDS` (naming ``--lora-scale``).
    """
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    for keyword in LORA_SCALE_KEYWORDS:
        if keyword in parameters:
            return {keyword: {"scale": scale}}
    raise ValueError(f"`{_flag('lora_scale')}`: {type(pipe).__name__}.__call__ takes none of "
                     f"{', '.join(LORA_SCALE_KEYWORDS)}, so the LoRA scale cannot be set.")


def family_call_kwargs(model: str, run_folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Extra ``pipeline.__call__`` arguments of the model family of ``model`` (a base model or a fine-tuned
    pipeline folder): the text settings the run in ``run_folder`` trained with (``max_sequence_length``, FLUX.2's
    ``text_encoder_out_layers``, from its ``config.resolved.yaml``), else the family's defaults; ``{}`` for SD /
    SDXL and for pipelines no training family covers. Reads small JSON / YAML files only.
    """
    from persam_dreambooth.training.families import ModelFiles, UnsupportedModelError, family_for_class_name

    try:
        index = ModelFiles(str(model)).model_index()
        family = family_for_class_name(str(index.get("_class_name", "")))
    except (OSError, UnsupportedModelError):
        return {}
    return family.generation_kwargs(read_run_config(run_folder) if run_folder is not None else None)


def check_image_size(height: int, width: int, vae_scale_factor: int) -> None:
    """Raise ``ValueError`` unless ``height`` and ``width`` are positive multiples of the size factor and of 8.

    ``vae_scale_factor``: the first value of :func:`model_geometry` (the VAE scale factor, times the patch size for
    families that pack latents). The latents are ``(H / vae_scale_factor, W / vae_scale_factor)``, and diffusers'
    Stable Diffusion pipelines also reject sizes that are not multiples of 8 (for SD both numbers are 8).
    """
    step = math.lcm(8, vae_scale_factor)
    for name, value in ((_flag("height"), height), (_flag("width"), width)):
        if value <= 0 or value % step:
            raise ValueError(
                f"`{name}` must be a positive multiple of {step} (VAE scale factor {vae_scale_factor}; the pipeline "
                f"needs multiples of 8), got {value}."
            )


def load_pipeline(
    pretrained_model_name_or_path: str | None = None,
    *,
    lora: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Any:
    """Load a diffusers text-to-image pipeline ready for generation.

    Args:
        pretrained_model_name_or_path: the base model (Hub id or local folder). Required unless ``model`` is given.
        lora: a folder holding ``pytorch_lora_weights.safetensors`` to load on top of the base model.
        model: a fully fine-tuned pipeline folder (``model_index.json``), used instead of the base model.
        device: ``cuda``, ``cpu``, ... (default: the best available).
        dtype: ``float32``, ``float16`` or ``bfloat16``.

    Returns:
        The pipeline, on ``device``, with its own progress bar turned off.
    """
    from diffusers import DiffusionPipeline

    from persam_dreambooth.utils.devices import resolve_device

    if lora is not None and model is not None:
        raise ValueError(f"Pass either `{_flag('lora')}` or `{_flag('model')}`, not both.")
    torch_dtype = resolve_dtype(dtype)
    device = str(resolve_device(device, _flag("device"), prefer_mps=True))
    if model is not None:
        source, flag = str(find_run_weights(model, _flag("model")).path), _flag("model")
    elif pretrained_model_name_or_path:
        source, flag = str(pretrained_model_name_or_path), _flag("pretrained_model_name_or_path")
    else:
        raise ValueError(f"`{_flag('pretrained_model_name_or_path')}` is required (or `{_flag('model')}` for a "
                         "fine-tuned pipeline).")
    started = time.monotonic()
    logger.info("Loading the pipeline %s (%s) ...", source, dtype)  # tens of seconds for a full-size model
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"Could not load the pipeline `{flag} {source}`: {str(exc).splitlines()[0] if str(exc) else exc!r}. "
            + offline_hint(source, flag)
        ) from exc
    if lora is not None:
        weights = find_run_weights(lora, _flag("lora"))
        if weights.kind != "lora":
            raise ValueError(
                f"`{_flag('lora')}` folder {str(weights.path)!r} holds a full pipeline (model_index.json), not LoRA "
                f"weights; pass it as `{_flag('model')}` instead."
            )
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"The pipeline {type(pipe).__name__} of {source!r} cannot load LoRA weights.")
        pipe.load_lora_weights(str(weights.path), weight_name=LORA_WEIGHT_NAME)
        logger.info("Loaded LoRA weights from %s", weights.path)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("Pipeline ready on %s in %.0f s", device, time.monotonic() - started)
    return pipe
