"""One writer per run folder: an advisory lock on the output folder of ``segment``, ``train``, ``generate``,
``compare`` and the other commands that write a run folder.

The lock is ``fcntl.flock`` on ``<folder>/.persam.lock``, which holds the holder's PID and command. The kernel
drops the lock when the holder exits, even after ``kill -9``, so a stale file never blocks a later run; the file
itself stays (hidden, a few bytes). A second run refuses at once with one line naming the holder's PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLockedError", "lock_output_dir"]

LOCK_NAME = ".persam.lock"


class FolderLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def lock_output_dir(
    folder: str | os.PathLike[str], command: str, arg_name: str = "--output", *, tidy_on_error: bool = False
) -> Iterator[Path]:
    """Hold the advisory lock of run folder ``folder`` (created if needed) for the duration of the block.

    With ``tidy_on_error``, a block that raises (or a refusal) leaves no trace of the lock: the lock file is removed
    if this call created it, and so is ``folder`` if this call created it and it is empty then (a run that fails its
    checks writes nothing).

    Raises:
        FolderLockedError: another process holds it; the message names the flag, the folder and the holder's PID.
    """
    folder = Path(folder)
    new_folders = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    new_file = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise FolderLockedError(
                f"`{arg_name}` {str(folder)!r} is in use by another run ({holder}); wait for it to finish or "
                "choose another folder."
            ) from None
        locked = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()}, persam-dreambooth {command}\n".encode(), 0)
        yield folder
    except BaseException:
        if tidy_on_error:
            if new_file and locked:  # only the holder removes the file (a refused run's file is the holder's)
                with contextlib.suppress(OSError):
                    path.unlink()
            for created in new_folders:  # innermost first; stops at the first folder that is not empty
                try:
                    created.rmdir()
                except OSError:
                    break
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock
