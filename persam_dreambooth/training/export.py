"""The run's final outputs: LoRA weights or a pipeline folder, the last validation grid, the model card."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from persam_dreambooth.masks.make import GRID_NAME
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import Components, ModelFamily
from persam_dreambooth.training.lora import save_lora
from persam_dreambooth.training.model_card import write_model_card
from persam_dreambooth.training.trainable import TrainedModels
from persam_dreambooth.training.validation import validate
from persam_dreambooth.utils.io import fix_permissions

logger = logging.getLogger(__name__)

__all__ = ["save_final", "save_full_pipeline"]


def save_full_pipeline(config: TrainConfig, output_dir: Path, family: ModelFamily,
                       modules: dict[str, torch.nn.Module]) -> None:
    """Save the base pipeline with the trained modules (by component name) into ``output_dir``.

    The pipeline is written to a temporary folder first; its parts are then renamed into ``output_dir`` one by
    one, ``model_index.json`` last, so a folder with a ``model_index.json`` is always complete.
    """
    extra: dict[str, Any] = dict(modules)  # every other part (a safety checker too) comes from the base
    pipe = family.pipeline_class().from_pretrained(config.pretrained_model_name_or_path, revision=config.revision,
                                                   variant=config.variant, **extra)
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=output_dir))
    try:
        pipe.save_pretrained(tmp)
        fix_permissions(tmp)  # mkdtemp's folder is private; its parts get the umask's modes
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


def save_final(config: TrainConfig, accelerator: Accelerator, output_dir: Path, comps: Components,
               trained: TrainedModels, dtype: torch.dtype, seed: int, global_step: int,
               final_loss: float | None) -> None:
    """Weights, final validation grid and README.md (main process; the others wait)."""
    from persam_dreambooth import __version__

    accelerator.wait_for_everyone()
    family = comps.family
    denoiser = accelerator.unwrap_model(trained.denoiser)
    text_encoders = {n: accelerator.unwrap_model(te) for n, te in trained.text_encoders.items()}
    if accelerator.is_main_process:
        if config.train_mode == "lora":
            path = save_lora(output_dir, family, denoiser, text_encoders, trained.denoiser_lora,
                             trained.text_encoder_loras)
            logger.info("LoRA weights: %s", path)
        else:
            modules = {family.denoiser_name: denoiser, **text_encoders}
            if config.pretrained_vae_model_name_or_path:  # the pipeline keeps the VAE it was trained with
                modules["vae"] = comps.vae
            save_full_pipeline(config, output_dir, family, modules)
            logger.info("Pipeline: %s", output_dir)
    final = None
    if config.validation_prompt:
        final = validate(config, accelerator, comps, trained, dtype, seed, output_dir, "final", global_step)
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
