"""Shared data for trainer tests: 3 synthetic subject photos (48x64) with masks, trained at 32 px on tiny SD."""

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny


@pytest.fixture
def dreambooth_data(tmp_path):
    """``{"instance": folder, "masks": folder}`` with ``00.jpg..02.jpg`` and ``00.png..02.png``."""
    masks = tiny.write_instance_dir(tmp_path / "instance", n=3)
    (tmp_path / "masks").mkdir()
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{stem}.png")
    return {"instance": tmp_path / "instance", "masks": tmp_path / "masks"}


@pytest.fixture
def train_kwargs(tiny_sd_dir, dreambooth_data, tmp_path):
    """Keyword arguments of a 2-step masked LoRA run on the tiny model (no tracker, fixed seed)."""
    return {
        "pretrained_model_name_or_path": str(tiny_sd_dir),
        "instance_data_dir": str(dreambooth_data["instance"]),
        "mask_dir": str(dreambooth_data["masks"]),
        "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "out"),
        "resolution": 32,
        "max_train_steps": 2,
        "learning_rate": 1e-2,
        "seed": 0,
        "report_to": "none",
    }


@pytest.fixture
def crash_at_step(monkeypatch):
    """``calls = crash_at_step(n)``: the trainer's ``n``-th training step (counted from now) raises
    ``KeyboardInterrupt``, a simulated crash; every step is counted in ``calls["n"]``, which a test may reset to
    count the steps of a resumed run."""
    from persam_dreambooth.training import loop

    real_step = loop.training_step

    def arm(n: int) -> dict:
        calls = {"n": 0}

        def crash(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated crash")
            return real_step(*args, **kwargs)

        monkeypatch.setattr(loop, "training_step", crash)
        return calls

    return arm
