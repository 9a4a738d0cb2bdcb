"""The tiny flow pipelines of the family tests and the config / generator helpers (a plain module, so the test files
import it by a unique name; the fixtures live in ``conftest.py``)."""

from __future__ import annotations

import torch

from persam_dreambooth.testing import flow_families

#: ``id -> (builder, kwargs)``: FLUX.1 [dev] and [schnell] differ by the guidance embedding.
FLOW_PIPELINES = {
    "sd3": (flow_families.save_tiny_sd3, {}),
    "flux_dev": (flow_families.save_tiny_flux, {"guidance_embeds": True}),
    "flux_schnell": (flow_families.save_tiny_flux, {"guidance_embeds": False}),
    "flux2_klein": (flow_families.save_tiny_flux2_klein, {}),
    "z_image": (flow_families.save_tiny_z_image, {}),
    "qwen_image": (flow_families.save_tiny_qwen_image, {}),
}


def flow_config(model_dir, tmp_path, **overrides):
    """A ``TrainConfig`` for the tiny pipeline at 32 px with 48-token T5 / Qwen sequences."""
    from persam_dreambooth.training.config import TrainConfig

    kwargs = {
        "pretrained_model_name_or_path": str(model_dir), "instance_data_dir": str(tmp_path / "instance"),
        "instance_prompt": flow_families.TINY_FLOW_PROMPT, "output_dir": str(tmp_path / "out"),
        "mask_source": "none", "resolution": 32, "max_sequence_length": 48, "seed": 0, "report_to": "none",
    }
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
