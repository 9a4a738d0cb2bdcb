"""persam_dreambooth: DreamBooth that learns the subject, not the background.

Public API::

    from persam_dreambooth import PerSAM, PerSAMF, load_sam
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PerSAM": "persam_dreambooth.segmentation.persam",
    "Segmentation": "persam_dreambooth.segmentation.cascade",
    "PerSAMF": "persam_dreambooth.segmentation.persam_f",
    "load_sam": "persam_dreambooth.segmentation.sam",
    "PerSAMVideo": "persam_dreambooth.segmentation.persam_video",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:  # PEP 562: import torch-heavy modules on first use only
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'persam_dreambooth' has no attribute {name!r}")
