"""The run's ``Accelerator`` (accumulation, precision, tracker) and the dtype of its frozen weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["make_accelerator", "weight_dtype_of"]


def make_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    """An ``Accelerator`` with the run's accumulation, precision (None = the launcher's) and tracker."""
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


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights: half precision under fp16/bf16 mixed precision, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
