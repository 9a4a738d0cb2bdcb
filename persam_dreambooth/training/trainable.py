"""What training updates: LoRA adapters (or the full weights) on the denoiser and the trained text encoders.

Frozen weights are cast to the run's weight dtype and moved to the device; trained weights stay float32 (LoRA
parameters are created, then upcast with diffusers' ``cast_training_params``: the fix for "Attempting to unscale
FP16 gradients").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import Components
from persam_dreambooth.training.lora import add_denoiser_lora, add_text_encoder_lora

__all__ = ["TrainedModels", "prepare_models", "offload_frozen"]


@dataclass
class TrainedModels:
    """What the optimizer updates.

    Attributes:
        denoiser: the UNet / transformer (always trained). text_encoders: the trained text encoders by component
            name (empty when they are frozen). denoiser_lora / text_encoder_loras: their ``LoraConfig`` (LoRA mode).
    """

    denoiser: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    denoiser_lora: LoraConfig | None = None
    text_encoder_loras: dict[str, LoraConfig] = field(default_factory=dict)

    def modules(self) -> list[torch.nn.Module]:
        """Denoiser first, then the trained text encoders in the family's order."""
        return [self.denoiser, *self.text_encoders.values()]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``, casting only when its dtype differs (diffusers warns on every cast); a
    bitsandbytes-quantized model (QLoRA) is moved, never cast."""
    if getattr(module, "is_quantized", False) or getattr(module, "quantization_config", None) is not None:
        return module.to(device)
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype=dtype)


def offload_frozen(config: TrainConfig, comps: Components) -> None:
    """With ``offload``, the frozen parts the steps no longer use go to the CPU: the text encoders once the prompts
    are precomputed, the VAE once the latents are cached. Validation moves them back for its images."""
    if not config.offload:
        return
    if config.pre_compute_text_embeddings:
        for te in comps.text_encoders.values():
            te.to("cpu")
    if config.cache_latents:
        comps.vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_models(config: TrainConfig, comps: Components, device: torch.device, dtype: torch.dtype) -> TrainedModels:
    """Freeze, cast and move the components; add LoRA or unfreeze for full fine-tuning; gradient checkpointing.

    Text encoders that are trained are those with a LoRA keyword in the family (``text_encoder_lora_kwargs``).
    """
    from diffusers.training_utils import cast_training_params

    family = comps.family
    trained_te = [n for n in comps.text_encoders if n in family.text_encoder_lora_kwargs] \
        if config.train_text_encoder else []
    _place(comps.vae, device, dtype)
    if config.train_mode == "lora":
        _place(comps.denoiser, device, dtype)
        for te in comps.text_encoders.values():
            _place(te, device, dtype)
        denoiser_lora = add_denoiser_lora(comps.denoiser, config.rank, config.lora_alpha, config.lora_dropout,
                                          family.resolved_lora_targets(config))
        te_loras = {name: add_text_encoder_lora(comps.text_encoders[name], config.rank, config.lora_alpha,
                                                config.lora_dropout, family.resolved_text_encoder_lora_targets(config))
                    for name in trained_te}
        trained = TrainedModels(comps.denoiser, {n: comps.text_encoders[n] for n in trained_te}, denoiser_lora,
                                te_loras)
        cast_training_params(trained.modules(), torch.float32)
    else:
        _place(comps.denoiser, device, torch.float32).requires_grad_(True)
        for name, te in comps.text_encoders.items():
            if name in trained_te:
                _place(te, device, torch.float32).requires_grad_(True)
            else:
                _place(te, device, dtype)
        trained = TrainedModels(comps.denoiser, {n: comps.text_encoders[n] for n in trained_te})
    if config.gradient_checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
        for te in trained.text_encoders.values():
            # transformers 5 renamed it; the old name still works on 4.x
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()
    return trained
