"""Stable Diffusion XL: two CLIP text encoders, a ``text_time`` UNet, DDPM training (diffusers'
``train_dreambooth_lora_sdxl.py`` recipe).

* Text: the penultimate hidden states of both encoders concatenated, ``(1, 77, D1 + D2)``, and the pooled,
  projected output of the second, ``(1, P)``.
* ``add_time_ids`` ``(N, 6)`` per sample: ``original_size (h, w)`` of the photo before any resize, the
  ``crop_top_left (top, left)`` of the training crop, and the target size (``(resolution, resolution)``, or the
  sample's aspect-ratio bucket); all three come from the dataset (``crop_conditioning``), so a subject cut by a crop
  is conditioned as cut.
* LoRA on the UNet's attention projections; with ``train_text_encoder``, on both CLIPs' (``text_encoder`` and
  ``text_encoder_2`` in the file, as ``StableDiffusionXLPipeline.save_lora_weights`` writes them).
* SDXL's own VAE overflows in fp16: ``--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix``, as in
  diffusers' script.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from persam_dreambooth.training.families.base import (
    BaseModelInfo,
    Components,
    ModelFiles,
    NoisedLatents,
    TextConditioning,
    token_length,
)
from persam_dreambooth.training.families.stable_diffusion import UNetFamily

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["StableDiffusionXLFamily", "add_time_ids"]


def add_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: three ``(N, 2)`` -> ``(N, 6)`` rows ``[orig_h, orig_w, crop_top, crop_left,
    target_h, target_w]`` (diffusers' ``compute_time_ids``)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(dtype)  # (N, 6)


class StableDiffusionXLFamily(UNetFamily):
    """Stable Diffusion XL 1.0 base (``StableDiffusionXLPipeline``)."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_lora_kwargs = {"text_encoder": "text_encoder_lora_layers",
                                "text_encoder_2": "text_encoder_2_lora_layers"}
    uses_crop_conditioning = True
    default_validation_guidance_scale = 5.0  # StableDiffusionXLPipeline's default

    def inspect(self, files: ModelFiles, index: dict[str, Any]) -> BaseModelInfo:
        info = super().inspect(files, index)
        unet_cfg = info.extra["unet"]
        if unet_cfg.get("addition_embed_type") != "text_time":
            raise ValueError(
                f"`pretrained_model_name_or_path` {files.name_or_path!r}: the UNet's addition_embed_type is "
                f"{unet_cfg.get('addition_embed_type')!r}; SDXL training needs 'text_time' (the SDXL base UNet)."
            )
        return info

    def check_config(self, config: TrainConfig, info: BaseModelInfo) -> None:
        super().check_config(config, info)
        if config.mixed_precision == "fp16" and not config.pretrained_vae_model_name_or_path:
            logger.warning(
                "SDXL's VAE produces NaNs in fp16; pass `--pretrained_vae_model_name_or_path "
                "madebyollin/sdxl-vae-fp16-fix` (as diffusers' SDXL script advises) or use bf16."
            )

    def tokenize(self, comps: Components, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``input_ids_2`` ``(1, L)`` from both tokenizers (padded to ``tokenizer_max_length`` or
        each tokenizer's length)."""
        out = {}
        for key, tok_name, te_name in (("input_ids", "tokenizer", "text_encoder"),
                                       ("input_ids_2", "tokenizer_2", "text_encoder_2")):
            tokenizer = comps.tokenizers[tok_name]
            length = config.tokenizer_max_length or token_length(tokenizer, comps.text_encoders[te_name])
            out[key] = tokenizer(prompt, padding="max_length", truncation=True, max_length=length,
                                 return_tensors="pt").input_ids
        return out

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``{"prompt_embeds": (1, L, D1 + D2), "pooled_prompt_embeds": (1, P)}`` (diffusers' SDXL
        ``encode_prompt``: penultimate hidden states, the second encoder's projected pooled output)."""
        states = []
        pooled = None
        for key, name in (("input_ids", "text_encoder"), ("input_ids_2", "text_encoder_2")):
            encoder = text_encoders[name]
            ids = tokens[key].to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (1, L, D_i)
            pooled = out.text_embeds if name == "text_encoder_2" else pooled  # (1, P)
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                conditioning: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """UNet prediction ``(N, C, h, w)`` with ``added_cond_kwargs`` ``text_embeds (N, P)`` and ``time_ids
        (N, 6)`` from each sample's ``original_size``, ``crop_top_left`` and ``target_size`` (its bucket)."""
        if not all(k in conditioning for k in ("original_size", "crop_top_left", "target_size")):
            raise ValueError("SDXL needs each sample's original_size, crop_top_left and target_size in the batch "
                             "(build the dataset with crop_conditioning=True).")
        embeds = text["prompt_embeds"]
        time_ids = add_time_ids(conditioning["original_size"], conditioning["crop_top_left"],
                                conditioning["target_size"], embeds.dtype)
        added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids.to(embeds.device)}
        pred = denoiser(noised.noisy, noised.timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
        channels = noised.noisy.shape[1]
        return pred[:, :channels] if pred.shape[1] == 2 * channels else pred
