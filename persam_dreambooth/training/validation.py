"""Validation images during training: the base pipeline around the models being trained, a fixed seed, a grid.

Every validation uses the same seed, so successive grids show how the subject emerges. Grids are written as
``OUT/validation/step-NNNNNN.png`` (atomically) and sent to the trackers (tensorboard images, wandb images).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.utils.grids import tile_grid
from persam_dreambooth.utils.io import atomic_save_image

logger = logging.getLogger(__name__)

__all__ = ["build_pipeline", "run_validation", "save_and_log"]


def build_pipeline(
    config: TrainConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module,
    tokenizer: Any, dtype: torch.dtype, device: torch.device,
) -> Any:
    """The base model's pipeline class around the given (trained, unwrapped) modules; other parts from the base."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
        unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, dtype=dtype, **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_validation(
    pipe: Any, config: TrainConfig, seed: int, device: torch.device, autocast_dtype: torch.dtype | None,
) -> list[Image.Image]:
    """``num_validation_images`` images of ``validation_prompt`` at ``resolution`` with a fixed seed."""
    generator = torch.Generator(device).manual_seed(derive_seed(seed, 0xFA11D))
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    images = []
    with autocast, torch.no_grad():
        for _ in range(config.num_validation_images):
            images.append(pipe(
                config.validation_prompt, num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.validation_guidance_scale, generator=generator,
                height=config.resolution, width=config.resolution,
            ).images[0])
    return images


def save_and_log(images: Sequence[Image.Image], output_dir: Path, name: str, step: int, accelerator: Any) -> Path:
    """Write the grid ``output_dir/validation/{name}.png`` and send the images to every tracker."""
    path = output_dir / "validation" / f"{name}.png"
    atomic_save_image(tile_grid(images), path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(img.convert("RGB")) for img in images])  # (N, H, W, 3) uint8
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img) for img in images]}, step=step)
    logger.info("Validation images: %s", path)
    return path
