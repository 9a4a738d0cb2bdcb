"""The project folder the web app works on: ordinary files that the command-line tools read too.

    PROJECT/
      photos/        the subject's photos (the trainer's --instance_data_dir)
      masks/         <stem>.png, 0/255, one per photo (the trainer's --mask_dir)
      excluded/      photos taken out of training (and their masks, in excluded/masks/)
      models/        optional: local base models (diffusers folders) the train form may name
      runs/<name>/   one folder per training run, generation or comparison
      project.json   the marks (reference clicks/box, fix clicks), scores and flags shown by the app
      .ui/           the app's own scratch space (upload staging, Gradio's cache), safe to delete

Every name or path that comes from the page goes through :meth:`Project.child` or :func:`check_name`, which refuse
anything that would leave the project folder (``..``, absolute paths, symlinks pointing outside). Writes are atomic
(:mod:`persam_dreambooth.utils.io`), and read-modify-write of ``project.json`` holds a file lock, so two browser tabs
on one project cannot corrupt it (docs/ui.md, "Security").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from persam_dreambooth.data.images import IMAGE_EXTENSIONS, load_image, load_mask
from persam_dreambooth.utils.io import atomic_path, atomic_save_image, atomic_write_json

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MIN_PHOTO_SIDE",
    "PhotoInfo",
    "Project",
    "ProjectError",
    "check_name",
]

MAX_UPLOAD_BYTES = 40 * 1024 * 1024  # one photo; Gradio's own limit (launch(max_file_size)) is set to the same
MAX_PHOTO_PIXELS = 80_000_000  # larger decoded photos are refused (decompression bombs)
MIN_PHOTO_SIDE = 256  # shorter side below this: a warning (training at 512 px would upscale it)
STATE_FILE = "project.json"
STATE_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,119}$")
_THREAD_LOCK = threading.Lock()  # flock is per open file; this serialises the threads of one server too


class ProjectError(ValueError):
    """A request the project refuses: the message names the field, the value and the rule (shown in the page)."""


def check_name(value: Any, field_name: str) -> str:
    """A plain file or folder name: letters, digits, ``._ -``, starting with a letter or digit, at most 120 chars.

    Raises:
        ProjectError: anything else (``..``, a slash, an absolute path, an empty name...).
    """
    text = str(value or "").strip()
    if not _NAME.match(text) or text in (".", "..") or ".." in text:
        raise ProjectError(
            f"{field_name} must be a plain name (letters, digits, '.', '_', '-', ' '; starting with a letter or "
            f"digit; no '/' or '..'; at most 120 characters), got {text!r}."
        )
    return text


@dataclass
class PhotoInfo:
    """One photo of the project as the page lists it."""

    name: str
    path: Path
    width: int = 0
    height: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def readable(self) -> bool:
        return self.width > 0

    def caption(self) -> str:
        size = f"{self.width}x{self.height}" if self.readable else "unreadable"
        return f"{self.name} · {size}" + (" · ⚠ " + "; ".join(self.warnings) if self.warnings else "")


def _probe(path: Path) -> tuple[int, int, list[str]]:
    """``(width, height, warnings)`` of a photo file, as shown (EXIF orientation applied), without keeping its pixels.

    The whole file is decoded (a truncated file is unreadable), JPEGs at 1/8 scale (DCT scaling, fast).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                try:
                    orientation = img.getexif().get(0x0112, 1)
                except Exception:  # noqa: BLE001 - malformed EXIF: the pixels as stored
                    orientation = 1
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        return 0, 0, [f"unreadable ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"]
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees when shown
        width, height = height, width
    notes = []
    if min(height, width) < MIN_PHOTO_SIDE:
        notes.append(f"tiny: shorter side {min(height, width)} px < {MIN_PHOTO_SIDE} px")
    return width, height, notes


class Project:
    """A project folder (created with its sub-folders if missing).

    Raises:
        ProjectError: ``root`` is an existing file.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise ProjectError(f"--project must be a folder, but {str(root)!r} is a file.")
        self.root = root.resolve()
        for sub in ("photos", "masks", "excluded", "runs", "models", ".ui"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._probe_cache: dict[tuple[str, int, int], tuple[int, int, list[str]]] = {}

    # ------------------------------------------------------------------------------------------------ paths
    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def scratch(self) -> Path:
        return self.root / ".ui"

    def child(self, value: Any, field_name: str, must_exist: bool = False) -> Path:
        """Resolve a path typed in the page (relative to the project, or absolute) and check it stays inside.

        Symlinks are resolved first, so a link inside the project that points outside is refused too.

        Raises:
            ProjectError: empty, outside the project folder, or (``must_exist``) missing.
        """
        text = str(value or "").strip()
        if not text or "\x00" in text:
            raise ProjectError(f"{field_name} must be a path inside the project folder {str(self.root)!r}, got "
                               f"{text!r}.")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ProjectError(f"{field_name} {text!r} is outside the project folder {str(self.root)!r}; the app "
                               "only reads and writes inside it (copy or move the files into the project).")
        if must_exist and not resolved.exists():
            raise ProjectError(f"{field_name} {text!r} does not exist in the project folder.")
        return resolved

    def photo_path(self, name: Any, field_name: str = "photo") -> Path:
        """``photos/<name>`` for an existing photo name (a plain name, no path)."""
        name = check_name(name, field_name)
        path = self.photos / name
        if not path.is_file():
            raise ProjectError(f"{field_name} {name!r} is not a photo of this project.")
        return path

    def run_dir(self, name: Any, field_name: str = "run name") -> Path:
        """``runs/<name>`` (not created)."""
        return self.runs / check_name(name, field_name)

    # ------------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the project lock (``.ui/lock``, ``flock``): one writer at a time, across tabs and processes."""
        with _THREAD_LOCK, open(self.scratch / "lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read_state(self) -> dict[str, Any]:
        """``project.json`` (an empty state if missing or unreadable)."""
        try:
            state = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            state = {}
        state.setdefault("version", STATE_VERSION)
        state.setdefault("reference", None)
        state.setdefault("method", "persam")
        state.setdefault("photos", {})
        return state

    def update_state(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Read ``project.json``, apply ``change(state)`` (in place), write it back atomically, under the lock."""
        with self.locked():
            state = self.read_state()
            result = change(state)
            atomic_write_json(self.root / STATE_FILE, state)
            return result

    # ------------------------------------------------------------------------------------------------ photos
    def list_photos(self) -> list[PhotoInfo]:
        """Every file in ``photos/`` with an image extension, sorted by name, with size and warnings."""
        out = []
        for path in sorted(self.photos.iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
                continue
            stat = path.stat()
            key = (path.name, stat.st_mtime_ns, stat.st_size)
            if key not in self._probe_cache:
                self._probe_cache[key] = _probe(path)
            width, height, notes = self._probe_cache[key]
            out.append(PhotoInfo(path.name, path, width, height, list(notes)))
        return out

    def import_files(self, sources: Sequence[str | os.PathLike[str]], field_name: str = "upload") -> list[str]:
        """Copy photo files into ``photos/``: all of them or, on any refusal, none.

        Each file must have an image extension, be at most :data:`MAX_UPLOAD_BYTES`, decode as an image and not
        exceed :data:`MAX_PHOTO_PIXELS`. Names are made plain (see :func:`_plain_name`) and never overwrite an
        existing photo (a ``-2``, ``-3``... suffix is added). Returns the new names.

        Raises:
            ProjectError: naming the file and the rule; nothing has been written then.
        """
        sources = [Path(s) for s in sources]
        if not sources:
            raise ProjectError(f"{field_name}: no files were given.")
        for src in sources:
            self._check_photo_file(src, field_name)
        written: list[Path] = []
        try:
            with self.locked():
                taken = {p.name.lower() for p in self.photos.iterdir()} | {
                    p.stem.lower() for p in self.photos.iterdir()}
                for src in sources:
                    name = _unique_name(_plain_name(src.name), taken)
                    taken |= {name.lower(), Path(name).stem.lower()}
                    target = self.photos / name
                    with atomic_path(target) as tmp:
                        shutil.copyfile(src, tmp)
                    written.append(target)
        except BaseException:
            for path in written:  # all or nothing
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise
        return [p.name for p in written]

    def _check_photo_file(self, src: Path, field_name: str) -> None:
        shown = src.name
        if src.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ProjectError(f"{field_name} {shown!r}: only image files are accepted "
                               f"({', '.join(IMAGE_EXTENSIONS)}); nothing was added.")
        if not src.is_file():
            raise ProjectError(f"{field_name} {shown!r} is not a file; nothing was added.")
        size = src.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise ProjectError(f"{field_name} {shown!r} is {size / 2**20:.1f} MiB, over the limit of "
                               f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB per photo; nothing was added.")
        try:
            with Image.open(src) as img:
                pixels = img.size[0] * img.size[1]
                img.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ProjectError(f"{field_name} {shown!r} is not a readable image ({exc}); nothing was added.") from exc
        if pixels > MAX_PHOTO_PIXELS:
            raise ProjectError(f"{field_name} {shown!r} has {pixels} pixels, over the limit of {MAX_PHOTO_PIXELS}; "
                               "nothing was added.")

    def import_folder(self, value: Any) -> list[str]:
        """Copy the photos of a folder inside the project (e.g. ``incoming/``) into ``photos/`` (all or none)."""
        folder = self.child(value, "folder", must_exist=True)
        if not folder.is_dir():
            raise ProjectError(f"folder {str(value)!r} is not a folder.")
        if folder == self.photos:
            raise ProjectError("folder: that is already the project's photos/ folder.")
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ProjectError(f"folder {str(value)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        for path in files:  # a link inside the folder must not lead outside the project either
            self.child(path, "folder entry")
        return self.import_files(files, "folder photo")

    def load_photo(self, name: Any) -> np.ndarray:
        """``(H, W, 3)`` uint8 pixels of a project photo."""
        path = self.photo_path(name)
        try:
            return load_image(path, name)
        except ValueError as exc:
            raise ProjectError(str(exc)) from exc

    # ------------------------------------------------------------------------------------------------ masks
    def mask_path(self, photo_name: str, propagated: bool = False) -> Path:
        """``masks/<stem>.png``; with ``propagated``, PerSAM's own result kept in ``.ui/propagated/`` (to undo
        fixes)."""
        folder = self.scratch / "propagated" if propagated else self.masks
        return folder / f"{Path(check_name(photo_name, 'photo')).stem}.png"

    def save_mask(self, photo_name: str, mask: np.ndarray, propagated: bool = False) -> Path:
        """Write ``masks/<stem>.png`` (0/255 L PNG, the trainer's ``--mask_dir`` format), atomically."""
        path = self.mask_path(photo_name, propagated)
        atomic_save_image(Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255), path,
                          compress_level=1)  # fast; a two-valued mask compresses well anyway
        return path

    def load_mask(self, photo_name: str, propagated: bool = False) -> np.ndarray | None:
        path = self.mask_path(photo_name, propagated)
        return load_mask(path, path.name) if path.is_file() else None

    def exclude(self, photo_name: Any) -> None:
        """Move a photo (and its mask) to ``excluded/``: training no longer sees it."""
        src = self.photo_path(photo_name, "photo to exclude")
        with self.locked():
            (self.root / "excluded" / "masks").mkdir(parents=True, exist_ok=True)
            os.replace(src, self.root / "excluded" / src.name)
            mask = self.mask_path(src.name)
            if mask.is_file():
                os.replace(mask, self.root / "excluded" / "masks" / mask.name)

    def include(self, photo_name: Any) -> None:
        """Move an excluded photo (and its mask) back to ``photos/``."""
        name = check_name(photo_name, "photo to include")
        src = self.root / "excluded" / name
        if not src.is_file():
            raise ProjectError(f"photo to include {name!r} is not in excluded/.")
        with self.locked():
            if (self.photos / name).exists():
                raise ProjectError(f"photo to include {name!r}: photos/ already holds a file of that name.")
            os.replace(src, self.photos / name)
            mask = self.root / "excluded" / "masks" / f"{Path(name).stem}.png"
            if mask.is_file():
                os.replace(mask, self.mask_path(name))

    def excluded(self) -> list[str]:
        folder = self.root / "excluded"
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _plain_name(name: str) -> str:
    """A file name reduced to ``[A-Za-z0-9._-]`` (the extension kept, lower-cased)."""
    stem, suffix = os.path.splitext(os.path.basename(name))
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:80] or "photo"
    if not stem[0].isalnum():
        stem = "p" + stem
    return stem + suffix.lower()


def _unique_name(name: str, taken: set[str]) -> str:
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 1
    while candidate.lower() in taken or Path(candidate).stem.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    return candidate
