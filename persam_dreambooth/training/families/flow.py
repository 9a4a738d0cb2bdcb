"""What the flow-matching transformer families (SD3, FLUX.1, FLUX.2 [klein]) share: inspection, loading, noise.

A :class:`FlowMatchingFamily` subclass sets the class attributes of :class:`~.base.ModelFamily`, its diffusers
defaults (:attr:`default_weighting_scheme`, :attr:`default_max_sequence_length`, :attr:`default_guidance_scale`)
and implements text encoding and :meth:`~.base.ModelFamily.predict`. This module does the rest the way diffusers'
``train_dreambooth_lora_{sd3,flux,flux2_klein}.py`` do it (notes: ``docs/design/model_families.md``,
"Flow-matching families"):

* latents ``(z - shift_factor) * scaling_factor`` sampled from the VAE posterior;
* timesteps from ``compute_density_for_timestep_sampling(weighting_scheme)`` indexed into the training
  ``FlowMatchEulerDiscreteScheduler``'s tables, ``x_t = (1 - sigma) x + sigma n``, target ``n - x``, loss weights
  ``compute_loss_weighting_for_sd3`` (:func:`~.objectives.flow_matching_noise`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from persam_dreambooth.training.families.base import (
    BaseModelInfo,
    Components,
    ModelFamily,
    ModelFiles,
    NoisedLatents,
)
from persam_dreambooth.training.families.objectives import WEIGHTING_SCHEMES, flow_matching_noise

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["FlowMatchingFamily", "normalize_channels", "tokenize_chat"]

_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def normalize_channels(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(z - mean) / std`` of ``(B, C, h, w)`` latents with ``C`` means and standard deviations (lists
    of floats, as kept in :class:`~.base.BaseModelInfo`): Qwen-Image's ``latents_mean`` / ``latents_std``, FLUX.2's
    batch-norm statistics."""
    mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype)  # (C,)
    std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype)  # (C,)
    return (latents - mean_t[None, :, None, None]) / std_t[None, :, None, None]  # (C,) -> (1, C, 1, 1)


def tokenize_chat(tokenizer: Any, prompt: str, max_length: int, enable_thinking: bool) -> dict[str, torch.Tensor]:
    """``prompt`` as the user turn of the tokenizer's chat template (a Qwen3 template: ``enable_thinking`` as the
    family's pipeline sets it), padded / truncated to ``input_ids`` and ``attention_mask`` ``(1, max_length)``."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    inputs = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


class FlowMatchingFamily(ModelFamily):
    """Base of the rectified-flow transformer families; subclasses are one short module each."""

    objective = "flow_matching"
    denoiser_name = "transformer"
    supports_quantized_base = True  # the transformer loads through denoiser_load_kwargs / prepare_quantized
    lora_layers_kwarg = "transformer_lora_layers"
    denoiser_lora_in_diffusers_format = False  # the transformer scripts save peft's lora_A / lora_B keys
    #: ``weighting_scheme`` when the config leaves it null (the family's diffusers script default).
    default_weighting_scheme: ClassVar[str] = "none"
    #: ``max_sequence_length`` of the T5 / LLM text encoder when the config leaves it null.
    default_max_sequence_length: ClassVar[int] = 512
    #: ``guidance_scale`` fed to a guidance embedding during training when the config leaves it null.
    default_guidance_scale: ClassVar[float] = 3.5
    #: Whether the family's transformer config may say ``guidance_embeds`` (a guidance-distilled checkpoint, e.g.
    #: FLUX.1 [dev]): :meth:`extra_info` records it and :meth:`guidance` feeds ``guidance_scale`` when it is set.
    reads_guidance_embeds: ClassVar[bool] = False
    #: Whether the latents are the VAE posterior's mode (the Z-Image and FLUX.2 scripts' choice) rather than a
    #: sample (see :meth:`posterior_latents`).
    latents_from_mode: ClassVar[bool] = False

    # ------------------------------------------------------------------------------------------ resolved options
    def weighting_scheme(self, config: TrainConfig) -> str:
        return config.weighting_scheme or self.default_weighting_scheme

    def max_sequence_length(self, config: TrainConfig) -> int:
        return config.max_sequence_length or self.default_max_sequence_length

    def guidance_scale(self, config: TrainConfig) -> float:
        return self.default_guidance_scale if config.guidance_scale is None else float(config.guidance_scale)

    # -------------------------------------------------------------------------------------------- inspection
    def inspect(self, files: ModelFiles, index: dict[str, Any]) -> BaseModelInfo:
        """Components, VAE / transformer / scheduler configs; the resolution multiple is VAE factor x patch."""
        components = {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0]}
        name = files.name_or_path
        required = (self.denoiser_name, "vae", "scheduler", *self.text_encoder_names, *self.tokenizer_names)
        missing = [c for c in required if c not in components]
        if missing:
            raise ValueError(
                f"`{files.arg_name}` {name!r} ({index.get('_class_name')}) has no {', '.join(missing)} component; "
                f"{self.title} training needs {', '.join(required)}."
            )
        scheduler_class = components["scheduler"][1]
        if scheduler_class not in _FLOW_SCHEDULERS:
            raise ValueError(
                f"`{files.arg_name}` {name!r} has a {scheduler_class} scheduler; {self.title} training needs "
                f"{' or '.join(_FLOW_SCHEDULERS)}."
            )
        vae_cfg = files.read_json("config.json", "vae")
        transformer_cfg = files.read_json("config.json", self.denoiser_name)
        vae_scale_factor = self.vae_scale_factor(vae_cfg)
        return BaseModelInfo(
            name_or_path=name,
            family=self.name,
            pipeline_class=str(index.get("_class_name", "")),
            components=components,  # type: ignore[arg-type]
            vae_scale_factor=vae_scale_factor,
            loss_grid_factor=vae_scale_factor * self.loss_patch_factor(),
            resolution_multiple=vae_scale_factor * self.patch_size,
            denoiser_downsample_factor=1,
            latent_channels=self.loss_channels(vae_cfg, transformer_cfg),
            prediction_type="flow_matching",
            vae_config=vae_cfg,
            extra=self.extra_info(transformer_cfg),
        )

    def vae_scale_factor(self, vae_cfg: dict[str, Any]) -> int:
        """Image pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)`` (8 for the real VAEs)."""
        return 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)

    def loss_patch_factor(self) -> int:
        """Latent cells per loss-grid cell along a side: 1 when the loss is taken on unpacked latents."""
        return 1

    def loss_channels(self, vae_cfg: dict[str, Any], transformer_cfg: dict[str, Any]) -> int:
        """Channels of the latents the loss sees (the VAE's latent channels unless patchified)."""
        return int(vae_cfg.get("latent_channels", 16))

    def extra_info(self, transformer_cfg: dict[str, Any]) -> dict[str, Any]:
        """Family-specific facts from the transformer config: ``guidance_embeds`` when
        :attr:`reads_guidance_embeds`."""
        if self.reads_guidance_embeds:
            return {"guidance_embeds": bool(transformer_cfg.get("guidance_embeds", False))}
        return {}

    def check_config(self, config: TrainConfig, info: BaseModelInfo) -> None:
        super().check_config(config, info)
        scheme = self.weighting_scheme(config)
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {scheme!r}.")
        length = self.max_sequence_length(config)
        if length < 1:
            raise ValueError(f"`max_sequence_length` must be >= 1, got {length!r}.")

    # ---------------------------------------------------------------------------------------------- loading
    def load_components(self, config: TrainConfig, info: BaseModelInfo, weight_dtype: torch.dtype) -> Components:
        """Tokenizers, text encoders, VAE (or ``pretrained_vae_model_name_or_path``), transformer and the training
        ``FlowMatchEulerDiscreteScheduler``; frozen, on the CPU."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = config.pretrained_model_name_or_path
        common: dict[str, Any] = {"revision": config.revision}
        weights = {**common, "variant": config.variant}
        lora = config.train_mode == "lora"
        te_dtype = weight_dtype if lora or not config.train_text_encoder else torch.float32
        tokenizers = {
            t: self.component_class(info, t).from_pretrained(name, subfolder=t, **common) for t in self.tokenizer_names
        }
        text_encoders = {
            t: self.component_class(info, t).from_pretrained(name, subfolder=t, dtype=te_dtype, **weights)
            for t in self.text_encoder_names
        }
        vae_cls = self.component_class(info, "vae")
        if config.pretrained_vae_model_name_or_path:
            vae = vae_cls.from_pretrained(config.pretrained_vae_model_name_or_path, dtype=weight_dtype)
        else:
            vae = vae_cls.from_pretrained(name, subfolder="vae", dtype=weight_dtype, **weights)
        # QLoRA: a bitsandbytes quantization_config when bnb_quantization_config_path is set (else nothing).
        denoiser = self.component_class(info, self.denoiser_name).from_pretrained(
            name, subfolder=self.denoiser_name, dtype=weight_dtype if lora else torch.float32, **weights,
            **self.denoiser_load_kwargs(config, weight_dtype))
        denoiser = self.prepare_quantized(denoiser, config)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **common)
        for module in (*text_encoders.values(), vae, denoiser):
            module.requires_grad_(False)
        return Components(family=self, info=self.loaded_info(info, vae), denoiser=denoiser, vae=vae,
                          text_encoders=text_encoders, tokenizers=tokenizers, noise_scheduler=noise_scheduler)

    def loaded_info(self, info: BaseModelInfo, vae: torch.nn.Module) -> BaseModelInfo:
        """``info`` completed with what only the loaded VAE knows (its config as loaded, e.g. a replacement's)."""
        return dataclasses.replace(info, vae_config=dict(vae.config))

    # ---------------------------------------------------------------------------------------------- latents
    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator,
                       info: BaseModelInfo) -> torch.Tensor:
        """``(B, 2C, h, w)`` posterior parameters -> ``(B, C, h, w)`` latents ``(z - shift) * scaling``."""
        latents = self.posterior_latents(posterior, generator)  # (B, C, h, w)
        shift = float(info.vae_config.get("shift_factor") or 0.0)
        scaling = float(info.vae_config.get("scaling_factor", 1.0))
        return (latents - shift) * scaling

    def posterior_latents(self, posterior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(B, 2C, h, w)`` posterior parameters -> ``(B, C, h, w)`` raw latents: the mode when
        :attr:`latents_from_mode` (``generator`` then draws nothing), else a sample drawn with ``generator``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(posterior)
        return dist.mode() if self.latents_from_mode else dist.sample(generator=generator)

    # ------------------------------------------------------------------------------------------------ noise
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, scheduler: Any, config: TrainConfig,
                  generator: torch.Generator) -> NoisedLatents:
        """Rectified-flow noising (:func:`~.objectives.flow_matching_noise`) with the family's weighting scheme."""
        return flow_matching_noise(latents, noise, scheduler, config, generator, self.weighting_scheme(config))

    # ------------------------------------------------------------------------------------------------ pipelines
    def pipeline_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length(config)}

    def generation_kwargs(self, run_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """``max_sequence_length`` the run trained with (null or no run: the family's default)."""
        length = (run_config or {}).get("max_sequence_length")
        return {"max_sequence_length": int(length or self.default_max_sequence_length)}

    def pipeline_overrides(self, comps_or_none: Components | None, config: TrainConfig) -> dict[str, Any]:
        """The replacement VAE, when ``pretrained_vae_model_name_or_path`` is set."""
        vae_path = config.pretrained_vae_model_name_or_path
        if not vae_path:
            return {}
        if comps_or_none is not None:
            return {"vae": comps_or_none.vae}
        return {"vae": self.component_class_from_name(config, "vae").from_pretrained(vae_path)}

    def component_class_from_name(self, config: TrainConfig, name: str) -> Any:
        """Component class of ``name`` read from ``model_index.json`` (when no :class:`BaseModelInfo` is at hand)."""
        import importlib

        library, class_name = ModelFiles(config.pretrained_model_name_or_path, config.revision).model_index()[name]
        return getattr(importlib.import_module(library), class_name)

    # ------------------------------------------------------------------------------------------------ helpers
    def guidance(self, config: TrainConfig, info: BaseModelInfo, batch_size: int,
                 device: torch.device) -> torch.Tensor | None:
        """The transformer's ``guidance`` input: ``(N,)`` float32 filled with :meth:`guidance_scale` when the model
        has a guidance embedding (``guidance_embeds`` in ``info.extra``), else None."""
        if not info.extra.get("guidance_embeds"):
            return None
        return torch.full((batch_size,), self.guidance_scale(config), device=device, dtype=torch.float32)

    @staticmethod
    def denoiser_dtype(denoiser: torch.nn.Module) -> torch.dtype:
        """The dtype of the frozen base weights (LoRA parameters may be float32 on a half-precision base)."""
        return getattr(denoiser, "dtype", None) or next(denoiser.parameters()).dtype
