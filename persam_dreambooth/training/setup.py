"""Building blocks of the trainer: accelerator, model preparation (LoRA / full, dtypes), data, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from persam_dreambooth.training.components import Components
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.dataset import (
    CachedLatentsDataset,
    DreamBoothDataset,
    EpochSampler,
    collate_examples,
)
from persam_dreambooth.training.lora import add_text_encoder_lora, add_unet_lora

logger = logging.getLogger(__name__)

__all__ = ["make_accelerator", "weight_dtype_of", "TrainedModels", "prepare_models", "build_dataset",
           "cache_latents", "make_optimizer", "make_dataloader", "steps_per_epoch"]


def make_accelerator(config: TrainConfig, output_dir: Path) -> Any:
    """An ``Accelerator`` with the run's accumulation, precision (None = the launcher's) and tracker."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, ProjectConfiguration

    # accelerate keeps its state per process. After an earlier in-process run (a notebook, a sweep), a new
    # Accelerator would silently keep that run's mixed precision (or refuse another explicit one), so a single-process
    # state made for other settings is dropped. Under `accelerate launch` nothing is initialised yet.
    state = AcceleratorState._shared_state
    wanted = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if state and state.get("distributed_type") == DistributedType.NO and state.get("_mixed_precision") != wanted:
        logger.info("Resetting accelerate's state (mixed precision %s -> %s)", state.get("_mixed_precision"), wanted)
        AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
    )


def weight_dtype_of(accelerator: Any) -> torch.dtype:
    """The dtype of frozen weights: half precision under fp16/bf16 mixed precision, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class TrainedModels:
    """What the optimizer updates: the UNet (always), the text encoder (when trained), their LoRA configs."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    unet_lora: Any = None
    text_encoder_lora: Any = None

    def parameters(self) -> list[torch.nn.Parameter]:
        models = [self.unet] + ([self.text_encoder] if self.text_encoder is not None else [])
        return [p for m in models for p in m.parameters() if p.requires_grad]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``, casting only when its dtype differs (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype=dtype)


def prepare_models(config: TrainConfig, comps: Components, device: torch.device, dtype: torch.dtype) -> TrainedModels:
    """Freeze, cast and move the components; add LoRA or unfreeze for full fine-tuning.

    Frozen weights go to ``dtype``; trained weights stay float32 (LoRA parameters are created, then upcast with
    ``cast_training_params``: the fix for "Attempting to unscale FP16 gradients").
    """
    from diffusers.training_utils import cast_training_params

    _place(comps.vae, device, dtype)
    if config.train_mode == "lora":
        _place(comps.unet, device, dtype)
        _place(comps.text_encoder, device, dtype)
        unet_lora = add_unet_lora(comps.unet, config.rank, config.lora_alpha, config.lora_dropout,
                                  config.lora_target_modules)
        te_lora = None
        if config.train_text_encoder:
            te_lora = add_text_encoder_lora(comps.text_encoder, config.rank, config.lora_alpha, config.lora_dropout,
                                            config.text_encoder_lora_target_modules)
        trained = TrainedModels(comps.unet, comps.text_encoder if config.train_text_encoder else None,
                                unet_lora, te_lora)
        cast_training_params([m for m in (trained.unet, trained.text_encoder) if m is not None], torch.float32)
    else:
        _place(comps.unet, device, torch.float32).requires_grad_(True)
        if config.train_text_encoder:
            _place(comps.text_encoder, device, torch.float32).requires_grad_(True)
        else:
            _place(comps.text_encoder, device, dtype)
        trained = TrainedModels(comps.unet, comps.text_encoder if config.train_text_encoder else None)
    if config.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if trained.text_encoder is not None:
            # transformers 5 renamed it; the old name still works on 4.x
            enable = getattr(trained.text_encoder, "activation_checkpointing_enable", None) or \
                trained.text_encoder.gradient_checkpointing_enable
            enable()
    return trained


def build_dataset(
    config: TrainConfig, instance_images: list[Path], mask_files: list[Path] | None, class_images: list[Path] | None,
    latent_hw: tuple[int, int], seed: int,
) -> DreamBoothDataset:
    return DreamBoothDataset(
        instance_images, mask_files, resolution=config.resolution, latent_hw=latent_hw,
        center_crop=config.center_crop, random_flip=config.random_flip, seed=seed,
        mask_dilate_px=config.mask_dilate_px, mask_feather_px=config.mask_feather_px, class_images=class_images,
    )


@torch.no_grad()
def cache_latents(
    dataset: DreamBoothDataset, vae: torch.nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype,
) -> CachedLatentsDataset:
    """Encode every distinct instance (and class) image once; keep the posteriors ``(N, 2C, h, w)`` on the CPU."""

    def encode(pixels: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i in range(0, len(pixels), batch_size):
            chunk = torch.stack(pixels[i: i + batch_size]).to(device, dtype)  # (b, 3, H, W)
            out.append(vae.encode(chunk).latent_dist.parameters.cpu())  # (b, 2C, h, w)
        return torch.cat(out)

    instance = [dataset.instance_item(k, None) for k in range(dataset.num_instance_images)]
    instance_dists = encode([item["instance_pixel_values"] for item in instance])
    instance_masks = torch.stack([item["instance_latent_mask"] for item in instance])  # (N, 1, h, w)
    class_dists = None
    if dataset.with_class_images:
        class_dists = encode([dataset.class_item(j, None)["class_pixel_values"]
                              for j in range(len(dataset.class_images))])
    logger.info("Cached %d instance and %d class latents", len(instance_dists),
                0 if class_dists is None else len(class_dists))
    return CachedLatentsDataset(dataset, instance_dists, instance_masks, class_dists)


def make_dataloader(config: TrainConfig, dataset: Any, seed: int) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset, batch_size=config.train_batch_size, sampler=sampler, collate_fn=collate_examples,
        num_workers=config.dataloader_num_workers,
    )
    return loader, sampler


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch: accelerate syncs at the end of each epoch, so a partial accumulation counts."""
    return math.ceil(num_batches / gradient_accumulation_steps)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], learning_rate: float) -> Any:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam``."""
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`.") from exc
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
