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
def lock_output_dir(folder: str | os.PathLike[str], command: str, arg_name: str = "--output") -> Iterator[Path]:
    """Hold the advisory lock of run folder ``folder`` (created if needed) for the duration of the block.

    Raises:
        FolderLockedError: another process holds it; the message names the flag, the folder and the holder's PID.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()}, persam-dreambooth {command}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
