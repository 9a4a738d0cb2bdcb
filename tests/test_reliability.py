"""Reliability of every command as a user meets it (issue 10): bad input gives exit code 2, one line that names the
flag, and no new file; two runs into one folder do not both run; warnings are one clean line.

Each case runs ``persam-dreambooth <command> ...`` in a process of its own (:mod:`process_helpers`: one interpreter
imports the package, then forks per case, so the module stays fast), without root's permission overrides, in an
empty working folder. The bad-input cases load no model (their failure must come before that); a few ``segment``
cases (lock, warning, progress) run on the tiny SAM, registered as ``--sam-model tiny``.

Section 1 covers ``segment`` and ``eval-perseg`` plus the parse-time checks of every command (non-finite floats).
Section 2 covers the output folders of the other commands (``train``, ``generate``, ``compare``, ``segment-video``,
``eval-davis``, ``frames``, ``ui``): read-only folders and, for ``train`` and ``generate``, a folder another run
holds. Run it alone with ``-k other``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from process_helpers import CliResult, error_lines, files_under, run_cli_batch

from persam_dreambooth import testing as tiny
from persam_dreambooth.cli import build_parser
from persam_dreambooth.utils.locks import LOCK_NAME, lock_output_dir

NON_FINITE = ("nan", "inf", "-inf")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _float_flags() -> list[tuple[str, str]]:
    """``(command, flag)`` for every option whose values are floats (``float``, ``float | null``...)."""
    found = []
    for command, sub in _subparsers().items():
        for action in sub._actions:
            name = getattr(action.type, "__name__", "")
            if action.option_strings and (action.type is float or "float" in name.split(" | ")):
                found.append((command, action.option_strings[0]))
    return found


FLOAT_FLAGS = _float_flags()


def test_every_command_is_covered_and_float_flags_are_found():
    commands = set(_subparsers())
    assert {"segment", "eval-perseg", "train", "generate", "compare"} <= commands
    found = set(FLOAT_FLAGS)
    for known in [("segment", "--similarity-threshold"), ("segment", "--overlap-iou"),
                  ("eval-perseg", "--dilation-ratio"), ("train", "--learning_rate"), ("generate", "--guidance-scale")]:
        assert known in found, f"{known} was not found among the float flags {sorted(found)}"
    assert set(WRITERS) <= commands and commands - set(WRITERS) == set(), "every command has a read-only case"


def assert_refused(result: CliResult, flag: str, before: list[str], folder: Path, *also: str) -> None:
    """Exit 2, exactly one line (besides argparse's usage) that names ``flag``, and nothing new under ``folder``."""
    shown = f"\n--- argv: {result.argv}\n--- stderr:\n{result.stderr}--- stdout:\n{result.stdout}"
    assert result.returncode == 2, f"exit code {result.returncode}{shown}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, f"{len(lines)} error line(s){shown}"
    assert "Traceback" not in result.stderr and flag in lines[0], shown
    for text in also:
        assert text in lines[0], f"{text!r} missing{shown}"
    assert files_under(folder) == before, f"files were written: {sorted(set(files_under(folder)) - set(before))}"


# ----------------------------------------------------------------------------- inputs shared by the cases (cheap)
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small real inputs: a reference photo and mask, a folder of photos, a PerSeg-layout folder, a tiny SAM file."""
    root = tmp_path_factory.mktemp("inputs")
    image, mask = tiny.synthetic_subject()
    Image.fromarray(image).save(root / "ref.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ref_mask.png")
    tiny.write_instance_dir(root / "photos", n=2)
    for obj in ("dog",):
        (root / "perseg" / "Images" / obj).mkdir(parents=True)
        (root / "perseg" / "Annotations" / obj).mkdir(parents=True)
        for stem in ("00", "01"):
            Image.fromarray(image).save(root / "perseg" / "Images" / obj / f"{stem}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "perseg" / "Annotations" / obj / f"{stem}.png")
    import torch

    tiny.register_tiny_sam()
    torch.save(tiny.tiny_sam().state_dict(), root / "tiny_sam.pth")
    return {"ref": root / "ref.jpg", "ref_mask": root / "ref_mask.png", "photos": root / "photos",
            "perseg": root / "perseg", "sam": root / "tiny_sam.pth", "root": root}


def segment_args(inputs: dict[str, Path], output: str | Path, *extra: str) -> list[str]:
    return ["segment", "--ref-image", str(inputs["ref"]), "--ref-mask", str(inputs["ref_mask"]), "--images",
            str(inputs["photos"]), "--output", str(output), "--device", "cpu", *extra]


def eval_perseg_args(inputs: dict[str, Path], output: str | Path, *extra: str) -> list[str]:
    return ["eval-perseg", "--data", str(inputs["perseg"]), "--output", str(output), "--device", "cpu", *extra]


# ---------------------------------------------------------------------------------- the cases, run as one batch
class Batch:
    """Cases registered by name, each with its own empty working folder; run together on first use."""

    def __init__(self, root: Path, unprivileged: bool = True, case_timeout: float = 120) -> None:
        self.root, self.unprivileged, self.case_timeout = root, unprivileged, case_timeout
        self.cases: dict[str, tuple[list[str], Path]] = {}
        self.before: dict[str, list[str]] = {}
        self.results: dict[str, CliResult] | None = None
        self.held: list[tuple[Path, str]] = []  # (folder, command) locked by this process while the batch runs

    def folder(self, name: str) -> Path:
        path = self.root / name.replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, argv: list[str]) -> None:
        self.cases[name] = (argv, self.folder(name))

    def result(self, name: str) -> tuple[CliResult, Path, list[str]]:
        if self.results is None:
            with contextlib.ExitStack() as stack:
                for folder, command in self.held:
                    stack.enter_context(lock_output_dir(folder, command))
                for case, (_, cwd) in self.cases.items():
                    self.before[case] = files_under(cwd)
                done = run_cli_batch(list(self.cases.values()), unprivileged=self.unprivileged, tiny_sam=True,
                                     case_timeout=self.case_timeout)
            self.results = dict(zip(self.cases, done, strict=True))
        return self.results[name], self.cases[name][1], self.before[name]


def read_only(folder: Path) -> Path:
    """``folder/ro``: an existing folder nobody may write into (modes restored at the end of the module)."""
    ro = folder / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro


@pytest.fixture(scope="module")
def section1(tmp_path_factory, inputs):
    batch = Batch(tmp_path_factory.mktemp("section1"))
    for command, flag in FLOAT_FLAGS:
        for value in NON_FINITE:
            batch.add(f"float {command} {flag}={value}", [command, f"{flag}={value}"])
    for name, args in (("segment", segment_args), ("eval-perseg", eval_perseg_args)):
        for where in ("ro", "ro-parent"):
            ro = read_only(batch.folder(f"{where} {name}"))
            batch.add(f"{where} {name}", args(inputs, ro if where == "ro" else ro / "new" / "run"))
    ro = read_only(batch.folder("ro cache-dir segment"))
    batch.add("ro cache-dir segment", segment_args(inputs, "out", "--cache-dir", str(ro / "cache")))
    tiny_sam = ("--sam-model", "tiny", "--sam-checkpoint", str(inputs["sam"]))
    for name, args in (("segment", segment_args), ("eval-perseg", eval_perseg_args)):
        out = batch.folder(f"locked {name}") / "out"
        batch.held.append((out, name))  # this test process is the first run, holding the folder
        batch.add(f"locked {name}", args(inputs, out, *tiny_sam))
    photos = batch.folder("broken photo inputs")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    argv = segment_args(inputs, "out", *tiny_sam)
    argv[argv.index("--images") + 1] = str(photos)
    batch.add("broken photo", argv)
    small = np.zeros((96, 128), dtype=np.uint8)
    small[40:42, 60:62] = 255  # 4 pixels: covers no whole embedding cell
    Image.fromarray(small).save(batch.folder("small reference inputs") / "small.png")
    argv = segment_args(inputs, "out", *tiny_sam)
    argv[argv.index("--ref-mask") + 1] = str(batch.folder("small reference inputs") / "small.png")
    batch.add("small reference", argv)
    batch.add("persam-f progress", segment_args(inputs, "out", *tiny_sam, "--method", "persam-f"))
    yield batch
    for path in batch.root.rglob("ro"):
        path.chmod(0o755)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(("command", "flag"), FLOAT_FLAGS, ids=[f"{c} {f}" for c, f in FLOAT_FLAGS])
def test_non_finite_float_flags_are_refused_when_parsed(section1, command, flag, value):
    result, folder, before = section1.result(f"float {command} {flag}={value}")
    assert_refused(result, flag, before, folder, f"'{value}'")


@pytest.mark.parametrize("command", ["segment", "eval-perseg"])
@pytest.mark.parametrize("where", ["ro", "ro-parent"])
def test_read_only_output_is_refused_before_any_work(section1, command, where):
    result, folder, before = section1.result(f"{where} {command}")
    assert_refused(result, "`--output`", before, folder, "not writable")
    assert sorted(p.name for p in (folder / "ro").iterdir()) == []


def test_a_read_only_cache_folder_is_refused_naming_its_flag(section1):
    result, folder, before = section1.result("ro cache-dir segment")
    assert_refused(result, "`--cache-dir`", before, folder, "not writable")


@pytest.mark.parametrize("command", ["segment", "eval-perseg"])
def test_a_second_run_into_a_locked_folder_is_refused_with_the_holders_pid(section1, command):
    result, folder, before = section1.result(f"locked {command}")
    assert before == ["out", f"out/{LOCK_NAME}"]
    assert_refused(result, "`--output`", before, folder, f"PID {os.getpid()}", "in use by another run")


def test_a_failed_check_inside_the_lock_leaves_nothing(section1):
    """A bad photo is found after the lock is taken: neither the new folder nor its lock file stay."""
    result, folder, before = section1.result("broken photo")
    assert_refused(result, "`--images`", before, folder, "broken.jpg")


def test_a_warning_is_one_clean_log_line(section1):
    """SmallReferenceWarning from ``segment`` is one log line, without ``file.py:NNN: SmallReferenceWarning:``."""
    result, folder, _ = section1.result("small reference")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "covers no whole embedding cell" in line]
    assert len(lines) == 1, result.stderr
    assert " WARNING " in lines[0] and "SmallReferenceWarning" not in result.stderr and ".py:" not in result.stderr
    assert "warnings.warn" not in result.stderr
    assert (folder / "out" / "results.jsonl").is_file()


def test_progress_is_logged_for_the_slow_stages_and_the_lock_is_released(section1):
    """Loading SAM, encoding the reference and PerSAM-F's fit each say so (with their duration)."""
    result, folder, _ = section1.result("persam-f progress")
    assert result.returncode == 0, result.stderr
    for text in ("loading SAM tiny from", "SAM tiny loaded in", "encoding 1 reference photo(s)",
                 "reference photo(s) encoded in", "PerSAM-F: fitting the scale weights (1000 steps",
                 "PerSAM-F: scale weights fitted in"):
        assert text in result.stderr, f"{text!r} missing:\n{result.stderr}"
    assert error_lines(result.stderr) == [], "nothing but progress lines"
    assert (folder / "out" / LOCK_NAME).is_file()
    with lock_output_dir(folder / "out", "segment"):  # released when the run ended
        pass


# --------------------------------------------------------------------------------------------------- section 2
# The other commands' output folders. Each case gives the command what it needs to reach its output check (or
# nothing it could load): the read-only folder must be refused first, in one line naming the output flag.
WRITERS = {
    "segment": "--output",
    "eval-perseg": "--output",
    "train": "--output_dir",
    "generate": "--output-dir",
    "compare": "--output-dir",
    "segment-video": "--output",
    "eval-davis": "--output",
    "frames": "--output",
    "ui": "--project",
}


def other_args(command: str, inputs: dict[str, Path], output: Path) -> list[str]:
    root = inputs["root"]
    if command == "train":
        return ["train", "--pretrained_model_name_or_path", str(root / "sd"), "--instance_data_dir",
                str(inputs["photos"]), "--instance_prompt", "a photo of sks dog", "--mask_source", "none",
                "--max_train_steps", "1", "--output_dir", str(output)]
    if command == "generate":
        return ["generate", "--model", str(root / "sd"), "--prompt", "a photo of sks dog", "--output-dir",
                str(output)]
    if command == "compare":
        return ["compare", "--runs", f"masked={root / 'run_a'}", f"vanilla={root / 'run_b'}", "--instance_data_dir",
                str(inputs["photos"]), "--class-noun", "dog", "--output-dir", str(output)]
    if command == "segment-video":
        return ["segment-video", "--video", str(root / "video.mp4"), "--ref-mask", str(inputs["ref_mask"]),
                "--output", str(output), "--device", "cpu"]
    if command == "eval-davis":
        return ["eval-davis", "--data", str(root / "davis"), "--output", str(output), "--device", "cpu"]
    if command == "frames":
        return ["frames", "--video", str(root / "video.mp4"), "--ref-mask", str(inputs["ref_mask"]), "--output",
                str(output), "--device", "cpu"]
    if command == "ui":
        return ["ui", "--project", str(output), "--device", "cpu", "--port", "7999"]
    raise KeyError(command)


OTHERS = [c for c in WRITERS if c not in ("segment", "eval-perseg")]
LOCKING = ["train", "generate"]  # (compare locks too, but its inputs are trained runs: too slow to build here)


def write_video(path: Path, frames: int = 4) -> Path:
    """A short H.264 video of the synthetic subject (PyAV)."""
    import av

    image, _ = tiny.synthetic_subject()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def section2(tmp_path_factory, inputs):
    root = inputs["root"]
    write_video(root / "video.mp4")
    tiny.save_tiny_sd(root / "sd")
    for name in ("run_a", "run_b", "davis"):
        (root / name).mkdir(exist_ok=True)
    batch = Batch(tmp_path_factory.mktemp("section2"), case_timeout=60)  # a command that ignores the lock works
    for command in LOCKING:
        out = batch.folder(f"locked {command}") / "out"
        batch.held.append((out, command))  # this test process is the first run, holding the folder
        batch.add(f"locked {command}", other_args(command, inputs, out))
    for command in OTHERS:
        for where in ("ro", "ro-parent"):
            folder = batch.folder(f"{where} {command}")
            ro = read_only(folder)
            batch.add(f"{where} {command}", other_args(command, inputs, ro if where == "ro" else ro / "new" / "x"))
    yield batch
    for path in batch.root.rglob("ro"):
        path.chmod(0o755)


@pytest.mark.parametrize("command", OTHERS)
@pytest.mark.parametrize("where", ["ro", "ro-parent"])
def test_other_commands_refuse_a_read_only_output(section2, command, where):
    result, folder, before = section2.result(f"{where} {command}")
    assert_refused(result, WRITERS[command], before, folder)


@pytest.mark.parametrize("command", LOCKING)
def test_other_commands_refuse_a_locked_output_folder(section2, command):
    result, folder, before = section2.result(f"locked {command}")
    assert before == ["out", f"out/{LOCK_NAME}"]
    assert_refused(result, WRITERS[command], before, folder, f"PID {os.getpid()}")
