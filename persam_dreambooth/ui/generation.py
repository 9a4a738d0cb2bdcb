"""Generate and compare from the app: ``persam-dreambooth generate`` / ``compare`` run as subprocesses.

Each writes into a new folder of the project's ``runs/`` (``<run>/samples/<tag>`` for generation, ``compare-<tag>``
for a comparison), exactly what the same command line writes; the page then shows the images or ``report.html``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from persam_dreambooth.ui.project import Project, ProjectError, check_name
from persam_dreambooth.ui.training import base_model_arg

__all__ = ["generate", "compare", "trained_runs", "run_cli"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def trained_runs(project: Project) -> list[str]:
    """Names of ``runs/*`` holding LoRA weights (or a full pipeline)."""
    return sorted(p.name for p in project.runs.iterdir()
                  if p.is_dir() and ((p / "pytorch_lora_weights.safetensors").is_file()
                                     or (p / "model_index.json").is_file()))


def run_cli(project: Project, args: list[str], timeout: float = 3600.0) -> str:
    """Run ``python -m persam_dreambooth ARGS`` in the project folder; return its output, or raise with its error line.

    Raises:
        ProjectError: non-zero exit (the last ``error:`` line of its output, or its last line).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "persam_dreambooth", *args], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln]
        raise ProjectError((errors or lines or [f"exit code {proc.returncode}"])[-1].strip())
    return output


def _prompts(text: Any) -> list[str]:
    prompts = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if not prompts:
        raise ProjectError("prompts: enter at least one prompt (one per line).")
    if len(prompts) > 16:
        raise ProjectError(f"prompts: at most 16 per click, got {len(prompts)}.")
    return prompts


def _count(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ProjectError(f"{name} must be an integer in [{low}, {high}], got {value!r}.")
    return number


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "grids" not in p.parts)


def generate(project: Project, run: Any, prompts: Any, num_images: Any = 1, steps: Any = 25, seed: Any = 0,
             with_base: bool = True) -> tuple[list[Path], list[Path], str]:
    """Images of the trained LoRA (and of its base model with the same seeds); ``(lora, base, folder name)``."""
    run_dir = project.run_dir(run, "run")
    if run not in trained_runs(project):
        raise ProjectError(f"run {run!r} has no trained weights yet (train it first, or pick another run).")
    lines = _prompts(prompts)
    common = ["--num-images", str(_count(num_images, "images per prompt", 1, 16)),
              "--num-inference-steps", str(_count(steps, "steps", 1, 200)), "--seed",
              str(_count(seed, "seed", 0, 2**31 - 1))]
    for prompt in lines:
        common += ["--prompt", prompt]
    tag = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / "samples" / tag
    weights = ["--model", str(run_dir)] if (run_dir / "model_index.json").is_file() else ["--lora", str(run_dir)]
    jobs = [(out / "lora", [*weights, *common, "--output-dir", str(out / "lora")])]
    if with_base:
        base = _base_of(run_dir)
        jobs.append((out / "base", ["--pretrained_model_name_or_path", base, *common, "--output-dir",
                                    str(out / "base")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "persam_dreambooth", "generate", *args], cwd=project.root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _, args in jobs]  # both at once: the base images do not wait for the LoRA ones
    failures = []
    for proc in procs:
        output, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            lines_out = [ln for ln in output.splitlines() if "error:" in ln] or output.splitlines()[-1:]
            failures.append((lines_out or ["generation failed"])[-1].strip())
    if failures:
        raise ProjectError(failures[0])
    lora = _images(out / "lora")
    base_images = _images(out / "base") if with_base else []
    return lora, base_images, f"runs/{run_dir.name}/samples/{tag}"


def _base_of(run_dir: Path) -> str:
    """The base model recorded in the run's ``config.resolved.yaml``."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text(encoding="utf-8"))
        return str(config["pretrained_model_name_or_path"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ProjectError(f"run {run_dir.name!r}: cannot read its base model from config.resolved.yaml "
                           f"({exc}).") from exc


def compare(project: Project, runs: list[Any], class_noun: Any, clip_model: Any, dino_model: Any,
            num_images: Any = 2, steps: Any = 25, base_model: Any = "", extra: list[str] | None = None) -> Path:
    """``persam-dreambooth compare`` between trained runs; returns the report folder (``runs/compare-<tag>``)."""
    names = [check_name(r, "run to compare") for r in runs if str(r or "").strip()]
    if len(names) < 1 or len(set(names)) != len(names):
        raise ProjectError(f"runs to compare: pick one or two different trained runs, got {names}.")
    trained = trained_runs(project)
    for name in names:
        if name not in trained:
            raise ProjectError(f"run to compare {name!r} has no trained weights.")
    noun = str(class_noun or "").strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z -]{0,40}", noun):
        raise ProjectError(f"class noun must be a word such as 'dog', got {noun!r}.")
    args = ["compare", "--runs", *[f"{n}={project.run_dir(n)}" for n in names],
            "--instance_data_dir", str(project.photos), "--class-noun", noun,
            "--num-images-per-prompt", str(_count(num_images, "images per prompt", 1, 16)),
            "--num-inference-steps", str(_count(steps, "steps", 1, 200))]
    for flag, value, label in (("--clip-model", clip_model, "CLIP model"), ("--dino-model", dino_model,
                                                                            "DINO model")):
        args += [flag, _model_arg(project, value, label)]
    if str(base_model or "").strip():
        args += ["--pretrained_model_name_or_path", base_model_arg(project, base_model)]
    out = project.runs / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    args += [*(extra or []), "--output-dir", str(out)]
    run_cli(project, args)
    if not (out / "report.html").is_file():
        raise ProjectError(f"compare finished without {out.name}/report.html.")
    return out


def _model_arg(project: Project, value: Any, label: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise ProjectError(f"{label} must be a Hub id or a folder under the project's models/.")
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", text) and not (project.root /
                                                                                          text).exists():
        return text
    return str(project.child(text, label, must_exist=True))
