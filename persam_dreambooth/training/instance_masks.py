"""The run's mask set ``OUT/masks/``: copied from ``mask_dir`` or made by PerSAM(-F) before the first step (for
``instance_video`` it was written with the picked frames, :mod:`.instance_video`, and is only read here)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from persam_dreambooth.masks.make import copy_mask_set, make_mask_set
from persam_dreambooth.masks.store import MASKS_JSON, MaskSet
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.preflight import Preflight

logger = logging.getLogger(__name__)

__all__ = ["MASKS_SUBDIR", "prepare_masks"]

MASKS_SUBDIR = "masks"


def _reusable(folder: Path, config: TrainConfig, images: list[Path]) -> bool:
    """A PerSAM mask set from an earlier (interrupted) run of the same reference and method can be reused."""
    if not (folder / MASKS_JSON).is_file():
        return False
    record = MaskSet.read(folder).record
    reference = record.get("reference") or {}
    same = (
        record.get("method") == config.mask_method
        and record.get("sam_model_type") == config.sam_model_type
        and reference.get("image") == str(Path(config.reference_image or "").resolve())
        and reference.get("box") == config.reference_box
        and reference.get("point") == config.reference_point
        and reference.get("mask") == (str(Path(config.reference_mask).resolve()) if config.reference_mask else None)
    )
    return same and all((folder / f"{p.stem}.png").is_file() for p in images)


def prepare_masks(config: TrainConfig, pre: Preflight, accelerator: Accelerator) -> list[Path] | None:
    """Write ``OUT/masks/`` (main process) and return one mask file per instance image, or None for vanilla.

    PerSAM masks are reused when resuming a run whose mask set matches the config (segmentation is deterministic,
    so this only saves time).
    """
    if config.mask_source == "none":
        return None
    folder = pre.output_dir / MASKS_SUBDIR
    if accelerator.is_main_process:
        if config.instance_video:
            pass  # written with the frames by instance_video.select_video_frames
        elif config.mask_source == "dir":
            assert pre.mask_set is not None
            copy_mask_set(pre.instance_images, pre.mask_set, folder)
        elif pre.resume is not None and _reusable(folder, config, pre.instance_images):
            logger.info("Reusing the mask set in %s", folder)
        else:
            logger.info("Segmenting %d instance images with %s: loading SAM (%s) and encoding the reference first "
                        "(a minute or more on a CPU)", len(pre.instance_images), config.mask_method,
                        config.sam_model_type)
            started = time.monotonic()
            make_mask_set(
                pre.instance_images, folder, config.reference_image, reference_mask=config.reference_mask,
                reference_box=config.reference_box, reference_point=config.reference_point,
                method=config.mask_method or "persam", sam_model_type=config.sam_model_type,
                sam_checkpoint=config.sam_checkpoint, device=str(accelerator.device),
            )
            logger.info("Masks written to %s in %.1f s", folder, time.monotonic() - started)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # SAM is gone; give its memory back before the diffusion models load
    accelerator.wait_for_everyone()
    mask_set = MaskSet.read(folder)
    files = []
    for image in pre.instance_images:
        path = mask_set.path_for(image)
        if path is None:  # another process's write failed
            raise FileNotFoundError(f"no mask for {str(image)!r} in {str(folder)!r}")
        files.append(path)
    return files
