"""Atomic file writes, output-folder checks and file hashing.

Every file the package writes under a final name goes through :func:`atomic_write`: the bytes land in a temporary
file in the same folder, which is renamed over the final name only once it is complete. A crash, a full disk or an
exception mid-write therefore never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_image",
    "check_output_dir",
    "ensure_output_dir",
    "file_sha256",
]


def _default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would have given the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block ends without error.

    Use this for writers that want a file name rather than a handle (``torch.save``, ``safetensors``,
    ``PIL.Image.save`` with a format inferred from the suffix). The temporary name keeps ``path``'s suffix (or
    ``suffix``) so such writers pick the right format. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_file_mode())  # mkstemp makes 0600 files; give the usual umask-based mode
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` when the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save_image(image: Any, path: str | os.PathLike[str], **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from ``path``'s suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower())
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def check_output_dir(path: str | os.PathLike[str], arg_name: str = "output") -> Path:
    """Check that ``path`` can be an output folder (without creating anything); return it as a ``Path``.

    Raises:
        NotADirectoryError: ``path`` (or one of its parents) exists and is a file.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            raise NotADirectoryError(
                f"`{arg_name}` must be a folder, but {str(candidate)!r} is an existing file"
                + ("" if candidate == path else f" (a parent of {str(path)!r})")
                + "; choose another path."
            )
    return path


def ensure_output_dir(path: str | os.PathLike[str], arg_name: str = "output") -> Path:
    """Create the output folder ``path`` (and parents) and return it.

    Raises:
        NotADirectoryError: ``path`` (or one of its parents) exists and is a file.
    """
    path = check_output_dir(path, arg_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


_HASH_CHUNK = 1 << 20  # 1 MiB per read while hashing a file


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
