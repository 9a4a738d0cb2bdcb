"""Reliability of the trainer (issue 10): damaged checkpoints, checks before writing, file modes, the run lock, the
mask review and ``--masks_only``; through ``train()`` and ``persam-dreambooth train`` (exit 2, one line)."""

import csv
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth.config import ConfigError
from persam_dreambooth.training import TrainConfig, train
from persam_dreambooth.training.checkpoint import MANIFEST, resolve_resume
from persam_dreambooth.utils.locks import FolderLockedError, lock_output_dir


def _cli(kwargs, *extra):
    """``persam-dreambooth train`` with ``kwargs`` as flags, in this process; returns its exit code."""
    from persam_dreambooth.cli import main

    flags = []
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return main(["train", *flags, *extra])


def _quiet(capsys):
    capsys.readouterr()  # drop what earlier runs printed (progress bars)


def _files(folder):
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else None


def _one_error_line(capsys, *needles):
    """The run's stderr holds one error line (progress bars aside) and no traceback; it names ``needles``."""
    text = capsys.readouterr().err
    assert "Traceback" not in text
    err = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("persam-dreambooth train: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------- 1, 2: checkpoints
def test_damaged_checkpoints_are_found_latest_falls_back_and_an_explicit_one_is_one_line(train_kwargs, caplog,
                                                                                         capsys):
    out = Path(train_kwargs["output_dir"])
    train(TrainConfig(**{**train_kwargs, "checkpointing_steps": 1}))
    manifest = (out / "checkpoint-2" / MANIFEST).read_text()
    assert '"optimizer.bin"' in manifest and '"sha256"' in manifest and '"random_states_0.pkl"' in manifest
    assert resolve_resume("latest", out) == out / "checkpoint-2"

    _truncate(out / "checkpoint-2" / "optimizer.bin")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", out) == out / "checkpoint-1"
    assert any("checkpoint-2" in r.getMessage() and "optimizer.bin" in r.getMessage() for r in caplog.records)

    before = _files(out)
    _quiet(capsys)
    assert _cli({**train_kwargs, "resume_from_checkpoint": "checkpoint-2"}) == 2
    _one_error_line(capsys, "--resume_from_checkpoint", "checkpoint-2", "damaged", "optimizer.bin")
    assert _files(out) == before

    (out / "checkpoint-1" / "random_states_0.pkl").write_bytes(b"not a pickle")  # altered: the hash says so
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged \(checkpoint-1, checkpoint-2\)"):
        resolve_resume("latest", out)


def test_unreadable_random_states_are_a_loud_warning(train_kwargs, caplog):
    out = Path(train_kwargs["output_dir"])
    train(TrainConfig(**{**train_kwargs, "checkpointing_steps": 1}))
    (out / "checkpoint-1" / "random_states_0.pkl").write_bytes(b"not a pickle")
    (out / "checkpoint-1" / MANIFEST).unlink()  # a checkpoint of an older version: not verifiable
    with caplog.at_level(logging.INFO):
        train(TrainConfig(**{**train_kwargs, "resume_from_checkpoint": "checkpoint-1"}))
    loud = [r for r in caplog.records if "EXACT RESUME IS LOST" in r.getMessage()]
    assert loud and loud[0].levelno == logging.WARNING and "random_states_0.pkl" in loud[0].getMessage()


def test_latest_without_a_checkpoint_says_training_starts_at_step_0(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", tmp_path / "out") is None
    assert any("no checkpoint found" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- 5: checks before writing
def _corrupt_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=95)
    _truncate(path)  # the header reads, the pixels do not decode


def test_a_corrupt_instance_or_class_image_fails_before_anything_is_written(train_kwargs, dreambooth_data, tmp_path,
                                                                           capsys):
    vanilla = {**train_kwargs, "mask_dir": None, "mask_source": "none"}
    _corrupt_jpeg(dreambooth_data["instance"] / "01.jpg")
    with pytest.raises(ValueError, match=r"`--instance_data_dir`: .*01\.jpg' cannot be decoded"):
        train(TrainConfig(**vanilla))
    assert not Path(vanilla["output_dir"]).exists()
    assert _cli(vanilla) == 2
    _one_error_line(capsys, "--instance_data_dir", "01.jpg")
    assert not Path(vanilla["output_dir"]).exists()

    tiny_images = tmp_path / "fine"
    from persam_dreambooth import testing as tiny

    tiny.write_instance_dir(tiny_images, n=2)
    (tmp_path / "class").mkdir()
    _corrupt_jpeg(tmp_path / "class" / "mine.jpg")
    prior = {**vanilla, "instance_data_dir": str(tiny_images), "with_prior_preservation": True,
             "class_data_dir": str(tmp_path / "class"), "class_prompt": "a photo of dog", "num_class_images": 2}
    with pytest.raises(ValueError, match=r"`--class_data_dir`: .*mine\.jpg' cannot be decoded"):
        train(TrainConfig(**prior))
    assert not Path(vanilla["output_dir"]).exists() and _files(tmp_path / "class") == ["mine.jpg"]


# ------------------------------------------------------------------------------------------------ 6: file modes
def test_deliverables_get_the_umask_modes(train_kwargs):
    old = os.umask(0o022)
    try:
        out = train(TrainConfig(**{**train_kwargs, "checkpointing_steps": 1}))
    finally:
        os.umask(old)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    wrong = {}
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o755 if path.is_dir() else 0o644):
            wrong[path.relative_to(out).as_posix()] = oct(mode)
    assert not wrong


# ------------------------------------------------------------------------------------------------- 7: the lock
def test_a_second_run_into_a_folder_in_use_refuses_naming_the_pid(train_kwargs, capsys):
    out = Path(train_kwargs["output_dir"])
    with lock_output_dir(out, "train", "--output_dir"):  # another run holds it (flock: per open file)
        before = _files(out)
        with pytest.raises(FolderLockedError, match=rf"`--output_dir` .* in use .*PID {os.getpid()}"):
            train(TrainConfig(**train_kwargs))
        assert _cli(train_kwargs) == 2
        _one_error_line(capsys, "--output_dir", f"PID {os.getpid()}")
        assert _files(out) == before
    out = train(TrainConfig(**train_kwargs))  # free again; a finished run leaves no lock file
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not list(out.glob(".*"))


# -------------------------------------------------------------------------------------- 10: the mask review
def _table(out):
    with open(out / "masks_table.csv", newline="") as handle:
        return {row["photo"]: row for row in csv.DictReader(handle)}


def _speck(path):
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:12, 10:12] = 255  # 4 px of 3072: coverage 0.0013
    Image.fromarray(mask).save(path)


def test_masks_only_writes_the_masks_and_their_table_and_stops(train_kwargs, capsys):
    assert _cli({**train_kwargs, "masks_only": True}) == 0
    out = Path(train_kwargs["output_dir"])
    assert {"00.png", "01.png", "02.png", "masks.json", "masks_grid.jpg"} <= set(_files(out / "masks"))
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob("checkpoint-*"))
    rows = _table(out)
    assert sorted(rows) == ["00.jpg", "01.jpg", "02.jpg"]
    assert all(0.02 < float(r["coverage"]) < 0.95 and not r["problems"] for r in rows.values())
    assert "Masks:" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="`masks_only`"):
        TrainConfig(**{**train_kwargs, "mask_dir": None, "mask_source": "none", "masks_only": True})


def test_implausible_masks_are_named_and_most_persam_ones_stop_the_run(train_kwargs, dreambooth_data,
                                                                       tiny_sam_checkpoint, caplog, capsys):
    from persam_dreambooth import testing as tiny

    _speck(dreambooth_data["masks"] / "00.png")
    _speck(dreambooth_data["masks"] / "01.png")
    with caplog.at_level(logging.WARNING):  # your own masks (mask_dir): named in a warning, never a stop
        out = train(TrainConfig(**{**train_kwargs, "masks_only": True}))
    warned = [r.getMessage() for r in caplog.records if "Implausible masks" in r.getMessage()]
    assert warned and "00.jpg" in warned[0] and "01.jpg" in warned[0] and "02.jpg" not in warned[0]
    assert _table(out)["01.jpg"]["problems"].startswith("coverage 0.001")

    tiny.register_tiny_sam()  # random weights: its masks are implausible, as a wrong reference's would be
    persam = {**train_kwargs, "mask_dir": None, "reference_image": str(dreambooth_data["instance"] / "00.jpg"),
              "reference_mask": str(dreambooth_data["masks"] / "02.png"), "sam_model_type": "tiny",
              "sam_checkpoint": str(tiny_sam_checkpoint), "output_dir": str(out.parent / "persam")}
    _quiet(capsys)
    assert _cli(persam) == 2
    _one_error_line(capsys, "masks look implausible", "--accept_masks")
    rows = _table(out.parent / "persam")
    assert 2 * sum(bool(r["problems"]) for r in rows.values()) > len(rows)
    assert not (out.parent / "persam" / "pytorch_lora_weights.safetensors").exists()
    assert _cli({**persam, "accept_masks": True}) == 0
    assert (out.parent / "persam" / "pytorch_lora_weights.safetensors").is_file()


def test_an_edited_mask_in_masks_is_picked_up_and_checked_again(train_kwargs, caplog):
    out = train(TrainConfig(**{**train_kwargs, "masks_only": True}))
    assert not _table(out)["02.jpg"]["problems"]
    _speck(out / "masks" / "02.png")  # the user edits one mask of the run's mask set, then reruns with it
    edited = {**train_kwargs, "mask_dir": str(out / "masks"), "masks_only": True}
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(**edited))
    assert any("02.jpg" in r.getMessage() for r in caplog.records if "Implausible masks" in r.getMessage())
    assert float(_table(out)["02.jpg"]["coverage"]) < 0.002
    assert (np.asarray(Image.open(out / "masks" / "02.png")) > 0).sum() == 4


# ------------------------------------------------------------------------------------------------ 8: messages
def test_the_script_prints_a_library_warning_as_one_log_line(train_kwargs, dreambooth_data, monkeypatch, capsys):
    import importlib.util
    import warnings

    from persam_dreambooth.training import loop

    real_step = loop.training_step

    def warning_step(*args, **kwargs):
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", warning_step)
    spec = importlib.util.spec_from_file_location(
        "train_dreambooth_script", Path(__file__).resolve().parents[2] / "train_scripts" / "train_dreambooth.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flags = [f for k, v in train_kwargs.items() for f in (f"--{k}", str(v))]
    with monkeypatch.context() as patch:
        patch.setattr(warnings, "showwarning", warnings.showwarning)  # the script's replacement is undone after
        seen = []
        patch.setattr(logging.getLogger("persam_dreambooth"), "warning", lambda *a: seen.append(a[0] % a[1:]))
        assert script.main(flags) == 0
    assert "a library warning" in seen and "UserWarning" not in capsys.readouterr().err


def test_a_second_train_process_refuses_with_one_line(train_kwargs):
    import subprocess
    import sys

    out = Path(train_kwargs["output_dir"])
    flags = [f for k, v in train_kwargs.items() for f in (f"--{k}", str(v))]
    with lock_output_dir(out, "train", "--output_dir"):
        proc = subprocess.run([sys.executable, "-m", "persam_dreambooth", "train", *flags], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line or "Traceback" in line]
        assert len(errors) == 1 and f"PID {os.getpid()}" in errors[0] and "--output_dir" in errors[0], proc.stderr
        assert _files(out) == [".persam.lock"]


def test_sigkill_between_checkpoints_then_a_damaged_newest_one_still_resumes_to_the_same_weights(train_kwargs,
                                                                                               tmp_path, caplog):
    """kill -9 of a real ``persam-dreambooth train`` process between two checkpoints, then the newest checkpoint
    damaged (truncated ``optimizer.bin``): ``--resume_from_checkpoint latest`` skips it with a warning naming it,
    resumes from the newest intact one and ends on the uninterrupted run's weights."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    common = {**train_kwargs, "max_train_steps": 60, "checkpointing_steps": 10, "random_flip": True}
    straight = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "straight")}))

    killed = tmp_path / "killed"
    flags = []
    for key, value in {**common, "output_dir": str(killed)}.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "persam_dreambooth", "train", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (killed / "checkpoint-20").is_dir():  # checkpoints appear whole (renamed into place)
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-20 within 240 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "pytorch_lora_weights.safetensors").exists(), "killed after the end: nothing to resume"
    steps = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert steps and steps[-1] >= 20 and steps[-1] < 60, steps
    newest = killed / f"checkpoint-{steps[-1]}"
    _truncate(newest / "optimizer.bin")

    with caplog.at_level(logging.WARNING):
        resumed = train(TrainConfig(**{**common, "output_dir": str(killed), "resume_from_checkpoint": "latest"}))
    assert newest.name in caplog.text  # the warning names the damaged checkpoint
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
