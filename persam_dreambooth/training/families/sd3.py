"""Stable Diffusion 3 / 3.5 (medium, large): ``StableDiffusion3Pipeline``, as ``train_dreambooth_lora_sd3.py``.

* Text: CLIP-L and CLIP-G (penultimate hidden states, concatenated on features, zero-padded to T5's width) followed
  on the sequence by T5's last hidden state; pooled = both CLIP projections concatenated.
* Latents ``(z - shift) * scaling`` (16 channels); the transformer patchifies 2x2 internally and returns latents,
  so the loss grid is the latent grid (resolution multiple: VAE factor 8 x patch 2 = 16).
* Flow matching with ``weighting_scheme`` (default ``logit_normal``); ``precondition_outputs`` (default on, as
  the script) compares ``x_t - sigma * pred`` with the clean latents, i.e. the velocity loss weighted by sigma^2.
* LoRA on the joint-attention projections; ``train_text_encoder`` adds LoRA to both CLIPs (never T5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from persam_dreambooth.training.families.base import BaseModelInfo, NoisedLatents, TextConditioning, token_length
from persam_dreambooth.training.families.flow import FlowMatchingFamily

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["StableDiffusion3Family"]


class StableDiffusion3Family(FlowMatchingFamily):
    name = "sd3"
    title = "Stable Diffusion 3.5"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    lora_target_modules = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )
    text_encoder_lora_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")
    text_encoder_lora_kwargs = {"text_encoder": "text_encoder_lora_layers",
                                "text_encoder_2": "text_encoder_2_lora_layers"}
    patch_size = 2
    default_weighting_scheme = "logit_normal"
    default_max_sequence_length = 77
    default_validation_guidance_scale = 7.0  # StableDiffusion3Pipeline's default

    # ---------------------------------------------------------------------------------------------------- text
    def tokenize(self, comps, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``input_ids_2`` (CLIP, ``(1, 77)``), ``input_ids_3`` (T5, ``(1, max_sequence_length)``)."""
        out = {}
        for key, tok_name, te_name in (("input_ids", "tokenizer", "text_encoder"),
                                       ("input_ids_2", "tokenizer_2", "text_encoder_2")):
            tok = comps.tokenizers[tok_name]
            length = token_length(tok, comps.text_encoders[te_name])
            out[key] = tok(prompt, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt").input_ids
        out["input_ids_3"] = comps.tokenizers["tokenizer_3"](
            prompt, padding="max_length", max_length=self.max_sequence_length(config), truncation=True,
            add_special_tokens=True, return_tensors="pt").input_ids
        return out

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``prompt_embeds (1, 77 + L_t5, D_t5)`` and ``pooled_prompt_embeds (1, P_l + P_g)``."""
        hidden, pooled = [], []
        for te_name, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            encoder = text_encoders[te_name]
            out = encoder(tokens[key].to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])  # (1, P): the projected pooled output
            hidden.append(out.hidden_states[-2])  # (1, 77, D_i): penultimate layer
        t5 = text_encoders["text_encoder_3"]
        t5_embeds = t5(tokens["input_ids_3"].to(t5.device))[0]  # (1, L_t5, D_t5)
        clip_embeds = torch.cat(hidden, dim=-1)  # (1, 77, D_l + D_g)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))  # (1, 77, D_t5)
        prompt_embeds = torch.cat([clip_embeds.to(t5_embeds.dtype), t5_embeds.to(t5_embeds.device)], dim=-2)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    # ------------------------------------------------------------------------------------------------- noise
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, scheduler: Any, config: TrainConfig,
                  generator: torch.Generator) -> NoisedLatents:
        noised = super().add_noise(latents, noise, scheduler, config, generator)
        if config.precondition_outputs:
            noised.target = latents  # predict() returns x_t - sigma * v, an estimate of the clean latents
        return noised

    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                batch: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """``(N, C, h, w)`` velocity (or, preconditioned, clean-latent estimate) on the latent grid."""
        dtype = self.denoiser_dtype(denoiser)
        pred = denoiser(
            hidden_states=noised.noisy.to(dtype), timestep=noised.timesteps,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            pooled_projections=text["pooled_prompt_embeds"].to(dtype), return_dict=False,
        )[0]  # (N, C, h, w)
        if config.precondition_outputs:
            sigmas = noised.sigmas.to(pred.dtype)[:, None, None, None]  # (N,) -> (N, 1, 1, 1)
            pred = pred * (-sigmas) + noised.noisy.to(pred.dtype)
        return pred
