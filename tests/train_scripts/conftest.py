"""Data for the script tests (the trainer's fixtures live in tests/training/conftest.py)."""

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny


@pytest.fixture
def script_data(tmp_path):
    masks = tiny.write_instance_dir(tmp_path / "instance", n=2)
    (tmp_path / "masks").mkdir()
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{stem}.png")
    return tmp_path
