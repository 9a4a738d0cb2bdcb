"""FLUX.1 [dev] and [schnell]: ``FluxPipeline``, as diffusers' ``train_dreambooth_lora_flux.py``.

* Text: CLIP-L's pooled output and T5's last hidden state (``max_sequence_length``, default 512); text ids are
  zeros ``(L, 3)``.
* Latents ``(z - shift) * scaling`` (16 channels) packed into 2x2 patches, tokens ``(N, h/2 * w/2, 64)`` with
  image ids ``(0, i, j)``; the prediction is unpacked back to ``(N, C, h, w)`` before the loss, so the loss grid is
  the latent grid and the mask needs no packing (resolution multiple: VAE factor 8 x packing 2 = 16).
* [dev] is guidance-distilled (``guidance_embeds``): the transformer gets ``guidance_scale`` (default 3.5) every
  step; [schnell] has no guidance embedding and gets none.
* Flow matching, ``weighting_scheme`` default ``none``; the transformer's timestep is ``t / 1000``.
* LoRA on attention and feed-forward projections of the double-stream blocks; ``train_text_encoder`` adds LoRA to
  CLIP (never T5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from persam_dreambooth.training.families.base import BaseModelInfo, NoisedLatents, TextConditioning, token_length
from persam_dreambooth.training.families.flow import FlowMatchingFamily
from persam_dreambooth.training.families.packing import flux1_pack, flux1_unpack

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["FluxFamily", "flux_image_ids"]


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of the packed tokens of an ``height x width`` latent grid: ``(h/2 * w/2, 3)`` rows
    ``(0, i, j)``, row-major, the order of :func:`~.packing.flux1_pack`."""
    ii, jj = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")  # (h/2, w/2) each
    ids = torch.stack([torch.zeros_like(ii), ii, jj], dim=-1)  # (h/2, w/2, 3)
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)  # (h/2 * w/2, 3)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    title = "FLUX.1"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_class_name = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    lora_target_modules = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    text_encoder_lora_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")
    text_encoder_lora_kwargs = {"text_encoder": "text_encoder_lora_layers"}
    patch_size = 2
    default_weighting_scheme = "none"
    default_max_sequence_length = 512
    default_guidance_scale = 3.5
    default_validation_guidance_scale = 3.5  # FluxPipeline's default (FLUX.1 [dev]; [schnell] ignores it)
    reads_guidance_embeds = True  # True for [dev] (guidance-distilled), False for [schnell]

    # ---------------------------------------------------------------------------------------------------- text
    def tokenize(self, comps, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """``input_ids`` (CLIP, ``(1, 77)``) and ``input_ids_2`` (T5, ``(1, max_sequence_length)``)."""
        clip_tok = comps.tokenizers["tokenizer"]
        length = token_length(clip_tok, comps.text_encoders["text_encoder"])
        clip_ids = clip_tok(prompt, padding="max_length", max_length=length, truncation=True,
                            return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        t5_ids = comps.tokenizers["tokenizer_2"](
            prompt, padding="max_length", max_length=self.max_sequence_length(config), truncation=True,
            return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        return {"input_ids": clip_ids, "input_ids_2": t5_ids}

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``prompt_embeds (1, L_t5, D_t5)`` and ``pooled_prompt_embeds (1, D_clip)``."""
        clip = text_encoders["text_encoder"]
        pooled = clip(tokens["input_ids"].to(clip.device), output_hidden_states=False).pooler_output  # (1, D)
        t5 = text_encoders["text_encoder_2"]
        prompt_embeds = t5(tokens["input_ids_2"].to(t5.device), output_hidden_states=False)[0]  # (1, L, D_t5)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------------------------------- the prediction
    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                batch: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """Pack ``(N, C, h, w)`` into 2x2-patch tokens, run the transformer, unpack to ``(N, C, h, w)``."""
        dtype = self.denoiser_dtype(denoiser)
        noisy = noised.noisy
        n, _, h, w = noisy.shape
        packed = flux1_pack(noisy.to(dtype))  # (N, C, h, w) -> (N, h/2 * w/2, 4C)
        img_ids = flux_image_ids(h, w, noisy.device, dtype)  # (h/2 * w/2, 3)
        prompt_embeds = text["prompt_embeds"].to(dtype)  # (N, L, D)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=dtype)  # (L, 3)
        guidance = self.guidance(config, info, n, noisy.device)  # (N,) or None
        pred = denoiser(
            hidden_states=packed, timestep=noised.timesteps / 1000, guidance=guidance,
            pooled_projections=text["pooled_prompt_embeds"].to(dtype), encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]  # (N, h/2 * w/2, 4C)
        return flux1_unpack(pred, h, w)  # (N, C, h, w)
