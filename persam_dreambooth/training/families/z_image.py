"""Z-Image: ``ZImagePipeline``, as diffusers' ``train_dreambooth_lora_z_image.py``.

* Text: the prompt in the Qwen3 chat template (``enable_thinking=True``, as the pipeline), ``max_sequence_length``
  tokens (default 512); the second-to-last hidden state of the non-padding tokens. The conditioning keeps the
  padded ``prompt_embeds (1, L, D)`` and its ``prompt_mask (1, L)``; :meth:`predict` hands the transformer the
  variable-length list it wants.
* Latents: the posterior's mode (as the script), ``(z - shift) * scaling`` (16 channels); the transformer takes a
  list of ``(C, 1, h, w)`` latents, patchifies 2x2 inside and returns latents, so the loss grid is the latent grid
  (resolution multiple: VAE factor 8 x patch 2 = 16).
* Reversed time: the transformer gets ``(1000 - t) / 1000`` and predicts the negated velocity; the target stays
  ``noise - latents``. ``weighting_scheme`` default ``none``.
* LoRA on ``to_k``, ``to_q``, ``to_v``, ``to_out.0``; no text-encoder training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from persam_dreambooth.training.families.base import BaseModelInfo, NoisedLatents, TextConditioning
from persam_dreambooth.training.families.flow import FlowMatchingFamily, tokenize_chat

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["ZImageFamily"]


class ZImageFamily(FlowMatchingFamily):
    name = "z_image"
    title = "Z-Image"
    pipeline_class_names = ("ZImagePipeline",)
    pipeline_class_name = "ZImagePipeline"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    patch_size = 2
    default_weighting_scheme = "none"
    default_max_sequence_length = 512
    default_validation_guidance_scale = 5.0  # ZImagePipeline's default
    latents_from_mode = True  # the script's choice: sample_latents is the posterior's mode, (z - shift) * scaling

    # ---------------------------------------------------------------------------------------------------- text
    def tokenize(self, comps, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """The chat-templated prompt: ``input_ids`` and ``attention_mask`` ``(1, max_sequence_length)``."""
        return tokenize_chat(comps.tokenizers["tokenizer"], prompt, self.max_sequence_length(config),
                             enable_thinking=True)

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``prompt_embeds (1, L, D)`` (second-to-last hidden state) and ``prompt_mask (1, L)`` (1 = a token)."""
        encoder = text_encoders["text_encoder"]
        mask = tokens["attention_mask"].to(encoder.device)
        hidden = encoder(input_ids=tokens["input_ids"].to(encoder.device), attention_mask=mask.bool(),
                         output_hidden_states=True).hidden_states[-2]  # (1, L, D)
        return {"prompt_embeds": hidden, "prompt_mask": mask.long()}

    # ------------------------------------------------------------------------------------------- the prediction
    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                batch: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """The velocity ``(N, C, h, w)``: the transformer's output on lists, negated (it predicts ``x - n``)."""
        dtype = self.denoiser_dtype(denoiser)
        noisy = noised.noisy.to(dtype)
        latents = list(noisy.unsqueeze(2).unbind(0))  # (N, C, h, w) -> N x (C, 1, h, w)
        embeds, mask = text["prompt_embeds"].to(dtype), text["prompt_mask"].bool()  # (N, L, D), (N, L)
        captions = [e[m] for e, m in zip(embeds, mask, strict=True)]  # N x (L_i, D), padding dropped
        out = denoiser(latents, (1000 - noised.timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # N x (C, 1, h, w) -> (N, C, h, w)
