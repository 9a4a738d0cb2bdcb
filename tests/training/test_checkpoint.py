"""Checkpoint folders: listing (complete ones only), ``latest``, rotation by ``checkpoints_total_limit``."""

import pytest

from persam_dreambooth.training.checkpoint import TRAINER_STATE, list_checkpoints, resolve_resume, rotate_checkpoints


def _make(folder, *steps):
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}" / TRAINER_STATE).write_text("{}")


def test_only_complete_checkpoints_count_and_latest_is_the_highest_step(tmp_path):
    _make(tmp_path, 10, 9, 100)
    (tmp_path / ".checkpoint-200.tmp").mkdir()  # a save that crashed
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-300").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-100"
    assert resolve_resume("latest", tmp_path / "empty") is None
    assert resolve_resume("checkpoint-10", tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-x"), tmp_path)


def test_rotation_keeps_the_newest_n(tmp_path):
    _make(tmp_path, 1, 2, 3, 4)
    rotate_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-4")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_rotation_never_deletes_the_checkpoint_just_saved(tmp_path):
    _make(tmp_path, 600, 800)  # left by an earlier, longer run in the same folder
    _make(tmp_path, 200)
    rotate_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-200")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-200", "checkpoint-800"]
