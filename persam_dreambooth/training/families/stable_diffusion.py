"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM training (epsilon or v-prediction).

The recipe of diffusers' ``train_dreambooth_lora.py``: latents ``(z - shift) * scaling_factor``, uniform integer
timesteps, ``DDPMScheduler.add_noise`` with the model's own betas, target epsilon or velocity, Min-SNR-gamma weights
on the instance loss; LoRA on the UNet's attention projections and, with ``train_text_encoder``, on CLIP's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from persam_dreambooth.training.families.base import (
    BaseModelInfo,
    Components,
    ModelFamily,
    ModelFiles,
    NoisedLatents,
    TextConditioning,
    token_length,
)
from persam_dreambooth.training.families.objectives import ddpm_noise

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["StableDiffusionFamily", "UNetFamily", "LORA_UNET_TARGETS", "LORA_CLIP_TARGETS"]

#: UNet attention projections (diffusers' Attention: to_q/to_k/to_v/to_out.0), train_dreambooth_lora(_sdxl).py.
LORA_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: CLIP text-encoder attention projections.
LORA_CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def encode_clip(text_encoder: torch.nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The CLIP text encoder's last hidden state. Shapes: ``(B, L) -> (B, L, D)``."""
    device = next(text_encoder.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    return text_encoder(input_ids.to(device), attention_mask=mask, return_dict=False)[0]


class UNetFamily(ModelFamily):
    """What the UNet families (SD 1.x/2.x, SDXL) share: configs, DDPM objective, Gaussian latents, loading."""

    denoiser_name = "unet"
    lora_target_modules = LORA_UNET_TARGETS
    text_encoder_lora_target_modules = LORA_CLIP_TARGETS
    lora_layers_kwarg = "unet_lora_layers"
    objective = "ddpm"
    supports_quantized_base = True

    def inspect(self, files: ModelFiles, index: dict[str, Any]) -> BaseModelInfo:
        components = {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0]}
        required = (self.denoiser_name, "vae", *self.text_encoder_names, *self.tokenizer_names, "scheduler")
        missing = [c for c in required if c not in components]
        if missing:
            raise ValueError(
                f"`pretrained_model_name_or_path` {files.name_or_path!r} has no {', '.join(missing)} component "
                f"(a {self.title} pipeline needs {', '.join(required)})."
            )
        vae_cfg = files.read_json("config.json", "vae")
        unet_cfg = files.read_json("config.json", "unet")
        sched_cfg = files.read_json("scheduler_config.json", "scheduler")
        vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        down_blocks = len(unet_cfg.get("down_block_types", ()))
        prediction_type = str(sched_cfg.get("prediction_type", "epsilon"))
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"the base model's scheduler has prediction_type {prediction_type!r}; training supports "
                "'epsilon' and 'v_prediction'."
            )
        return BaseModelInfo(
            name_or_path=files.name_or_path, family=self.name, pipeline_class=str(index.get("_class_name", "")),
            components=components,  # type: ignore[arg-type]
            vae_scale_factor=vae_scale_factor, loss_grid_factor=vae_scale_factor,
            resolution_multiple=vae_scale_factor * self.patch_size,
            denoiser_downsample_factor=2 ** max(down_blocks - 1, 0),
            latent_channels=int(unet_cfg.get("in_channels", 4)), prediction_type=prediction_type,
            vae_config=vae_cfg, extra={"unet": unet_cfg},
        )

    def check_resolution(self, resolution: int, info: BaseModelInfo) -> None:
        """The VAE is the hard constraint; a latent side that is not a multiple of the UNet's down-sampling factor
        works (diffusers forwards the up-sampling sizes) but costs an interpolation per up-block: a warning."""
        super().check_resolution(resolution, info)
        latent = resolution // info.vae_scale_factor
        if latent % info.denoiser_downsample_factor:
            logger.warning(
                "`resolution` %d gives %d-pixel latents, not a multiple of the UNet's down-sampling factor %d; the "
                "UNet interpolates its skip connections (works, but %d would be cleaner).",
                resolution, latent, info.denoiser_downsample_factor,
                info.vae_scale_factor * info.denoiser_downsample_factor,
            )

    def load_components(self, config: TrainConfig, info: BaseModelInfo, weight_dtype: torch.dtype) -> Components:
        """Tokenizers, CLIP text encoders, VAE, UNet and a DDPM scheduler with the model's betas, all frozen.

        Frozen modules load in ``weight_dtype``; the UNet in full fine-tuning and text encoders trained without
        LoRA in float32.
        """
        from diffusers import DDPMScheduler

        name = config.pretrained_model_name_or_path
        common: dict[str, Any] = {"revision": config.revision}
        weights = {**common, "variant": config.variant}
        lora = config.train_mode == "lora"
        unet_dtype = weight_dtype if lora else torch.float32
        te_dtype = weight_dtype if lora or not config.train_text_encoder else torch.float32
        tokenizers = {t: self.component_class(info, t).from_pretrained(name, subfolder=t, **common)
                      for t in self.tokenizer_names}
        text_encoders = {t: self.component_class(info, t).from_pretrained(name, subfolder=t, dtype=te_dtype, **weights)
                         for t in self.text_encoder_names}
        vae = self.load_vae(config, info, weight_dtype)
        unet = self.component_class(info, "unet").from_pretrained(
            name, subfolder="unet", dtype=unet_dtype, **weights, **self.denoiser_load_kwargs(config, weight_dtype))
        unet = self.prepare_quantized(unet, config)
        # Training adds noise with the DDPM forward process of the model's own schedule (betas, prediction type).
        noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        for module in (*text_encoders.values(), vae, unet):
            module.requires_grad_(False)
        return Components(family=self, info=info, denoiser=unet, vae=vae, text_encoders=text_encoders,
                          tokenizers=tokenizers, noise_scheduler=noise_scheduler)

    def load_vae(self, config: TrainConfig, info: BaseModelInfo, dtype: torch.dtype) -> torch.nn.Module:
        """The base model's VAE, or ``pretrained_vae_model_name_or_path``'s (a folder with the VAE at its root)."""
        cls = self.component_class(info, "vae")
        if config.pretrained_vae_model_name_or_path:
            return cls.from_pretrained(config.pretrained_vae_model_name_or_path, revision=config.revision,
                                       dtype=dtype)
        return cls.from_pretrained(config.pretrained_model_name_or_path, subfolder="vae", revision=config.revision,
                                   variant=config.variant, dtype=dtype)

    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator,
                       info: BaseModelInfo) -> torch.Tensor:
        """``(B, 2C, h, w)`` posterior -> ``(B, C, h, w)`` latents ``(z - shift_factor) * scaling_factor``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        scaling = float(info.vae_config.get("scaling_factor", 0.18215))
        shift = float(info.vae_config.get("shift_factor") or 0.0)
        latents = DiagonalGaussianDistribution(posterior).sample(generator=generator)  # (B, C, h, w)
        return (latents - shift) * scaling

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, scheduler: SchedulerMixin, config: TrainConfig,
                  generator: torch.Generator) -> NoisedLatents:
        return ddpm_noise(latents, noise, scheduler, config, generator)

    def pipeline_overrides(self, comps: Components | None, config: TrainConfig) -> dict[str, Any]:
        """No safety checker (about 1.2 GB for SD 1.x; class and validation images are never published)."""
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
        if "safety_checker" in index:
            return {"safety_checker": None, "requires_safety_checker": False}
        return {}


class StableDiffusionFamily(UNetFamily):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``)."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    text_encoder_lora_kwargs = {"text_encoder": "text_encoder_lora_layers"}

    def tokenize(self, comps: Components, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """``input_ids (1, L)`` and, with ``text_encoder_use_attention_mask``, ``attention_mask (1, L)``;
        ``L`` = ``tokenizer_max_length`` or the tokenizer's length."""
        length = config.tokenizer_max_length or token_length(comps.tokenizer, comps.text_encoder)
        tokens = comps.tokenizer(prompt, padding="max_length", truncation=True, max_length=length,
                                 return_tensors="pt")
        out = {"input_ids": tokens.input_ids}
        if config.text_encoder_use_attention_mask:
            out["attention_mask"] = tokens.attention_mask
        return out

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``{"prompt_embeds": (1, L, D)}``: CLIP's last hidden state."""
        return {"prompt_embeds": encode_clip(text_encoders["text_encoder"], tokens["input_ids"],
                                             tokens.get("attention_mask"))}

    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                conditioning: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """UNet prediction ``(N, C, h, w)``; learned-variance UNets predict (noise, variance): the first C kept."""
        pred = denoiser(noised.noisy, noised.timesteps, text["prompt_embeds"], return_dict=False)[0]
        channels = noised.noisy.shape[1]
        return pred[:, :channels] if pred.shape[1] == 2 * channels else pred
