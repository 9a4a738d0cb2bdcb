"""Fixtures of the web-app tests: tiny SAM and SD models, and a project folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from persam_dreambooth import testing as tiny


@pytest.fixture(scope="session")
def ui_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SAM weights and a tiny Stable Diffusion folder, built once."""
    root = tmp_path_factory.mktemp("ui-models")
    sam = root / "tiny_sam.pth"
    torch.save(tiny.tiny_sam().state_dict(), sam)
    sd = tiny.save_tiny_sd(root / "tiny-sd")
    tiny.register_tiny_sam()
    return {"sam": sam, "sd": sd}


@pytest.fixture
def project_dir(tmp_path, ui_models) -> Path:
    """A project folder with the tiny SD pipeline under models/ (the train form may only name project folders)."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    shutil.copytree(ui_models["sd"], project / "models" / "tiny-sd")
    return project
