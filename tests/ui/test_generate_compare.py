"""Generate (the LoRA beside its base model, same seeds) and compare (report.html shown in the page) through the
real ``persam-dreambooth generate`` / ``compare`` subprocesses, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.ui import generation
from persam_dreambooth.ui.app import Controller
from persam_dreambooth.ui.engine import Engine
from persam_dreambooth.ui.project import Project, ProjectError


@pytest.fixture
def trained_project(project_dir, ui_models) -> Project:
    """A project with 3 photos, models/clip, models/dino and two trained tiny LoRA runs (masked, vanilla)."""
    project = Project(project_dir)
    tiny.write_instance_dir(project.photos, n=3)
    base = project.root / "models" / "tiny-sd"
    masks = {p.stem: np.ones((48, 64), bool) for p in project.photos.iterdir()}
    tiny.save_tiny_lora_run(project.runs / "masked", base, seed=1, masks=masks,
                            config={"instance_prompt": "a photo of sks dog", "mask_source": "dir"})
    tiny.save_tiny_lora_run(project.runs / "vanilla", base, seed=2,
                            config={"instance_prompt": "a photo of sks dog", "mask_source": "none"})
    tiny.save_tiny_clip(project.root / "models" / "clip")
    tiny.save_tiny_dino(project.root / "models" / "dino")
    return project


def test_generate_gives_lora_and_base_images_with_the_same_seed(trained_project):
    assert generation.trained_runs(trained_project) == ["masked", "vanilla"]
    lora, base, folder = generation.generate(trained_project, "masked", "a photo of sks dog", num_images=1,
                                             steps=2, seed=3, with_base=True)
    assert len(lora) == 1 and len(base) == 1 and folder.startswith("runs/masked/samples/")
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (lora[0], base[0]))
    assert a.shape == b.shape and np.abs(a - b).max() > 0  # the LoRA changes the picture
    for path in (*lora, *base):
        assert trained_project.root in path.parents


def test_generate_reports_a_cli_error_as_a_message(trained_project):
    with pytest.raises(ProjectError, match="images per prompt must be an integer in"):
        generation.generate(trained_project, "masked", "a dog", num_images=0)
    with pytest.raises(ProjectError, match="prompts: enter at least one prompt"):
        generation.generate(trained_project, "masked", "  \n ")


def test_compare_report_is_shown_in_the_page(trained_project, ui_models):
    ctl = Controller(trained_project, Engine("tiny", str(ui_models["sam"]), "cpu"))
    page = ctl.compare_report("masked", "vanilla", "dog", "models/clip", "models/dino", 1, 2, background=False)
    reports = sorted(trained_project.runs.glob("compare-*/report.html"))
    assert len(reports) == 1 and f"runs/{reports[0].parent.name}/report.html" in page
    assert page.count("<iframe") == 1 and "srcdoc=" in page and "&lt;img" in page  # the report, escaped inline
