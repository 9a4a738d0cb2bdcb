"""The train form: the exact accelerate command, its validation (no path outside the project), progress parsing, and
a real subprocess that is stopped and resumed from its latest checkpoint."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from ui_server import write_photos

from persam_dreambooth.ui import generation, training
from persam_dreambooth.ui.project import Project, ProjectError


@pytest.fixture
def project(project_dir) -> Project:
    project = Project(project_dir)
    write_photos(project.photos, 3)
    for info in project.list_photos():
        mask = np.zeros((256, 320), bool)
        mask[60:180, 80:230] = True
        project.save_mask(info.name, mask)
    return project


def tiny_form(**overrides) -> training.TrainForm:
    values = {"run_name": "r1", "base_model": "models/tiny-sd", "max_train_steps": 2, "resolution": 32,
              "checkpointing_steps": 1, "learning_rate": "1e-3", "validation_prompt": "", "seed": 0}
    values.update(overrides)
    return training.TrainForm(**values)


def test_command_is_the_documented_trainer_with_the_forms_options(project):
    argv, out = training.build_command(project, tiny_form(rank=8, masked=True, validation_prompt="a sks dog"))
    assert argv[:2] == ["accelerate", "launch"] and argv[4].endswith("train_scripts/train_dreambooth.py")
    line = training.display_command(argv)
    for part in [f"--mask_dir {project.masks}", f"--instance_data_dir {project.photos}", "--rank 8",
                 f"--output_dir {out}", "--validation_prompt 'a sks dog'", "--learning_rate 0.001"]:
        assert part in line
    assert out == project.runs / "r1"
    vanilla, _ = training.build_command(project, tiny_form(masked=False))
    assert "--mask_source none" in training.display_command(vanilla) and "--mask_dir" not in vanilla


def test_hub_ids_pass_and_local_models_must_be_inside(project, tmp_path):
    argv, _ = training.build_command(project, tiny_form(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in argv
    (tmp_path / "outside-sd").mkdir()
    (tmp_path / "outside-sd" / "model_index.json").write_text("{}")
    for value in ["../outside-sd", str(tmp_path / "outside-sd"), "/etc", "../../"]:
        with pytest.raises(ProjectError, match="outside the project folder"):
            training.build_command(project, tiny_form(base_model=value))
    with pytest.raises(ProjectError, match="without model_index.json"):
        training.build_command(project, tiny_form(base_model="photos"))


@pytest.mark.parametrize("name", ["../escape", "/tmp/x", "a/b", "..", ""])
def test_run_names_stay_in_runs(project, name):
    with pytest.raises(ProjectError, match="plain name"):
        training.build_command(project, tiny_form(run_name=name))
    with pytest.raises(ProjectError):
        training.stop(project, project.run_dir(name))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_train_steps", "0", "steps must be an integer >= 1"),
    ("learning_rate", "fast", "learning rate must be a positive number"),
    ("train_mode", "dora", "training mode must be one of"),
    ("mixed_precision", "fp8", "mixed precision must be one of"),
    ("instance_prompt", "a\nb", "instance prompt must be one line"),
])
def test_form_values_are_validated(project, field, value, message):
    with pytest.raises(ProjectError, match=message):
        training.build_command(project, tiny_form(**{field: value}))


def test_masked_training_needs_every_mask(project):
    project.mask_path("photo_2.jpg").unlink()
    with pytest.raises(ProjectError, match=r"missing for \['photo_2.jpg'\]"):
        training.build_command(project, tiny_form())


def test_generation_fields_refuse_paths(project):
    for run in ["../r1", "/etc", "r1/../../x"]:
        with pytest.raises(ProjectError):
            generation.generate(project, run, "a photo")
    with pytest.raises(ProjectError, match="no trained weights"):
        generation.generate(project, "r1", "a photo")
    for clip in ["../clip", "/etc"]:
        with pytest.raises(ProjectError):
            generation._model_arg(project, clip, "CLIP model")
    with pytest.raises(ProjectError, match="plain name"):
        generation.compare(project, ["../r1"], "dog", "a/b", "c/d")


def test_progress_is_parsed_from_the_trainers_bar():
    text = ("steps:   0%|          | 0/4 [00:00<?, ?it/s]\rsteps:  25%|██▌       | 1/4 [00:00<00:00, 15.81it/s, "
            "cov=0.08, loss=1.115]\rsteps:  50%|█████     | 2/4 [00:00<00:00, 15.85it/s, cov=0.06, loss=1.372]\n"
            "09:15:52 INFO saving\n")
    assert training.parse_progress(text) == (2, 4, [(1, 1.115), (2, 1.372)])


def test_a_run_survives_the_page_and_stop_kills_its_process_group(project):
    out = project.run_dir("sleepy")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('steps:  50%|#| 1/2 [00:00<00:00, cov=0.1, loss=0.5]', flush=True); time.sleep(60)"
    pid = training.start(project, [sys.executable, "-c", code], out)
    with pytest.raises(ProjectError, match="already training"):
        training.start(project, [sys.executable, "-c", code], out)
    deadline = time.monotonic() + 30
    while training.read_status(out).step != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    status = training.read_status(out)
    assert (status.state, status.step, status.total, status.losses) == ("running", 1, 2, [(1, 0.5)])
    assert os.getsid(pid) == pid  # its own session: closing the page (or the app) does not end it
    assert training.stop(project, out)
    deadline = time.monotonic() + 15
    while training.read_status(out).state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training.read_status(out).state == "stopped"
    with pytest.raises(ProjectError, match="is taken"):
        training.start(project, [sys.executable, "-c", "pass"], out)


@pytest.mark.launch
def test_real_run_stops_and_resumes_from_its_latest_checkpoint(project):
    """``accelerate launch`` for 2 steps (checkpoints at 1 and 2), then Resume with 3 steps: it continues at 2."""
    argv, out = training.build_command(project, tiny_form(max_train_steps=2))
    training.start(project, argv, out)
    deadline = time.monotonic() + 240
    while training.read_status(out).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    first = training.read_status(out)
    assert (first.state, first.step, first.total) == ("finished", 2, 2), (out / training.LOG_FILE).read_text()
    assert (out / "checkpoint-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    argv, _ = training.build_command(project, tiny_form(max_train_steps=3))
    training.start(project, argv, out, resume=True)
    deadline = time.monotonic() + 240
    while training.read_status(out).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    log = (out / training.LOG_FILE).read_text()
    second = training.read_status(out)
    assert (second.state, second.step, second.total) == ("finished", 3, 3), log[-3000:]
    assert "--resume_from_checkpoint latest" in log and "Resuming from" in log and (out / "checkpoint-3").is_dir()
    assert [s for s, _ in second.losses] == [1, 2, 3]  # the curve continues across the resume
