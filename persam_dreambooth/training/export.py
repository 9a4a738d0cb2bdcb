"""The run's final outputs: LoRA weights or a pipeline folder, the last validation grid, the model card."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from persam_dreambooth.masks.make import GRID_NAME
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.lora import save_lora
from persam_dreambooth.training.model_card import write_model_card

logger = logging.getLogger(__name__)

__all__ = ["save_final", "save_full_pipeline"]


def save_full_pipeline(config: TrainConfig, output_dir: Path, unet: torch.nn.Module,
                       text_encoder: torch.nn.Module | None) -> None:
    """Save the base pipeline with the trained UNet (and text encoder) into ``output_dir``.

    The pipeline is written to a temporary folder first; its parts are then renamed into ``output_dir`` one by
    one, ``model_index.json`` last, so a folder with a ``model_index.json`` is always complete.
    """
    from diffusers import DiffusionPipeline

    extra: dict[str, Any] = {"unet": unet}  # every other part (a safety checker too) comes from the base
    if text_encoder is not None:
        extra["text_encoder"] = text_encoder
    pipe = DiffusionPipeline.from_pretrained(config.pretrained_model_name_or_path, revision=config.revision,
                                             variant=config.variant, **extra)
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=output_dir))
    try:
        pipe.save_pretrained(tmp)
        # an older pipeline's index goes first, so no model_index.json ever sits beside half-replaced parts
        (output_dir / "model_index.json").unlink(missing_ok=True)
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")
        for entry in entries:
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_final(config: TrainConfig, accelerator: Any, output_dir: Path, comps: Any, trained: Any,
               dtype: torch.dtype, seed: int, global_step: int, final_loss: float | None) -> None:
    """Weights, final validation grid and README.md (main process; the others wait)."""
    from persam_dreambooth import __version__
    from persam_dreambooth.training.driver import validate

    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(trained.unet)
    text_encoder = accelerator.unwrap_model(trained.text_encoder) if trained.text_encoder is not None else None
    if accelerator.is_main_process:
        if config.train_mode == "lora":
            path = save_lora(output_dir, unet, text_encoder, trained.unet_lora, trained.text_encoder_lora)
            logger.info("LoRA weights: %s", path)
        else:
            save_full_pipeline(config, output_dir, unet, text_encoder)
            logger.info("Pipeline: %s", output_dir)
    final = None
    if config.validation_prompt:
        final = validate(config, accelerator, comps, trained.unet, trained.text_encoder, dtype, seed, output_dir,
                         "final", global_step)
    if accelerator.is_main_process:
        validation = [p.relative_to(output_dir).as_posix() for p in _step_grids(output_dir, global_step)]
        if final is not None:
            validation.append(final.relative_to(output_dir).as_posix())
        grid = output_dir / "masks" / GRID_NAME
        write_model_card(
            output_dir, config, global_step=global_step,
            masks_grid=grid.relative_to(output_dir).as_posix() if config.uses_masks and grid.is_file() else None,
            validation_images=validation, version=__version__, final_loss=final_loss,
        )


def _step_grids(output_dir: Path, last_step: int) -> list[Path]:
    """The ``validation/step-N.png`` grids of this run (also those written before a resume), by step."""
    found = []
    for path in (output_dir / "validation").glob("step-*.png"):
        step = path.stem.removeprefix("step-")
        if step.isdigit() and int(step) <= last_step:
            found.append((int(step), path))
    return [path for _, path in sorted(found)]
