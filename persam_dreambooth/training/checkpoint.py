"""Resumable checkpoints: accelerate's ``save_state`` with our own model hooks, atomic folders, rotation.

A checkpoint ``OUT/checkpoint-N/`` holds what accelerate saves (optimizer, LR scheduler, RNG states, gradient scaler)
plus, written by our save hook instead of a full UNet copy: ``pytorch_lora_weights.safetensors`` (diffusers format,
so a checkpoint also loads with ``pipe.load_lora_weights``) for LoRA, or ``unet/`` (and ``text_encoder/``...) for full
fine-tuning; ``trainer_state.json`` (step, seed); and ``manifest.json``, the size and SHA-256 of every other file.
It is written as ``.checkpoint-N.tmp`` and renamed when complete, so a crash mid-save never leaves a half checkpoint
under a final name, and ``latest`` never picks one. Its files get the umask's ordinary modes before the rename.

Before a resume the manifest is checked (:func:`checkpoint_problem`): ``latest`` skips a damaged checkpoint (a
truncated or altered file) with a warning naming it and takes the newest intact one; a damaged checkpoint named
explicitly is an error. A checkpoint without a manifest (saved by an older version) is used unverified, with a
warning. A random-state file that cannot be restored is a loud warning that the resume is not exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from persam_dreambooth.training.families import ModelFamily
from persam_dreambooth.training.lora import load_lora, save_lora
from persam_dreambooth.training.trainable import TrainedModels
from persam_dreambooth.utils.io import atomic_write_json, file_sha256, fix_permissions

logger = logging.getLogger(__name__)

__all__ = ["list_checkpoints", "resolve_resume", "register_model_hooks", "save_checkpoint", "read_trainer_state",
           "write_manifest", "checkpoint_problem", "load_checkpoint", "MANIFEST", "TRAINER_STATE"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json``: ``{"files": {relative path: {"size": bytes, "sha256": hex}}}`` of every file."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    atomic_write_json(folder / MANIFEST, {"version": 1, "files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (a missing, truncated or altered file), or None if it is intact.

    A checkpoint without ``manifest.json`` (from an older version) is not verified: None, with a warning.
    """
    try:
        read_trainer_state(folder)
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} is unreadable ({exc})"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        logger.warning("Checkpoint %s has no %s (saved by an older version): its files cannot be verified.",
                       folder, MANIFEST)
        return None
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    started = time.monotonic()
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or altered)"
        if file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (altered or corrupted)"
    logger.info("Verified checkpoint %s (%d files, %.1f s)", folder, len(files), time.monotonic() - started)
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``"latest"`` (None when there is none yet) or a path.

    ``"latest"`` is the newest checkpoint that passes :func:`checkpoint_problem`; each damaged newer one is skipped
    with a warning naming it. With no checkpoint at all, training starts at step 0 (diffusers' behaviour), said in a
    warning. A relative path is looked up in ``output_dir`` first, then in the working folder.

    Raises:
        FileNotFoundError: the named checkpoint does not exist or is not a checkpoint folder.
        ValueError: the named checkpoint is damaged, or every checkpoint of ``output_dir`` is.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("`--resume_from_checkpoint latest`: no checkpoint found in %s; training starts at step 0.",
                           output_dir)
            return None
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            logger.warning("`--resume_from_checkpoint latest`: checkpoint %s is damaged (%s); skipping it and "
                           "trying the next older one.", candidate, problem)
        raise ValueError(
            f"`--resume_from_checkpoint latest`: every checkpoint in {str(output_dir)!r} is damaged "
            f"({', '.join(p.name for p in found)}); delete them to start at step 0, or use another `--output_dir`."
        )
    given = Path(resume_from_checkpoint)
    for candidate in ((Path(output_dir) / given) if not given.is_absolute() else given, given):
        if candidate.is_dir():
            if not (candidate / TRAINER_STATE).is_file():
                raise FileNotFoundError(
                    f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a checkpoint folder "
                    f"({TRAINER_STATE} is missing)."
                )
            problem = checkpoint_problem(candidate)
            if problem is not None:
                raise ValueError(
                    f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is damaged: {problem}; resume from "
                    "another checkpoint (or 'latest', which skips damaged ones)."
                )
            return candidate
    raise FileNotFoundError(
        f"`resume_from_checkpoint` {resume_from_checkpoint!r} does not exist (looked in {str(output_dir)!r} and "
        "the working folder); use 'latest' or a checkpoint-N folder."
    )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (``global_step``, ``seed``...)."""
    return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))


def register_model_hooks(accelerator: Accelerator, train_mode: str, family: ModelFamily,
                         trained: TrainedModels) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save LoRA weights (or the full models) our way.

    Args:
        family: whose pipeline format the LoRA file takes. trained: the *unwrapped* trained modules (with their
            ``LoraConfig``, written into the weights' metadata).
    """
    owners = {id(trained.denoiser): family.denoiser_name}
    owners.update({id(te): name for name, te in trained.text_encoders.items()})

    def owner(model: torch.nn.Module) -> str | None:
        return owners.get(id(accelerator.unwrap_model(model)))

    def save_hook(models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            if train_mode == "lora":
                save_lora(output_dir, family, trained.denoiser, trained.text_encoders, trained.denoiser_lora,
                          trained.text_encoder_loras)
            else:
                for module in trained.modules():
                    module.save_pretrained(Path(output_dir) / owners[id(module)])
        for model in models:  # we saved them; stop accelerate from writing a second, full copy
            if owner(model) is None:
                raise ValueError(f"unexpected model {type(model).__name__} in the checkpoint")
            if weights:
                weights.pop()

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        while models:
            model = models.pop()
            if owner(model) is None:
                raise ValueError(f"unexpected model {type(model).__name__} in the checkpoint")
        if train_mode == "lora":
            load_lora(input_dir, family, trained.denoiser, trained.text_encoders)
        else:
            for module in trained.modules():
                _load_full(module, Path(input_dir) / owners[id(module)])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_full(model: torch.nn.Module, folder: Path) -> None:
    """Copy a ``save_pretrained`` folder's weights into ``model`` in place (the optimizer keeps its tensors)."""
    loaded = type(model).from_pretrained(folder)
    model.load_state_dict(loaded.state_dict())
    del loaded


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    global_step: int,
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-N.tmp``, add ``trainer_state.json``, rename, then rotate.

    Collective: every process must call it (accelerate gathers state); only the main process renames and rotates.
    Returns the final folder.
    """
    final = output_dir / f"checkpoint-{global_step}"
    tmp = output_dir / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its part (RNG states) before the rename
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, {"global_step": global_step, **state})
        fix_permissions(tmp)  # accelerate's and our temporary files start private; give the umask's modes
        write_manifest(tmp)
        if final.exists():  # a rerun that reached the same step again: the new state replaces the old one
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("Saved checkpoint %s", final)
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


class _RandomStateWatch(logging.Handler):
    """Catches accelerate's report on the random states while ``load_state`` runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _watch_accelerate_log() -> Iterator[_RandomStateWatch]:
    log = logging.getLogger("accelerate.checkpointing")
    watch, level = _RandomStateWatch(), log.level
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        log.removeHandler(watch)
        log.setLevel(level)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> int:
    """``accelerator.load_state(checkpoint)``; return its ``global_step``.

    accelerate only logs (at INFO) when it cannot restore a process's random states and goes on; here that is a
    loud warning that the resumed run will not repeat the interrupted one exactly.
    """
    states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    lost = None if states.is_file() else f"{states.name} is missing (saved by fewer processes?)"
    with _watch_accelerate_log() as watch:
        accelerator.load_state(str(checkpoint))
    if lost is None and any("Could not load random states" in m for m in watch.messages):
        lost = f"{states.name} could not be read"
    if lost is not None:
        logger.warning("EXACT RESUME IS LOST: %s in %s, so this process's random states are not restored; the "
                       "resumed run goes on but will not repeat the interrupted one bit for bit.", lost, checkpoint)
    return int(read_trainer_state(checkpoint)["global_step"])


def rotate_checkpoints(output_dir: Path, total_limit: int, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints so at most ``total_limit`` remain (after a successful save).

    ``keep`` (the checkpoint just saved) is never deleted, even when an earlier run in the same folder left
    checkpoints of later steps.
    """
    found = [path for path in list_checkpoints(output_dir) if path != keep]
    for old in found[: max(len(found) + (keep is not None) - total_limit, 0)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
        shutil.rmtree(old)
