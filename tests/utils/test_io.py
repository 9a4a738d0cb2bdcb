"""utils.io and utils.locks: strict JSON, umask permissions of deliverables, writable output folders, run locks."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from process_helpers import run_unprivileged

from persam_dreambooth.utils.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
)
from persam_dreambooth.utils.locks import LOCK_NAME, FolderLockedError, lock_output_dir


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_json_is_strict(tmp_path, bad):
    with pytest.raises(ValueError, match="non-finite"):
        dumps_json({"guidance_scale": bad})
    with pytest.raises(ValueError, match="non-finite"):
        atomic_write_json(tmp_path / "x.json", {"nested": [1.0, bad]})
    assert not list(tmp_path.iterdir()), "nothing half-written"
    assert json.loads(dumps_json({"a": 1.5})) == {"a": 1.5}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_deliverables_get_the_umask_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "file.txt", "x")
        with atomic_dir(tmp_path / "export") as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.png").write_bytes(b"png")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "file.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "export") == 0o777 & ~umask
    assert _mode(tmp_path / "export" / "sub") == 0o777 & ~umask
    assert _mode(tmp_path / "export" / "pytorch_lora_weights.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "export" / "sub" / "a.png") == 0o666 & ~umask


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "masks"
    with atomic_dir(target) as tmp:
        (tmp / "a.png").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.png").write_text("new")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"], "no temporary folder left behind"
    assert sorted(p.name for p in target.iterdir()) == ["a.png"]
    with atomic_dir(target) as tmp:
        (tmp / "b.png").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]




def test_read_only_output_folders_are_refused_before_anything_is_written(tmp_path):
    root = tmp_path
    try:
        ro = root / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        code = (
            "import sys\nfrom persam_dreambooth.utils.io import check_output_dir\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        check_output_dir(p, '--output')\n    except PermissionError as e:\n"
            "        print('REFUSED', e)\n    else:\n        print('ACCEPTED', p)\n"
        )
        done = run_unprivileged([sys.executable, "-c", code, str(ro), str(ro / "new" / "deeper")])
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 2 and all(line.startswith("REFUSED `--output`") for line in lines), done.stdout
        assert "would be created in" in lines[1]
        assert sorted(p.name for p in ro.iterdir()) == []
        # and a writable folder passes the same check for that user, leaving nothing behind
        ok = root / "ok"
        ok.mkdir()
        ok.chmod(0o777)
        done = run_unprivileged([sys.executable, "-c",
            f"from persam_dreambooth.utils.io import check_output_dir\ncheck_output_dir({str(ok / 'run')!r})\n"
            "print('ACCEPTED')"])
        assert done.stdout.strip() == "ACCEPTED", done.stderr
        assert list(ok.iterdir()) == []
    finally:
        (root / "ro").chmod(0o755)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    with lock_output_dir(tmp_path / "run", "segment"):
        with pytest.raises(FolderLockedError, match=rf"`--output` .* in use by another run \(PID {os.getpid()}, "
                                                    r"persam-dreambooth segment\)"):
            with lock_output_dir(tmp_path / "run", "segment"):
                pass
        # another process sees the same
        code = ("from persam_dreambooth.utils.locks import lock_output_dir\n"
                f"with lock_output_dir({str(tmp_path / 'run')!r}, 'generate', '--output-dir'):\n    pass\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0 and f"PID {os.getpid()}" in done.stderr
    with lock_output_dir(tmp_path / "run", "segment"):  # released when the block ends
        pass


def test_tidy_lock_leaves_nothing_when_the_run_fails(tmp_path):
    """``tidy_on_error``: a run that fails inside the lock removes the lock file and the folders it created."""
    target = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="bad photo"), lock_output_dir(target, "segment", tidy_on_error=True):
        assert (target / LOCK_NAME).is_file()
        raise ValueError("bad photo")
    assert list(tmp_path.iterdir()) == []
    # an existing folder stays, with what was in it; a lock file it already had stays too
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "results.jsonl").write_text("{}\n")
    with pytest.raises(ValueError), lock_output_dir(tmp_path / "kept", "segment", tidy_on_error=True):
        raise ValueError("settings differ")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["results.jsonl"]
    with lock_output_dir(tmp_path / "kept", "segment"):
        pass
    with pytest.raises(ValueError), lock_output_dir(tmp_path / "kept", "segment", tidy_on_error=True):
        raise ValueError("again")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_NAME, "results.jsonl"]
    # a refused run does not remove the holder's lock file
    with lock_output_dir(tmp_path / "held", "segment"):
        with pytest.raises(FolderLockedError), lock_output_dir(tmp_path / "held", "segment", tidy_on_error=True):
            pass
        assert (tmp_path / "held" / LOCK_NAME).is_file()
    # without the option (the default), the lock file and the folder stay
    with pytest.raises(ValueError), lock_output_dir(tmp_path / "plain", "segment"):
        raise ValueError("x")
    assert (tmp_path / "plain" / LOCK_NAME).is_file()
