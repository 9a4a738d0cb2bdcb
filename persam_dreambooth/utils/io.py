"""Atomic file writes, strict JSON, output-folder checks and file hashing.

Every file the package writes under a final name goes through :func:`atomic_write`: the bytes land in a temporary
file in the same folder, which is renamed over the final name only once it is complete. A crash, a full disk or an
exception mid-write therefore never leaves a truncated file under the final name. A folder that must appear whole
(a LoRA export, a checkpoint, a set of masks) is built under a temporary name with :func:`atomic_dir`.

Deliverables get the permissions an ordinary ``open()`` / ``mkdir`` would give under the user's umask, although
the temporary files and folders they are built in start private (``mkstemp`` 0600, ``mkdtemp`` 0700).

Every JSON document the package writes is strict JSON (:func:`dumps_json`: ``NaN`` and ``Infinity`` are refused,
as other JSON readers refuse them).
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
    "atomic_dir",
    "dumps_json",
    "check_output_dir",
    "ensure_output_dir",
    "file_sha256",
]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would have given the file."""
    return 0o666 & ~_umask()


def _default_dir_mode() -> int:
    """``0o777`` minus the process umask: the mode ``mkdir`` would have given the folder."""
    return 0o777 & ~_umask()


def dumps_json(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """``json.dumps`` that refuses ``NaN``/``Infinity`` (strict JSON); raises ``ValueError`` naming the problem."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"refusing to write non-finite numbers (NaN or infinity) as JSON: {exc}") from exc


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
    atomic_write_text(path, dumps_json(obj, indent=indent) + "\n")


def atomic_save_image(image: Any, path: str | os.PathLike[str], **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from ``path``'s suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower())
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds, it replaces ``path`` whole.

    Whatever was at ``path`` before is removed only after the new folder is complete. The folder and everything in
    it get the umask's ordinary modes (``mkdir`` / ``open`` defaults), not ``mkdtemp``'s private 0700. On error the
    temporary folder is removed and ``path`` is untouched.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fix_permissions(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fix_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the umask's ordinary modes."""
    path = Path(path)
    file_mode, dir_mode = _default_file_mode(), _default_dir_mode()
    if path.is_file():
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def _probe_writable(folder: Path) -> bool:
    """Really try to create (and at once remove) a file in ``folder``: also right for root and read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".persam-write-check-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def check_output_dir(path: str | os.PathLike[str], arg_name: str = "output") -> Path:
    """Check that ``path`` can be an output folder (without creating anything); return it as a ``Path``.

    The folder, or where it does not exist yet the nearest existing parent it would be created in, must be
    writable: a probe file is created there and removed at once.

    Raises:
        NotADirectoryError: ``path`` (or one of its parents) exists and is a file.
        PermissionError: the folder cannot be created or written.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            raise NotADirectoryError(
                f"`{arg_name}` must be a folder, but {str(candidate)!r} is an existing file"
                + ("" if candidate == path else f" (a parent of {str(path)!r})")
                + "; choose another path."
            )
    absolute = path.absolute()
    existing = next(c for c in (absolute, *absolute.parents) if c.exists())
    if not _probe_writable(existing):
        where = "" if existing == absolute else f" (it would be created in {str(existing)!r})"
        raise PermissionError(
            f"`{arg_name}` {str(path)!r} is not writable{where}: no permission to create files there; "
            "choose a folder you can write to."
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
