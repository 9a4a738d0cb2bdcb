"""FLUX.2 [klein]: ``Flux2KleinPipeline``, as diffusers' ``train_dreambooth_lora_flux2_klein.py``.

What it is (diffusers 0.42): ``Flux2Transformer2DModel`` (double- and single-stream blocks, fused
``to_qkv_mlp_proj`` in the single blocks, 4-axis rope), ``AutoencoderKLFlux2`` (32 latent channels, a batch norm
whose running statistics normalise the 2x2-patchified latents), one ``Qwen3ForCausalLM`` text encoder with the
``Qwen2TokenizerFast`` chat template, ``FlowMatchEulerDiscreteScheduler``. No guidance embedding (the distilled
klein checkpoints are step-distilled, not guidance-distilled); with ``guidance_embeds`` in the config the
transformer gets ``guidance_scale``.

* Text: the prompt in the chat template (``enable_thinking=False``), ``max_sequence_length`` tokens (default 512),
  the hidden states of ``text_encoder_out_layers`` (default (9, 18, 27), the pipeline's) stacked on features:
  ``(1, L, 3 D)``; text ids ``(0, 0, 0, l)``.
* Latents: the posterior's mode (as the script), patchified 2x2 to ``(N, 4C, h/2, w/2)``, normalised by the batch
  norm's running mean and ``sqrt(var + eps)``. The noise, the target and the loss live on that patchified grid:
  loss-grid factor = VAE factor x 2 (16 for the real model), and the mask is area-averaged to it, so every loss
  position is one transformer token. Tokens are the grid flattened row-major with ids ``(0, i, j, 0)``.
* Flow matching, ``weighting_scheme`` default ``none``; the transformer's timestep is ``t / 1000``.
* LoRA (the script's defaults): ``to_k``, ``to_q``, ``to_v``, ``to_out.0`` in every block, ``to_qkv_mlp_proj``
  and ``single_transformer_blocks.{i}.attn.to_out`` of the single blocks. No text-encoder training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from persam_dreambooth.training.families.base import BaseModelInfo, NoisedLatents, TextConditioning
from persam_dreambooth.training.families.flow import FlowMatchingFamily, normalize_channels, tokenize_chat
from persam_dreambooth.training.families.packing import grid_to_tokens, patchify_2x2, tokens_to_grid

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig

__all__ = ["Flux2KleinFamily", "DEFAULT_TEXT_ENCODER_OUT_LAYERS"]

#: Qwen3 hidden states stacked into the prompt embedding (``Flux2KleinPipeline.encode_prompt``'s default).
DEFAULT_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)


def flux2_grid_ids(height: int, width: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Ids ``(t, i, j, l) = (0, i, j, 0)`` of the tokens of an ``height x width`` grid: ``(N, h * w, 4)``."""
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")  # (h, w) each
    zeros = torch.zeros_like(ii)
    ids = torch.stack([zeros, ii, jj, zeros], dim=-1).reshape(1, height * width, 4)  # (1, h * w, 4)
    return ids.expand(batch_size, -1, -1).to(device)


def flux2_text_ids(length: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Ids ``(0, 0, 0, l)`` of ``length`` text tokens: ``(N, L, 4)``."""
    ids = torch.zeros(1, length, 4, dtype=torch.long)
    ids[0, :, 3] = torch.arange(length)
    return ids.expand(batch_size, -1, -1).to(device)


class Flux2KleinFamily(FlowMatchingFamily):
    name = "flux2_klein"
    title = "FLUX.2 [klein]"
    pipeline_class_names = ("Flux2KleinPipeline",)
    pipeline_class_name = "Flux2KleinPipeline"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    #: The script's defaults, less ``single_transformer_blocks.{i}.attn.to_out`` which
    #: :meth:`resolved_lora_targets` adds for every single block the model has.
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")
    patch_size = 2
    default_weighting_scheme = "none"
    default_max_sequence_length = 512
    default_guidance_scale = 3.5
    default_validation_guidance_scale = 4.0  # Flux2KleinPipeline's default (non-distilled)
    latents_from_mode = True  # the script's choice
    reads_guidance_embeds = True

    def resolved_lora_targets(self, config: TrainConfig) -> list[str]:
        """The config's ``lora_target_modules``, or the script's defaults: the attention projections,
        ``to_qkv_mlp_proj`` and the output projection of each single-stream block (the script lists indices 0-23,
        which PEFT skips where a smaller model has fewer blocks; here they come from the transformer config, so
        every name exists)."""
        if config.lora_target_modules:
            return list(config.lora_target_modules)
        from persam_dreambooth.training.families.base import ModelFiles

        cfg = ModelFiles(config.pretrained_model_name_or_path, config.revision).read_json("config.json", "transformer")
        singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(int(cfg.get("num_single_layers", 0)))]
        return [*self.lora_target_modules, *singles]

    def text_encoder_out_layers(self, config: TrainConfig) -> tuple[int, ...]:
        layers = config.text_encoder_out_layers
        return tuple(layers) if layers else DEFAULT_TEXT_ENCODER_OUT_LAYERS

    # -------------------------------------------------------------------------------------------- inspection
    def loss_patch_factor(self) -> int:
        return 2  # the loss is taken on the patchified grid

    def loss_channels(self, vae_cfg: dict[str, Any], transformer_cfg: dict[str, Any]) -> int:
        return 4 * int(vae_cfg.get("latent_channels", 32))

    def check_config(self, config: TrainConfig, info: BaseModelInfo) -> None:
        super().check_config(config, info)
        from persam_dreambooth.training.families.base import ModelFiles

        layers = self.text_encoder_out_layers(config)
        te_cfg = ModelFiles(info.name_or_path, config.revision).read_json("config.json", "text_encoder")
        available = int(te_cfg.get("num_hidden_layers", 0))
        bad = [k for k in layers if not 0 <= int(k) <= available]
        if bad:
            raise ValueError(
                f"`text_encoder_out_layers` {list(layers)} names hidden states {bad} that the text encoder of "
                f"{info.name_or_path!r} does not have (it has {available} layers: indices 0..{available})."
            )

    def loaded_info(self, info: BaseModelInfo, vae: torch.nn.Module) -> BaseModelInfo:
        """Adds the VAE's batch-norm statistics (weights, not config): ``latents_bn_mean`` / ``latents_bn_std``
        as lists of ``4C`` floats."""
        info = super().loaded_info(info, vae)
        eps = float(vae.config.batch_norm_eps)
        mean = vae.bn.running_mean.detach().float().cpu()
        std = torch.sqrt(vae.bn.running_var.detach().float().cpu() + eps)
        return dataclasses.replace(info, extra={**info.extra, "latents_bn_mean": mean.tolist(),
                                                "latents_bn_std": std.tolist()})

    # ---------------------------------------------------------------------------------------------------- text
    def tokenize(self, comps, prompt: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        """The chat-templated prompt: ``input_ids`` and ``attention_mask`` ``(1, max_sequence_length)``."""
        return tokenize_chat(comps.tokenizers["tokenizer"], prompt, self.max_sequence_length(config),
                             enable_thinking=False)

    def encode_text(self, text_encoders: Mapping[str, torch.nn.Module], tokens: Mapping[str, torch.Tensor],
                    config: TrainConfig) -> TextConditioning:
        """``prompt_embeds (1, L, k * D)``: the ``k`` chosen hidden states side by side per token."""
        encoder = text_encoders["text_encoder"]
        out = encoder(input_ids=tokens["input_ids"].to(encoder.device),
                      attention_mask=tokens["attention_mask"].to(encoder.device),
                      output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers(config)], dim=1)
        b, k, length, d = stacked.shape  # (1, k, L, D)
        return {"prompt_embeds": stacked.permute(0, 2, 1, 3).reshape(b, length, k * d)}  # (1, L, k * D)

    # ------------------------------------------------------------------------------------------------- latents
    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator,
                       info: BaseModelInfo) -> torch.Tensor:
        """``(B, 2C, h', w')`` -> ``(B, 4C, h'/2, w'/2)``: posterior mode, 2x2 patchify, batch-norm statistics.

        The mode is deterministic (the diffusers script's choice), so ``generator`` draws nothing here.
        """
        if "latents_bn_mean" not in info.extra:
            raise ValueError(
                "FLUX.2 latents need the VAE's batch-norm statistics: pass the BaseModelInfo of the loaded "
                "Components (comps.info) to sample_latents."
            )
        latents = patchify_2x2(self.posterior_latents(posterior, generator))  # (B, C, h', w') -> (B, 4C, h, w)
        return normalize_channels(latents, info.extra["latents_bn_mean"], info.extra["latents_bn_std"])

    # ------------------------------------------------------------------------------------------- the prediction
    def predict(self, denoiser: torch.nn.Module, noised: NoisedLatents, text: TextConditioning,
                batch: Mapping[str, torch.Tensor], config: TrainConfig, info: BaseModelInfo) -> torch.Tensor:
        """Flatten the patchified grid ``(N, 4C, h, w)`` into tokens, run the transformer, fold back."""
        dtype = self.denoiser_dtype(denoiser)
        noisy = noised.noisy
        n, _, h, w = noisy.shape
        tokens = grid_to_tokens(noisy.to(dtype))  # (N, 4C, h, w) -> (N, h * w, 4C)
        prompt_embeds = text["prompt_embeds"].to(dtype)  # (N, L, k * D)
        guidance = self.guidance(config, info, n, noisy.device)  # (N,) or None
        pred = denoiser(
            hidden_states=tokens, timestep=noised.timesteps / 1000, guidance=guidance,
            encoder_hidden_states=prompt_embeds, txt_ids=flux2_text_ids(prompt_embeds.shape[1], n, noisy.device),
            img_ids=flux2_grid_ids(h, w, n, noisy.device), return_dict=False,
        )[0]  # (N, h * w, 4C)
        return tokens_to_grid(pred[:, : h * w], h, w)  # (N, 4C, h, w)

    def pipeline_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length(config),
                "text_encoder_out_layers": self.text_encoder_out_layers(config)}

    def generation_kwargs(self, run_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """``max_sequence_length`` and ``text_encoder_out_layers`` the run trained with (else the defaults)."""
        layers = (run_config or {}).get("text_encoder_out_layers") or DEFAULT_TEXT_ENCODER_OUT_LAYERS
        return {**super().generation_kwargs(run_config), "text_encoder_out_layers": [int(k) for k in layers]}

    def validation_guidance_scale(self, config: TrainConfig, info: BaseModelInfo) -> float | None:
        """``validation_guidance_scale``, or the pipeline's default: 4.0, or 1.0 (no guidance) for the step-distilled
        checkpoints (``is_distilled`` in ``model_index.json``), which ignore guidance."""
        if config.validation_guidance_scale is not None:
            return float(config.validation_guidance_scale)
        from persam_dreambooth.training.families.base import ModelFiles

        distilled = ModelFiles(info.name_or_path, config.revision).model_index().get("is_distilled", False)
        return 1.0 if distilled else self.default_validation_guidance_scale
