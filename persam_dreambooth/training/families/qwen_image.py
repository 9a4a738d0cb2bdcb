"""Qwen-Image: ``QwenImagePipeline``, as diffusers' ``train_dreambooth_lora_qwen_image.py``.

* Text: the prompt in the pipeline's system template, the last hidden state of ``Qwen2_5_VLForConditionalGeneration``
  without the template's first 34 tokens, ``max_sequence_length`` tokens at most (default 512). Kept padded to
  ``max_sequence_length`` with its mask (``prompt_embeds (1, L, D)``, ``prompt_mask (1, L)``) so instance and class
  prompts concatenate; :meth:`predict` cuts the batch to its longest prompt, as the pipeline pads a batch.
* Latents: ``AutoencoderKLQwenImage`` is a video VAE: images go in as one frame ``(B, 3, 1, H, W)`` and the
  cacheable posterior is stored without the frame axis ``(B, 2C, h, w)``; a posterior sample normalised per channel
  with the config's ``latents_mean`` / ``latents_std``. VAE scale factor ``2 ** len(temperal_downsample)`` (8).
* FLUX.1's 2x2 packing (tokens ``(N, h/2 * w/2, 4C)``, ``img_shapes`` ``(1, h/2, w/2)``), timestep ``t / 1000``; the
  prediction is unpacked to the latent grid before the loss (resolution multiple 8 x 2 = 16).
* Flow matching, ``weighting_scheme`` default ``none``; LoRA on ``to_k``, ``to_q``, ``to_v``, ``to_out.0``; no
  text-encoder training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from persam_dreambooth.training.families.base import BaseModelInfo, ModelFiles, NoisedLatents, TextConditioning
from persam_dreambooth.training.families.flow import FlowMatchingFamily, normalize_channels
from persam_dreambooth.training.families.packing import flux1_pack, flux1_unpack

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["QwenImageFamily", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_DROP"]

#: ``QwenImagePipeline.prompt_template_encode`` and the number of its leading tokens dropped from the embedding.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34


class QwenImageFamily(FlowMatchingFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_class_names = ("QwenImagePipeline",)
    pipeline_class_name = "QwenImagePipeline"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    patch_size = 2
    default_weighting_scheme = "none"
    default_max_sequence_length = 512
    #: QwenImagePipeline's default: no guidance_scale (it is only for guidance-distilled transformers).
    default_validation_guidance_scale = None
    reads_guidance_embeds = True

    # -------------------------------------------------------------------------------------------- inspection
    def vae_scale_factor(self, vae_cfg: dict[str, Any]) -> int:
        return 2 ** len(vae_cfg.get("temperal_downsample", [False, True, True]))

    def loss_channels(self, vae_cfg: dict[str, Any], transformer_cfg: dict[str, Any]) -> int:
        return int(vae_cfg.get("z_dim", 16))

    def check_vae(self, vae_files: ModelFiles, info: BaseModelInfo) -> None:
        """The replacement must be a Qwen-Image VAE with the same latent channels and down-sampling."""
        vae_cfg = vae_files.read_json("config.json", subfolder=None)
        for key in ("z_dim", "temperal_downsample"):
            theirs, ours = vae_cfg.get(key), info.vae_config.get(key)
            if key == "temperal_downsample" and theirs is not None:
                theirs, ours, key = len(theirs), len(ours or ()), "number of down-sampling stages (the scale factor)"
            if theirs != ours:
                raise ValueError(
                    f"`pretrained_vae_model_name_or_path` {vae_files.name_or_path!r} does not match the base model "
                    f"{info.name_or_path!r}: {key} is {theirs!r}, the base model's VAE has {ours!r}."
                )

    # ---------------------------------------------------------------------------------------------------- text
    def tokenize(self, comps, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """The templated prompt, ``(1, PROMPT_TEMPLATE_DROP + max_sequence_length)`` ids and attention mask."""
        length = PROMPT_TEMPLATE_DROP + self.max_sequence_length(config)
        inputs = comps.tokenizers["tokenizer"](PROMPT_TEMPLATE.format(prompt), max_length=length,
                                               padding="max_length", truncation=True, return_tensors="pt")
        return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``prompt_embeds (1, L, D)`` (zeros after the prompt) and ``prompt_mask (1, L)``, ``L`` =
        ``max_sequence_length``. The encoder is causal, so right padding leaves the prompt's states unchanged."""
        encoder = text_encoders["text_encoder"]
        mask = tokens["attention_mask"].to(encoder.device)
        hidden = encoder(input_ids=tokens["input_ids"].to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-1]  # (1, drop + L, D)
        hidden, mask = hidden[:, PROMPT_TEMPLATE_DROP:], mask[:, PROMPT_TEMPLATE_DROP:]  # (1, L, D), (1, L)
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype), "prompt_mask": mask.long()}

    # ------------------------------------------------------------------------------------------------- latents
    def encode_posterior(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> one-frame video ``(B, 3, 1, H, W)`` -> posterior ``(B, 2C, h, w)`` (frame axis
        dropped, so caching and the dataset see images)."""
        param = next(vae.parameters())
        frames = pixels.to(param.device, param.dtype)[:, :, None]  # (B, 3, H, W) -> (B, 3, 1, H, W)
        return vae.encode(frames).latent_dist.parameters[:, :, 0]  # (B, 2C, 1, h, w) -> (B, 2C, h, w)

    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator,
                       info: BaseModelInfo) -> torch.Tensor:
        """``(B, 2C, h, w)`` -> ``(B, C, h, w)``: a posterior sample, ``(z - latents_mean) / latents_std``."""
        latents = self.posterior_latents(posterior, generator)  # (B, C, h, w)
        return normalize_channels(latents, info.vae_config["latents_mean"], info.vae_config["latents_std"])

    # ------------------------------------------------------------------------------------------- the prediction
    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                batch: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """Pack ``(N, C, h, w)`` into 2x2-patch tokens, run the transformer, unpack to ``(N, C, h, w)``."""
        dtype = self.denoiser_dtype(denoiser)
        noisy = noised.noisy
        n, _, h, w = noisy.shape
        mask = text["prompt_mask"]  # (N, L)
        longest = int(mask.sum(dim=1).max())
        embeds, mask = text["prompt_embeds"][:, :longest].to(dtype), mask[:, :longest]  # the batch's longest prompt
        guidance = self.guidance(config, info, n, noisy.device)  # (N,) or None
        pred = denoiser(
            hidden_states=flux1_pack(noisy.to(dtype)), timestep=noised.timesteps / 1000, guidance=guidance,
            encoder_hidden_states=embeds, encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[(1, h // 2, w // 2)] * n, return_dict=False,
        )[0]  # (N, h/2 * w/2, 4C)
        return flux1_unpack(pred, h, w)  # (N, C, h, w)
