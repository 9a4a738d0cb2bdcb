"""Masked DreamBooth training on diffusers + accelerate + peft.

Public API::

    from persam_dreambooth.training import TrainConfig, train, masked_diffusion_loss

    out_dir = train(TrainConfig(pretrained_model_name_or_path=..., instance_data_dir=..., instance_prompt=...,
                                output_dir=..., mask_dir=...))

Heavy modules (diffusers, accelerate) are imported on first use of ``train``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from persam_dreambooth.training.config import ConfigError, TrainConfig

_LAZY = {
    "train": "persam_dreambooth.training.recipe",
    "TrainingDivergedError": "persam_dreambooth.training.loop",
    "detect_family": "persam_dreambooth.training.families",
    "masked_diffusion_loss": "persam_dreambooth.training.losses",
    "min_snr_weights": "persam_dreambooth.training.losses",
    "add_train_arguments": "persam_dreambooth.training.args",
    "config_from_args": "persam_dreambooth.training.args",
}

__all__ = ["ConfigError", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'persam_dreambooth.training' has no attribute {name!r}")
