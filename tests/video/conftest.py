"""Fixtures of the video tests: the tiny SAM as a checkpoint file, synthetic videos written with PyAV."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from persam_dreambooth import testing as tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """The tiny SAM's weights as a file; model type ``tiny`` is registered."""
    tiny.register_tiny_sam()
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny.tiny_sam().state_dict(), path)
    return path
