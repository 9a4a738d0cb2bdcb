"""Training from the app: the form's options become the exact ``accelerate launch ...`` command, run as a subprocess.

The subprocess is started in its own session (``start_new_session``), its output goes to ``runs/<name>/train.log``
and its pid and command to ``runs/<name>/ui_job.json``, so it does not depend on the page: closing the browser, or
even stopping the app, leaves it running, and a restarted app finds it again. Stop sends SIGTERM to its process group;
Resume runs the same command plus ``--resume_from_checkpoint latest``.

Live progress is read from the run folder: the step and loss from the trainer's progress bar in ``train.log``
(``steps: ... 12/40 [..., loss=0.0831, cov=0.31]``), validation images from ``validation/``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persam_dreambooth.ui.project import Project, ProjectError
from persam_dreambooth.utils.io import atomic_write_json

__all__ = ["TrainForm", "TrainStatus", "build_command", "read_status", "start", "stop", "display_command"]

JOB_FILE = "ui_job.json"
LOG_FILE = "train.log"
MIXED_PRECISION = ("no", "fp16", "bf16")
MODES = ("lora", "full")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BAR = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)[^\r\n]*?loss=([-+0-9.eE]+|nan|inf)")
_BAR_NO_LOSS = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass
class TrainForm:
    """The train form's fields (strings as typed, validated by :func:`build_command`)."""

    run_name: str = "run-1"
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    masked: bool = True
    instance_prompt: str = "a photo of sks dog"
    max_train_steps: Any = 800
    rank: Any = 4
    learning_rate: Any = "1e-4"
    train_mode: str = "lora"
    with_prior_preservation: bool = False
    class_prompt: str = ""
    resolution: Any = 512
    checkpointing_steps: Any = 200
    validation_prompt: str = ""
    validation_steps: Any = 100
    validation_inference_steps: Any = 25
    num_validation_images: Any = 2
    mixed_precision: str = "no"
    seed: Any = 0


def _int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ProjectError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return number


def _float(value: Any, name: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not (number > 0 and number < float("inf")):
        raise ProjectError(f"{name} must be a positive number such as 1e-4, got {value!r}.")
    return number


def _text(value: Any, name: str, required: bool = True) -> str:
    text = str(value or "").strip()
    if required and not text:
        raise ProjectError(f"{name} must not be empty.")
    if any(c in text for c in "\r\n\x00"):
        raise ProjectError(f"{name} must be one line, got {text!r}.")
    return text


def base_model_arg(project: Project, value: Any) -> str:
    """A Hub id (``owner/name``, not an existing local path) or a folder under the project (e.g. ``models/sd``)."""
    text = _text(value, "base model")
    local = (project.root / text) if not Path(text).is_absolute() else Path(text)
    if _HUB_ID.match(text) and not local.exists():
        return text
    folder = project.child(text, "base model", must_exist=True)
    if not (folder / "model_index.json").is_file():
        raise ProjectError(f"base model {text!r} is a project folder without model_index.json; give a diffusers "
                           "pipeline folder (e.g. models/<name>) or a Hub id such as "
                           "stable-diffusion-v1-5/stable-diffusion-v1-5.")
    return str(folder)


def launcher_prefix() -> list[str]:
    """``accelerate launch`` and the trainer: the repository's train_scripts/train_dreambooth.py when this is a source
    checkout, else the installed package's ``persam_dreambooth train`` (same flags, same trainer)."""
    script = Path(__file__).resolve().parents[2] / "train_scripts" / "train_dreambooth.py"
    if script.is_file():
        return ["accelerate", "launch", "--num_cpu_threads_per_process", "1", str(script)]
    return ["accelerate", "launch", "--num_cpu_threads_per_process", "1", "-m", "persam_dreambooth", "train"]


def build_command(project: Project, form: TrainForm) -> tuple[list[str], Path]:
    """Validate the form; return ``(argv of accelerate launch ..., the run's output folder)``.

    Masked training reads the project's ``photos/`` and ``masks/`` (every photo needs its mask); vanilla sets
    ``--mask_source none``.
    """
    out = project.run_dir(form.run_name, "run name")
    steps = _int(form.max_train_steps, "steps")
    mode = _text(form.train_mode, "training mode")
    if mode not in MODES:
        raise ProjectError(f"training mode must be one of {list(MODES)}, got {mode!r}.")
    precision = _text(form.mixed_precision, "mixed precision")
    if precision not in MIXED_PRECISION:
        raise ProjectError(f"mixed precision must be one of {list(MIXED_PRECISION)}, got {precision!r}.")
    photos = project.list_photos()
    if not photos:
        raise ProjectError("The project has no photos yet: add some on the Photos tab.")
    unreadable = [p.name for p in photos if not p.readable]
    if unreadable:
        raise ProjectError(f"Unreadable photo(s) {unreadable}: exclude them before training.")
    argv = [
        "--pretrained_model_name_or_path", base_model_arg(project, form.base_model),
        "--instance_data_dir", str(project.photos),
        "--instance_prompt", _text(form.instance_prompt, "instance prompt"),
        "--output_dir", str(out),
        "--train_mode", mode,
        "--resolution", str(_int(form.resolution, "resolution", 8)),
        "--max_train_steps", str(steps),
        "--learning_rate", f"{_float(form.learning_rate, 'learning rate'):g}",
        "--checkpointing_steps", str(_int(form.checkpointing_steps, "checkpoint every")),
        "--mixed_precision", precision,
        "--seed", str(_int(form.seed, "seed", 0)),
        "--center_crop",
    ]
    if mode == "lora":
        argv += ["--rank", str(_int(form.rank, "LoRA rank"))]
    if form.masked:
        missing = [p.name for p in photos if not project.mask_path(p.name).is_file()]
        if missing:
            raise ProjectError(f"Masked training needs a mask for every photo; missing for {missing}. Propagate, "
                               "fix or exclude them (or untick 'masked' for vanilla DreamBooth).")
        argv += ["--mask_dir", str(project.masks)]
    else:
        argv += ["--mask_source", "none"]
    if form.with_prior_preservation:
        argv += ["--with_prior_preservation", "--class_prompt", _text(form.class_prompt, "class prompt"),
                 "--class_data_dir", str(out / "class_images")]
    validation = _text(form.validation_prompt, "validation prompt", required=False)
    if validation:
        argv += ["--validation_prompt", validation,
                 "--validation_steps", str(_int(form.validation_steps, "validate every")),
                 "--validation_inference_steps", str(_int(form.validation_inference_steps, "validation steps")),
                 "--num_validation_images", str(_int(form.num_validation_images, "validation images"))]
    return launcher_prefix() + argv, out


def display_command(argv: list[str]) -> str:
    """The command as one shell line to copy (``shlex`` quoting)."""
    return shlex.join(argv)


def _executable(argv: list[str]) -> list[str]:
    """``accelerate launch ...`` run with this interpreter's accelerate (same program, no PATH lookup)."""
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    return argv


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own finished child (no zombie)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier app): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_job(out: Path) -> dict[str, Any] | None:
    try:
        job = json.loads((out / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def start(project: Project, argv: list[str], out: Path, resume: bool = False, env: dict | None = None) -> int:
    """Start (or, with ``resume``, continue from the latest checkpoint) the run; return the pid.

    Raises:
        ProjectError: a run is already going in ``out``, or (without ``resume``) ``out`` already holds a run.
    """
    with project.locked():
        job = read_job(out)
        if job and _alive(int(job.get("pid", -1))) and job.get("state") == "running":
            raise ProjectError(f"run {out.name!r} is already training (pid {job['pid']}); stop it first.")
        if resume:
            argv = [*argv, "--resume_from_checkpoint", "latest"]
        elif out.exists() and any(out.iterdir()):
            raise ProjectError(f"run name {out.name!r} is taken (runs/{out.name} is not empty): choose another "
                               "name, or Resume it.")
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
        try:
            log.write(f"\n$ {display_command(argv)}\n".encode())
            log.flush()
            child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(_executable(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=project.root, env=child_env, start_new_session=True)
        finally:
            log.close()
        atomic_write_json(out / JOB_FILE, {"pid": proc.pid, "state": "running", "command": argv,
                                           "started": time.time(), "resume": resume})
    return proc.pid


def stop(project: Project, out: Path) -> bool:
    """SIGTERM the run's process group; True when a running run was stopped."""
    with project.locked():
        job = read_job(out)
        if not job or not _alive(int(job.get("pid", -1))):
            return False
        try:
            os.killpg(int(job["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            return False
        job["state"] = "stopped"
        atomic_write_json(out / JOB_FILE, job)
    return True


@dataclass
class TrainStatus:
    """What the page shows about one run."""

    state: str  # "none", "running", "stopped", "finished", "failed"
    step: int
    total: int
    losses: list[tuple[int, float]]
    validation_images: list[Path]
    message: str
    has_weights: bool


def parse_progress(text: str) -> tuple[int, int, list[tuple[int, float]]]:
    """``(last step, total steps, [(step, loss)])`` from the trainer's tqdm lines (``\\r``-separated updates)."""
    step = total = 0
    losses: dict[int, float] = {}
    for chunk in re.split(r"[\r\n]+", text):
        match = _BAR.search(chunk)
        if match:
            step, total = int(match.group(1)), int(match.group(2))
            try:
                losses[step] = float(match.group(3))
            except ValueError:
                pass
            continue
        match = _BAR_NO_LOSS.search(chunk)
        if match:
            step, total = int(match.group(1)), int(match.group(2))
    return step, total, sorted(losses.items())


def read_status(out: Path) -> TrainStatus:
    """The run's state, progress, loss curve and validation images, read from its folder."""
    job = read_job(out)
    if job is None:
        has = (out / "pytorch_lora_weights.safetensors").is_file()
        return TrainStatus("none" if not has else "finished", 0, 0, [], [], "", has)
    try:
        with open(out / LOG_FILE, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    last_run = text.rsplit("\n$ ", 1)[-1]  # this start's output (the log keeps earlier attempts above)
    step, total, _ = parse_progress(last_run)
    step_all, total_all, losses = parse_progress(text)  # the curve keeps earlier attempts (a resume continues it)
    if not total:
        step, total = step_all, total_all
    images = sorted((out / "validation").glob("*.png"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if (
        out / "validation").is_dir() else []  # in the order they were made (step-... then final)
    has_weights = (out / "pytorch_lora_weights.safetensors").is_file() or (out / "model_index.json").is_file()
    alive = _alive(int(job.get("pid", -1)))
    if alive:
        state = "running" if job.get("state") != "stopped" else "stopping"
    elif job.get("state") == "stopped":
        state = "stopped"
    elif has_weights and "Traceback" not in last_run and "error:" not in last_run:
        state, step = "finished", max(step, total)
    else:
        state = "failed"
    message = ""
    if state == "failed":
        errors = [ln.strip() for ln in re.split(r"[\r\n]+", last_run) if "error" in ln.lower()]
        message = errors[-1] if errors else "the training process ended without weights; see train.log"
    return TrainStatus(state, step, total, losses, images, message, has_weights)
