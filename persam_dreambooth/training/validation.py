"""Validation images during training: the base pipeline around the models being trained, a fixed seed, a grid.

Every validation uses the same seed, so successive grids show how the subject emerges. Grids are written as
``OUT/validation/step-NNNNNN.png`` (atomically) and sent to the trackers (tensorboard images, wandb images).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from PIL import Image

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import Components
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.training.trainable import TrainedModels, offload_frozen
from persam_dreambooth.utils.grids import tile_grid
from persam_dreambooth.utils.io import atomic_save_image

logger = logging.getLogger(__name__)

__all__ = ["build_pipeline", "run_validation", "save_and_log", "validate"]


def build_pipeline(config: TrainConfig, comps: Components, modules: dict[str, torch.nn.Module],
                   dtype: torch.dtype) -> DiffusionPipeline:
    """The family's pipeline around the given (trained, unwrapped) modules; the other parts from ``comps``.

    Args:
        modules: components by name that replace the base ones (the denoiser, trained text encoders).
    """
    family = comps.family
    parts: dict[str, object] = {family.denoiser_name: comps.denoiser, "vae": comps.vae, **comps.text_encoders,
                                **comps.tokenizers, **modules}
    pipe = family.pipeline_class().from_pretrained(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant, dtype=dtype,
        **parts, **family.pipeline_overrides(comps, config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_validation(
    pipe: DiffusionPipeline, config: TrainConfig, seed: int, device: torch.device,
    autocast_dtype: torch.dtype | None, call_kwargs: dict[str, object] | None = None,
) -> list[Image.Image]:
    """``num_validation_images`` images of ``validation_prompt`` at ``resolution`` with a fixed seed.

    Args:
        call_kwargs: the family's extra ``pipe(...)`` arguments (:meth:`ModelFamily.validation_call_kwargs`:
            ``guidance_scale``, ``max_sequence_length``...).
    """
    generator = torch.Generator(device).manual_seed(derive_seed(seed, 0xFA11D))
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    images = []
    with autocast, torch.no_grad():
        for _ in range(config.num_validation_images):
            # prompt= by keyword: some pipelines' first argument is not the prompt (Flux2KleinPipeline's is `image`).
            images.append(pipe(
                prompt=config.validation_prompt, num_inference_steps=config.validation_inference_steps,
                generator=generator, height=config.resolution, width=config.resolution, **(call_kwargs or {}),
            ).images[0])
    return images


def save_and_log(images: Sequence[Image.Image], output_dir: Path, name: str, step: int,
                 accelerator: Accelerator) -> Path:
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


def validate(config: TrainConfig, accelerator: Accelerator, comps: Components, trained: TrainedModels,
             dtype: torch.dtype, seed: int, output_dir: Path, name: str, step: int) -> Path | None:
    """Validation images from the models as they are now (main process); their train/eval modes are restored.

    Args:
        trained: the trained modules (prepared or not; they are unwrapped here).
    """
    path = None
    if accelerator.is_main_process:
        modules = {comps.family.denoiser_name: accelerator.unwrap_model(trained.denoiser)}
        modules.update({n: accelerator.unwrap_model(te) for n, te in trained.text_encoders.items()})
        everything = [*modules.values(), *(te for n, te in comps.text_encoders.items() if n not in modules)]
        was_training = [m.training for m in everything]
        for module in everything:
            module.eval()
        # Validation draws from its own generator; the next training step reseeds the global RNG anyway.
        pipe = build_pipeline(config, comps, modules, dtype)
        if config.offload:
            pipe.to(accelerator.device)  # the offloaded text encoders / VAE come back for the images
        images = run_validation(pipe, config, seed, accelerator.device, dtype if dtype != torch.float32 else None,
                                comps.family.validation_call_kwargs(config, comps.info))
        del pipe
        offload_frozen(config, comps)
        path = save_and_log(images, output_dir, name, step, accelerator)
        for module, mode in zip(everything, was_training, strict=True):
            module.train(mode)
    accelerator.wait_for_everyone()
    return path
