"""The model-family interface: everything the trainer does differently for SD 1.x/2.x, SDXL, SD3, FLUX...

One :class:`ModelFamily` subclass per family, one file each (``families/<family>.py``), registered by the
``_class_name`` of ``model_index.json`` in :mod:`persam_dreambooth.training.families`. The trainer (preflight,
components, step, validation, export) calls only these methods; nothing outside ``families/`` branches on the family.
How to add one: ``docs/design/model_families.md``.

Conventions (shapes in every docstring below):

* ``N`` samples per step: ``B`` instance samples, followed by ``B`` class samples with prior preservation.
* The *loss grid* ``(h, w)`` is where the masked loss is taken and where the dataset area-averages the masks:
  ``(H // loss_grid_factor, W // loss_grid_factor)`` for an ``H x W`` image. It is the VAE latent grid for a UNet
  (SD, SDXL) and for a transformer whose prediction is unpacked back to latents before the loss (FLUX.1, SD3); a
  family that takes the loss on patchified latents (FLUX.2) has a larger factor. :meth:`ModelFamily.predict`
  always returns ``(N, C, h, w)`` on that grid, so the mask ``(N, 1, h, w)`` lines up position by position.
* Text conditioning is a ``dict[str, Tensor]`` whose tensors all have a leading batch dimension of 1
  (``prompt_embeds (1, L, D)``, ``pooled_prompt_embeds (1, D')``...); the step expands them to the batch.
* Per-sample image conditioning comes from the batch: ``original_size`` and ``crop_top_left`` ``(N, 2)`` int64,
  ``(height, width)`` and ``(top, left)`` in pixels (SDXL's ``add_time_ids``); families that do not use them ignore
  them.
"""

from __future__ import annotations

import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedTokenizerBase

    from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["ModelFamily", "BaseModelInfo", "Components", "NoisedLatents", "TextConditioning", "ModelFiles"]

#: Text conditioning of one prompt: tensors with a leading batch dimension of 1.
TextConditioning = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------- model files
def _looks_local(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``C:\\x``) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or ":" in name


@dataclass(frozen=True)
class ModelFiles:
    """Reads the JSON configs of a diffusers model (a local folder or a Hub id) without loading any weight.

    Attributes:
        name_or_path: the folder or Hub id. revision: the Hub revision. arg_name: the argument it came from, for
            error messages (``pretrained_model_name_or_path`` or ``pretrained_vae_model_name_or_path``).
    """

    name_or_path: str
    revision: str | None = None
    arg_name: str = "pretrained_model_name_or_path"

    def read_json(self, filename: str, subfolder: str | None = None) -> dict[str, Any]:
        """``[subfolder/]filename`` as a dict.

        Raises:
            FileNotFoundError / NotADirectoryError: naming :attr:`arg_name` and the value.
        """
        name, arg = self.name_or_path, self.arg_name
        local = Path(name).expanduser()
        if local.is_dir():
            path = local / subfolder / filename if subfolder else local / filename
            if not path.is_file():
                raise FileNotFoundError(
                    f"`{arg}` {name!r} is not a diffusers {'pipeline' if filename == 'model_index.json' else 'model'} "
                    f"folder: "
                    f"{str(path)!r} is missing."
                )
            return json.loads(path.read_text(encoding="utf-8"))
        if local.exists():
            raise NotADirectoryError(f"`{arg}` {name!r} is a file; give a diffusers folder.")
        if _looks_local(name):
            raise FileNotFoundError(f"`{arg}` folder {name!r} does not exist.")
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, filename, subfolder=subfolder, revision=self.revision)
        except Exception as exc:  # offline, unknown repo, gated repo...: one message naming the argument
            raise FileNotFoundError(
                f"`{arg}` {name!r} is neither a local folder nor a reachable Hub model "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
            ) from exc
        return json.loads(Path(path).read_text(encoding="utf-8"))

    def model_index(self) -> dict[str, Any]:
        """``model_index.json``."""
        return self.read_json("model_index.json")


# ------------------------------------------------------------------------------------------------ data classes
@dataclass(frozen=True)
class BaseModelInfo:
    """What training needs to know about the base model before loading it (from its configs, no weights).

    Attributes:
        name_or_path: as given. family: the :attr:`ModelFamily.name`. pipeline_class: ``_class_name`` of
            ``model_index.json``.
        components: ``{name: (library, class name)}`` from ``model_index.json``.
        vae_scale_factor: image pixels per VAE latent pixel (``2 ** (len(vae.block_out_channels) - 1)``; 8 for SD).
        loss_grid_factor: image pixels per loss-grid cell (``vae_scale_factor`` x the family's patch size when the
            loss is taken on patchified latents, else ``vae_scale_factor``).
        resolution_multiple: ``resolution`` must be a multiple of it (VAE factor x the denoiser's patch size).
        denoiser_downsample_factor: latent pixels per UNet bottleneck pixel (1 for transformers).
        latent_channels: channels of the latents the loss sees.
        prediction_type: ``epsilon`` / ``v_prediction`` (DDPM families) or ``flow_matching``.
        vae_config: the VAE's config dict (scaling / shift factors, channels), for :meth:`ModelFamily` and the
            VAE check.
        extra: family-specific facts read from the configs (e.g. ``guidance_embeds`` of FLUX.1 [dev]).
    """

    name_or_path: str
    family: str
    pipeline_class: str
    components: dict[str, tuple[str, str]]
    vae_scale_factor: int
    loss_grid_factor: int
    resolution_multiple: int
    denoiser_downsample_factor: int
    latent_channels: int
    prediction_type: str
    vae_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Components:
    """The loaded base model (weights on the CPU, frozen; the trainer moves them and adds adapters).

    Attributes:
        family: the :class:`ModelFamily` that loaded them. info: the :class:`BaseModelInfo`.
        denoiser: the UNet or transformer. vae: the VAE (or ``pretrained_vae_model_name_or_path``'s).
        text_encoders / tokenizers: by component name, in the family's order (``text_encoder``, ``text_encoder_2``).
        noise_scheduler: the training scheduler (DDPM with the model's betas, or flow matching).
    """

    family: ModelFamily
    info: BaseModelInfo
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, PreTrainedTokenizerBase]
    noise_scheduler: SchedulerMixin

    # Names of the single-text-encoder UNet models (SD 1.x/2.x), used by their family, tests and benchmarks.
    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders["text_encoder"]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizers["tokenizer"]

    @property
    def token_length(self) -> int:
        """Token length of the first tokenizer: its ``model_max_length`` when sane, else the encoder's positions."""
        return token_length(self.tokenizer, self.text_encoder)


def token_length(tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module) -> int:
    """``tokenizer.model_max_length`` when sane, else ``text_encoder.config.max_position_embeddings``."""
    length = getattr(tokenizer, "model_max_length", None)
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if length is None or length > 100_000:  # transformers' "unset" sentinel is ~1e30
        length = positions
    if length is None:
        raise ValueError("cannot tell the text encoder's token length; set `tokenizer_max_length`.")
    return int(length)


@dataclass
class NoisedLatents:
    """The noised input of one step and what the prediction is compared with.

    Attributes:
        noisy: ``(N, C, h, w)`` the denoiser's input (before any packing).
        timesteps: ``(N,)`` what the denoiser is given as its timestep (DDPM indices, or the flow scheduler's
            timesteps in [0, num_train_timesteps]).
        target: ``(N, C, h, w)`` the regression target on the loss grid.
        weights: ``(N,)`` per-sample loss weights (Min-SNR, flow-matching weighting), or None for 1.
        prior_weighted: whether :attr:`weights` also apply to the class half (flow scripts weight both halves;
            diffusers' DDPM DreamBooth applies Min-SNR to the instance loss only).
        sigmas: ``(N,)`` flow-matching noise levels, for families that precondition the output; else None.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None
    prior_weighted: bool = False
    sigmas: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------- the interface
class ModelFamily(ABC):
    """One model family (SD 1.x/2.x, SDXL, SD3, FLUX.1, ...): what training needs that differs between families.

    Subclasses set the class attributes and implement the abstract methods; the helpers below (component classes,
    generic loading, LoRA save through the pipeline class) cover what most families share. Instances are
    stateless; :func:`persam_dreambooth.training.families.get_family` returns a fresh one.
    """

    #: Short id used in messages, logs and ``config.resolved.yaml`` (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``).
    name: ClassVar[str]
    #: Human name for tables and errors (``"Stable Diffusion 1.x/2.x"``).
    title: ClassVar[str]
    #: ``_class_name`` values of ``model_index.json`` this family trains (``("StableDiffusionPipeline",)``).
    pipeline_class_names: ClassVar[tuple[str, ...]]
    #: The diffusers pipeline class used for class images, validation, ``generate`` and ``save_lora_weights``.
    pipeline_class_name: ClassVar[str]
    #: Component name of the trained network in ``model_index.json`` (``"unet"`` or ``"transformer"``).
    denoiser_name: ClassVar[str]
    #: Text-encoder / tokenizer component names, in the pipeline's order.
    text_encoder_names: ClassVar[tuple[str, ...]]
    tokenizer_names: ClassVar[tuple[str, ...]]
    #: Default LoRA targets of the denoiser: those of the family's diffusers DreamBooth LoRA script.
    lora_target_modules: ClassVar[tuple[str, ...]]
    #: Default LoRA targets of each trained text encoder (empty when ``train_text_encoder`` is not supported).
    text_encoder_lora_target_modules: ClassVar[tuple[str, ...]] = ()
    #: Keyword of the denoiser's LoRA layers in ``pipeline_class.save_lora_weights`` (``unet_lora_layers``...).
    lora_layers_kwarg: ClassVar[str]
    #: ``save_lora_weights`` keyword per trained text encoder (``{"text_encoder": "text_encoder_lora_layers"}``).
    text_encoder_lora_kwargs: ClassVar[Mapping[str, str]] = {}
    #: Whether the denoiser's peft state dict is converted to diffusers' ``lora.down/up`` key format before saving
    #: (the UNet scripts do; the transformer scripts save peft's ``lora_A/lora_B`` keys as they are).
    denoiser_lora_in_diffusers_format: ClassVar[bool] = True
    #: ``ddpm`` (epsilon / v-prediction) or ``flow_matching``.
    objective: ClassVar[Literal["ddpm", "flow_matching"]]
    #: The extra patch factor on top of the VAE's (2 for FLUX's 2x2 packing); ``resolution`` must be a multiple of
    #: ``vae_scale_factor * patch_size``.
    patch_size: ClassVar[int] = 1
    #: Whether :meth:`predict` needs each sample's ``original_size`` and ``crop_top_left`` (SDXL); the dataset then
    #: adds them to the batch.
    uses_crop_conditioning: ClassVar[bool] = False
    #: Whether :meth:`load_components` loads the denoiser through :meth:`denoiser_load_kwargs` /
    #: :meth:`prepare_quantized`, i.e. honours ``bnb_quantization_config_path`` (QLoRA).
    supports_quantized_base: ClassVar[bool] = False
    #: ``guidance_scale`` of validation images when ``validation_guidance_scale`` is null: the default of the family
    #: pipeline's ``__call__`` (None: pass none, the pipeline decides).
    default_validation_guidance_scale: ClassVar[float | None] = 7.5

    # ------------------------------------------------------------------------------------------- model inspection
    @abstractmethod
    def inspect(self, files: ModelFiles, index: dict[str, Any]) -> BaseModelInfo:
        """Read the configs of ``files`` (no weights) into a :class:`BaseModelInfo`.

        Args:
            files: the base model. index: its ``model_index.json``, already read.

        Raises:
            ValueError: a required component is missing, or a config value the family cannot train (naming
                ``pretrained_model_name_or_path``).
        """

    def check_resolution(self, resolution: int, info: BaseModelInfo) -> None:
        """``resolution`` must be a positive multiple of ``info.resolution_multiple``.

        Raises:
            ValueError: naming ``resolution``, the value, the rule and the two nearest valid sides.
        """
        factor = info.resolution_multiple
        if resolution % factor or resolution < factor:
            lower, upper = max(factor, resolution - resolution % factor), resolution - resolution % factor + factor
            raise ValueError(
                f"`resolution` must be a multiple of the VAE's scale factor {info.vae_scale_factor} x {self.title}'s "
                f"patch size {factor // info.vae_scale_factor} = {factor} for {info.name_or_path!r}, got "
                f"{resolution} (try {lower} or {upper})."
            )

    def check_vae(self, vae_files: ModelFiles, info: BaseModelInfo) -> None:
        """A replacement VAE (``pretrained_vae_model_name_or_path``) must match the base model's latent space.

        Raises:
            ValueError: naming ``pretrained_vae_model_name_or_path``, the differing config key and both values.
        """
        vae_cfg = vae_files.read_json("config.json", subfolder=None)
        for key in ("latent_channels", "block_out_channels"):
            theirs, ours = vae_cfg.get(key), info.vae_config.get(key)
            if key == "block_out_channels" and theirs is not None and ours is not None:
                theirs, ours = len(theirs), len(ours)  # the scale factor is what must agree
                key = "number of block_out_channels (the VAE scale factor)"
            if theirs != ours:
                raise ValueError(
                    f"`pretrained_vae_model_name_or_path` {vae_files.name_or_path!r} does not match the base model "
                    f"{info.name_or_path!r}: {key} is {theirs!r}, the base model's VAE has {ours!r}."
                )

    def resolved_lora_targets(self, config: TrainConfig) -> list[str]:
        """``lora_target_modules`` of the config, or the family's defaults when it is null."""
        return list(config.lora_target_modules) if config.lora_target_modules else list(self.lora_target_modules)

    def resolved_text_encoder_lora_targets(self, config: TrainConfig) -> list[str]:
        targets = config.text_encoder_lora_target_modules
        return list(targets) if targets else list(self.text_encoder_lora_target_modules)

    def check_config(self, config: TrainConfig, info: BaseModelInfo) -> None:
        """Options this family cannot honour (e.g. ``train_text_encoder`` on a T5), as ValueErrors naming them."""
        if config.train_text_encoder and not self.text_encoder_lora_kwargs:
            raise ValueError(f"`train_text_encoder` is not supported for {self.title}; drop the flag.")
        if config.bnb_quantization_config_path and not self.supports_quantized_base:
            raise ValueError(f"`bnb_quantization_config_path` (a quantized base) is not supported for {self.title} "
                             "yet; drop the flag.")

    # ------------------------------------------------------------------------------------------------- loading
    @staticmethod
    def component_class(info: BaseModelInfo, name: str) -> type:
        """The class of component ``name`` as ``model_index.json`` names it."""
        library, class_name = info.components[name]
        return getattr(importlib.import_module(library), class_name)

    @abstractmethod
    def load_components(self, config: TrainConfig, info: BaseModelInfo, weight_dtype: torch.dtype) -> Components:
        """Load tokenizers, text encoders, VAE (or ``pretrained_vae_model_name_or_path``), denoiser and the
        training noise scheduler; everything frozen (``requires_grad_(False)``), on the CPU.

        Frozen modules load in ``weight_dtype``; modules trained in full (``train_mode: full``) in float32.
        """

    @staticmethod
    def denoiser_load_kwargs(config: TrainConfig, weight_dtype: torch.dtype) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments of the denoiser: ``quantization_config`` (a diffusers
        ``BitsAndBytesConfig`` from ``bnb_quantization_config_path``, 4-bit compute in ``weight_dtype``, as
        diffusers' scripts set it) for QLoRA, else nothing. Call :meth:`prepare_quantized` on the loaded model."""
        if not config.bnb_quantization_config_path:
            return {}
        from diffusers import BitsAndBytesConfig

        kwargs = json.loads(Path(config.bnb_quantization_config_path).read_text(encoding="utf-8"))
        if kwargs.get("load_in_4bit"):
            kwargs["bnb_4bit_compute_dtype"] = weight_dtype
        return {"quantization_config": BitsAndBytesConfig(**kwargs)}

    @staticmethod
    def prepare_quantized(denoiser: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
        """peft's ``prepare_model_for_kbit_training`` on a quantized denoiser (norms in fp32, inputs that need
        grads), as diffusers' scripts do; any other model is returned as it is."""
        if not config.bnb_quantization_config_path:
            return denoiser
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(denoiser, use_gradient_checkpointing=False)

    # ---------------------------------------------------------------------------------------------------- text
    @abstractmethod
    def tokenize(self, comps: Components, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """Token ids (and attention masks) of one prompt for every tokenizer: tensors ``(1, L_i)`` by name."""

    @abstractmethod
    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """Run the text encoders on :meth:`tokenize`'s output; return the conditioning (batch dimension 1).

        Called once per prompt under ``torch.no_grad`` when the embeddings are precomputed (then the text encoders
        can leave the GPU), or every step with gradients when a text encoder is trained.
        """

    # ------------------------------------------------------------------------------------------------- latents
    def encode_posterior(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters, cacheable on the CPU: ``(B, 3, H, W)`` -> ``(B, 2C, H/f, W/f)``
        (mean and log-variance of a diagonal Gaussian, as ``latent_dist.parameters``)."""
        param = next(vae.parameters())
        return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.parameters

    @abstractmethod
    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator,
                       info: BaseModelInfo) -> torch.Tensor:
        """Sample and normalise latents for the denoiser: ``(B, 2C, h', w')`` -> ``(B, C, h, w)`` on the loss
        grid (scaling and shift factors, or FLUX.2's patchify + batch-norm statistics)."""

    # ------------------------------------------------------------------------------------------- noise / target
    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, scheduler: SchedulerMixin, config: TrainConfig,
                  generator: torch.Generator) -> NoisedLatents:
        """Draw timesteps (from ``generator`` only) and noise ``latents`` ``(N, C, h, w)`` with ``noise`` (same
        shape). DDPM families: uniform timesteps, ``scheduler.add_noise``, target epsilon or velocity, Min-SNR
        weights; flow families: :func:`persam_dreambooth.training.families.objectives.flow_matching_noise`."""

    # ------------------------------------------------------------------------------------------- the prediction
    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                conditioning: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """The denoiser's prediction on the loss grid, ``(N, C, h, w)``, comparable with ``noised.target``.

        Args:
            text: the conditioning expanded to ``N`` samples.
            conditioning: per-sample conditioning of the batch, instance then class: ``original_size`` and
                ``crop_top_left`` ``(N, 2)`` int64 when :attr:`uses_crop_conditioning`.

        Families add their extra conditioning here (SDXL ``add_time_ids``, FLUX guidance and text/image ids), pack
        the latents for a transformer (FLUX 2x2 patches) and unpack the prediction, so the masked loss sees the
        latent layout.
        """

    # ---------------------------------------------------------------------------------------------------- LoRA
    def pipeline_class(self) -> type[DiffusionPipeline]:
        """The diffusers pipeline class (:attr:`pipeline_class_name`)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def save_lora(self, folder: str | Path, denoiser_layers: dict[str, torch.Tensor],
                  text_encoder_layers: Mapping[str, dict[str, torch.Tensor]],
                  metadata: Mapping[str, dict[str, Any]], weight_name: str) -> None:
        """Write the LoRA file through the pipeline's own ``save_lora_weights``, so that
        ``PipelineClass.load_lora_weights(folder)`` reads it unchanged.

        Args:
            denoiser_layers: the denoiser's adapters, diffusers key format (no component prefix).
            text_encoder_layers: by text-encoder component name, the same.
            metadata: ``LoraConfig.to_dict()`` by component name (``self.denoiser_name`` / text encoders).
        """
        kwargs: dict[str, Any] = {self.lora_layers_kwarg: denoiser_layers}
        meta_kwarg = self.lora_layers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")
        if self.denoiser_name in metadata:
            kwargs[meta_kwarg] = metadata[self.denoiser_name]
        for name, layers in text_encoder_layers.items():
            kwarg = self.text_encoder_lora_kwargs[name]
            kwargs[kwarg] = layers
            if name in metadata:
                kwargs[kwarg.replace("_lora_layers", "_lora_adapter_metadata")] = metadata[name]
        self.pipeline_class().save_lora_weights(folder, weight_name=weight_name, **kwargs)

    def read_lora(self, folder: str | Path, weight_name: str) -> dict[str, torch.Tensor]:
        """The LoRA file's state dict as the pipeline's ``lora_state_dict`` reads it (keys prefixed by component)."""
        state_dict = self.pipeline_class().lora_state_dict(str(folder), weight_name=weight_name)
        return state_dict[0] if isinstance(state_dict, tuple) else state_dict

    # ------------------------------------------------------------------------------------------------ pipelines
    def pipeline_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        """Extra keyword arguments of ``pipeline.__call__`` for validation and class images (e.g.
        ``max_sequence_length``); ``guidance_scale``, steps, size and generator are passed by the caller."""
        return {}

    def pipeline_overrides(self, comps_or_none: Components | None, config: TrainConfig) -> dict[str, Any]:
        """Components to pass to ``from_pretrained`` of the pipeline (no safety checker; the replacement VAE)."""
        return {}

    def validation_guidance_scale(self, config: TrainConfig, info: BaseModelInfo) -> float | None:
        """``validation_guidance_scale``, or the family's default (:attr:`default_validation_guidance_scale`) when
        it is null; None leaves ``guidance_scale`` to the pipeline."""
        value = config.validation_guidance_scale
        return self.default_validation_guidance_scale if value is None else float(value)

    def validation_call_kwargs(self, config: TrainConfig, info: BaseModelInfo) -> dict[str, Any]:
        """The extra ``pipeline.__call__`` arguments of validation images: :meth:`pipeline_kwargs` and the
        resolved :meth:`validation_guidance_scale`."""
        kwargs = self.pipeline_kwargs(config)
        guidance = self.validation_guidance_scale(config, info)
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        return kwargs

    def generation_kwargs(self, run_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The extra ``pipeline.__call__`` arguments of ``generate`` / ``compare``: what :meth:`pipeline_kwargs`
        gives during training, read from a run's ``config.resolved.yaml`` (``run_config``; None for the base model:
        the family's defaults). JSON values only (lists, not tuples), as they are recorded with every image."""
        return {}

    # ------------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def expand_text(text: TextConditioning, batch_size: int) -> TextConditioning:
        """``(1, ...)`` -> ``(batch_size, ...)`` views."""
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in text.items()}

    @staticmethod
    def cat_text(parts: Sequence[TextConditioning]) -> TextConditioning:
        """Concatenate conditionings along the batch (instance then class)."""
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
