"""Resumable checkpoints: accelerate's ``save_state`` with our own model hooks, atomic folders, rotation.

A checkpoint ``OUT/checkpoint-N/`` holds what accelerate saves (optimizer, LR scheduler, RNG states, gradient scaler)
plus, written by our save hook instead of a full UNet copy: ``pytorch_lora_weights.safetensors`` (diffusers format,
so a checkpoint also loads with ``pipe.load_lora_weights``) for LoRA, or ``unet/`` (and ``text_encoder/``) for full
fine-tuning; and ``trainer_state.json`` (step, seed). It is written as ``.checkpoint-N.tmp`` and renamed when
complete, so a crash mid-save never leaves a half checkpoint under a final name, and ``latest`` never picks one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from persam_dreambooth.training.lora import load_lora, save_lora
from persam_dreambooth.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["list_checkpoints", "resolve_resume", "register_model_hooks", "save_checkpoint", "read_trainer_state"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``"latest"`` (None when there is none yet) or a path.

    A relative path is looked up in ``output_dir`` first, then in the working folder.

    Raises:
        FileNotFoundError: the named checkpoint does not exist or is not a checkpoint folder.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    given = Path(resume_from_checkpoint)
    for candidate in ((Path(output_dir) / given) if not given.is_absolute() else given, given):
        if candidate.is_dir():
            if not (candidate / TRAINER_STATE).is_file():
                raise FileNotFoundError(
                    f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a checkpoint folder "
                    f"({TRAINER_STATE} is missing)."
                )
            return candidate
    raise FileNotFoundError(
        f"`resume_from_checkpoint` {resume_from_checkpoint!r} does not exist (looked in {str(output_dir)!r} and "
        "the working folder); use 'latest' or a checkpoint-N folder."
    )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (``global_step``, ``seed``...)."""
    return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))


def register_model_hooks(
    accelerator: Any,
    train_mode: str,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    lora_configs: tuple[Any, Any] = (None, None),
) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save LoRA weights (or the full models) our way.

    Args:
        unet, text_encoder: the *unwrapped* trained models (text_encoder None when it is frozen).
        lora_configs: the UNet and text-encoder ``LoraConfig`` (written into the weights' metadata).
    """

    def owner(model: torch.nn.Module) -> str | None:
        inner = accelerator.unwrap_model(model)
        if inner is unet:
            return "unet"
        if text_encoder is not None and inner is text_encoder:
            return "text_encoder"
        return None

    def save_hook(models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            if train_mode == "lora":
                save_lora(output_dir, unet, text_encoder, *lora_configs)
            else:
                unet.save_pretrained(Path(output_dir) / "unet")
                if text_encoder is not None:
                    text_encoder.save_pretrained(Path(output_dir) / "text_encoder")
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
            load_lora(input_dir, unet, text_encoder)
        else:
            _load_full(unet, Path(input_dir) / "unet")
            if text_encoder is not None:
                _load_full(text_encoder, Path(input_dir) / "text_encoder")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_full(model: torch.nn.Module, folder: Path) -> None:
    """Copy a ``save_pretrained`` folder's weights into ``model`` in place (the optimizer keeps its tensors)."""
    loaded = type(model).from_pretrained(folder)
    model.load_state_dict(loaded.state_dict())
    del loaded


def save_checkpoint(
    accelerator: Any,
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
        if final.exists():  # a rerun that reached the same step again: the new state replaces the old one
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("Saved checkpoint %s", final)
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, total_limit: int, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints so at most ``total_limit`` remain (after a successful save).

    ``keep`` (the checkpoint just saved) is never deleted, even when an earlier run in the same folder left
    checkpoints of later steps.
    """
    found = [path for path in list_checkpoints(output_dir) if path != keep]
    for old in found[: max(len(found) + (keep is not None) - total_limit, 0)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
        shutil.rmtree(old)
