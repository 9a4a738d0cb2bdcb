"""Loading SAM: a registry of builders, the official checkpoints, a verified download cache.

``load_sam("vit_h")`` builds segment_anything's ViT-H architecture and loads the official weights: downloaded once
into ``$PERSAM_DREAMBOOTH_CACHE/sam/`` (default ``~/.cache/persam_dreambooth/sam/``), checked against their SHA-256,
and read with ``torch.load(..., weights_only=True)``. ``load_sam("vit_b", checkpoint="my.pth")`` loads a file of
your own instead (no checksum: it is yours).

The registry :data:`SAM_BUILDERS` maps a model type to a zero-argument callable that returns a randomly initialised
:class:`segment_anything.modeling.Sam`, plus (for the official types) the URL and SHA-256 of its weights. Register
more with :func:`register_sam_builder` (tests register a tiny SAM this way).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from persam_dreambooth.utils.devices import resolve_device
from persam_dreambooth.utils.io import atomic_path, file_sha256

__all__ = [
    "CACHE_ENV_VAR",
    "SAM_BUILDERS",
    "CheckpointDownloadError",
    "SamBuilder",
    "cache_dir",
    "default_checkpoint_path",
    "download_checkpoint",
    "load_sam",
    "register_sam_builder",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "PERSAM_DREAMBOOTH_CACHE"
_DOWNLOAD_CHUNK = 1 << 20  # 1 MiB per read while streaming a download
_OFFICIAL_URL = "https://dl.fbaipublicfiles.com/segment_anything/{}"


class CheckpointDownloadError(RuntimeError):
    """The official checkpoint could not be downloaded or did not match its SHA-256."""


@dataclass(frozen=True)
class SamBuilder:
    """One registry entry.

    Attributes:
        build: zero-argument callable returning a randomly initialised ``Sam`` (the architecture).
        checksum: SHA-256 (hex) of the default checkpoint, or ``None`` if the type has no download.
        url: where the default checkpoint is downloaded from, or ``None``.
    """

    build: Callable[[], Sam]
    checksum: str | None = None
    url: str | None = None

    @property
    def filename(self) -> str | None:
        """The default checkpoint's file name in the cache (the last part of ``url``)."""
        return self.url.rsplit("/", 1)[-1] if self.url else None


SAM_BUILDERS: dict[str, SamBuilder] = {}


def register_sam_builder(
    name: str, fn: Callable[[], Sam], checksum: str | None = None, url: str | None = None
) -> SamBuilder:
    """Add a model type to :data:`SAM_BUILDERS`.

    Args:
        name: the model type, as given to :func:`load_sam` and ``--sam-model``.
        fn: zero-argument callable returning a randomly initialised ``Sam``.
        checksum: SHA-256 hex digest of the default checkpoint at ``url`` (both or neither).
        url: download URL of the default checkpoint.

    Raises:
        ValueError: ``name`` is already registered, or only one of ``checksum``/``url`` is given.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if name in SAM_BUILDERS:
        raise ValueError(f"SAM model type {name!r} is already registered; pick another name.")
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    if (checksum is None) != (url is None):
        raise ValueError("`checksum` and `url` must be given together (a download is always verified).")
    if checksum is not None and (len(checksum) != 64 or any(c not in "0123456789abcdef" for c in checksum)):
        raise ValueError(f"`checksum` must be a 64-digit lower-case hex SHA-256, got {checksum!r}.")
    entry = SamBuilder(build=fn, checksum=checksum, url=url)
    SAM_BUILDERS[name] = entry
    return entry


def _official(name: str) -> Callable[[], Sam]:
    def build() -> Sam:
        return sam_model_registry[name](checkpoint=None)

    build.__name__ = f"build_sam_{name}"
    return build


# SHA-256 of Meta's released checkpoints (the 6 hex digits in the file names are MD5 prefixes, not SHA-256).
register_sam_builder(
    "vit_h", _official("vit_h"), url=_OFFICIAL_URL.format("sam_vit_h_4b8939.pth"),
    checksum="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
)
register_sam_builder(
    "vit_l", _official("vit_l"), url=_OFFICIAL_URL.format("sam_vit_l_0b3195.pth"),
    checksum="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
)
register_sam_builder(
    "vit_b", _official("vit_b"), url=_OFFICIAL_URL.format("sam_vit_b_01ec64.pth"),
    checksum="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
)


def cache_dir() -> Path:
    """The package's cache folder: ``$PERSAM_DREAMBOOTH_CACHE`` or ``~/.cache/persam_dreambooth``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "persam_dreambooth"


def default_checkpoint_path(model_type: str) -> Path:
    """Where :func:`load_sam` keeps (and looks for) the official checkpoint of ``model_type``."""
    entry = _entry(model_type)
    if entry.filename is None:
        raise ValueError(
            f"SAM model type {model_type!r} has no default checkpoint to download; pass `checkpoint` (a file path)."
        )
    return cache_dir() / "sam" / entry.filename


def _by_hand(url: str, sha256: str, dest: Path) -> str:
    return (
        f"Download {url} yourself (expected SHA-256 {sha256}) and put it at {dest}, "
        "or pass your own file with `checkpoint` / `--sam-checkpoint`."
    )


def download_checkpoint(url: str, dest: str | os.PathLike[str], sha256: str, timeout: float = 60.0) -> Path:
    """Stream ``url`` into ``dest`` with a progress bar, verify its SHA-256, then rename it into place.

    The bytes go to a temporary file beside ``dest``; only a complete, verified file is renamed to ``dest``. On any
    failure (offline, HTTP error, interrupted transfer, checksum mismatch) the temporary file is removed.

    Raises:
        CheckpointDownloadError: the download failed or the file's SHA-256 differs from ``sha256``. The message
            gives the URL, the expected SHA-256 and the exact path to put the file by hand.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, dest)
    try:
        with atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                    for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                if total is not None and out.tell() != total:
                    raise CheckpointDownloadError(
                        f"download of {url} stopped after {out.tell()} of {total} bytes. "
                        + _by_hand(url, sha256, dest)
                    )
                out.flush()
                os.fsync(out.fileno())
            got = digest.hexdigest()
            if got != sha256:
                raise CheckpointDownloadError(
                    f"the file downloaded from {url} has SHA-256 {got}, expected {sha256}; it was not kept. "
                    + _by_hand(url, sha256, dest)
                )
    except CheckpointDownloadError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:  # offline, HTTP error...
        raise CheckpointDownloadError(
            f"could not download the SAM checkpoint from {url} ({exc}). " + _by_hand(url, sha256, dest)
        ) from exc
    _write_verified_stamp(dest, sha256)
    return dest


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_text(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def _write_verified_stamp(path: Path, sha256: str) -> None:
    """Remember that ``path`` (at its current size and mtime) was verified, so later loads skip re-hashing."""
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        stamp = _stamp_path(path)
        with atomic_path(stamp) as tmp:
            tmp.write_text(_stamp_text(path, sha256), encoding="utf-8")


def _verify_cached(path: Path, sha256: str, url: str) -> None:
    stamp = _stamp_path(path)
    with contextlib.suppress(OSError):
        if stamp.read_text(encoding="utf-8") == _stamp_text(path, sha256):
            return
    logger.info("verifying SHA-256 of %s", path)
    got = file_sha256(path)
    if got != sha256:
        raise CheckpointDownloadError(
            f"the cached SAM checkpoint {path} has SHA-256 {got}, expected {sha256}; delete it (it is re-downloaded "
            "on the next run) or replace it. " + _by_hand(url, sha256, path)
        )
    _write_verified_stamp(path, sha256)


def _entry(model_type: str) -> SamBuilder:
    if model_type not in SAM_BUILDERS:
        raise ValueError(
            f"`model_type` must be one of {sorted(SAM_BUILDERS)}, got {model_type!r}."
        )
    return SAM_BUILDERS[model_type]


def _one_line(exc: Exception, limit: int = 300) -> str:
    """The gist of an exception's (often multi-line) message on one line: for torch's "Weights only load failed"
    essay, only the unpickler's reason (its advice to load with ``weights_only=False`` is not one to follow)."""
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_state_dict(path: Path, model_type: str, arg_name: str = "checkpoint") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals: all mean "not a usable checkpoint"
        raise ValueError(
            f"`{arg_name}` {str(path)!r} could not be read as a SAM {model_type!r} checkpoint (a state dict saved "
            f"with torch.save; is the file truncated or in another format?): {_one_line(exc)}"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(
            f"`{arg_name}` {str(path)!r} must hold a state dict (name -> tensor), got {type(state).__name__}."
        )
    return state


def load_sam(
    model_type: str = "vit_h",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    arg_name: str = "checkpoint",
) -> Sam:
    """Build SAM ``model_type`` and load its weights; return it in eval mode on ``device``.

    Args:
        model_type: a key of :data:`SAM_BUILDERS` (``vit_h``, ``vit_l``, ``vit_b`` and anything registered).
        checkpoint: a state-dict file to load (``torch.load(weights_only=True)``, no checksum). ``None``: the
            official checkpoint, downloaded once into :func:`default_checkpoint_path` and verified (SHA-256).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        arg_name: how errors name ``checkpoint`` (a command passes its flag, e.g. ``--sam-checkpoint``).

    Raises:
        ValueError: unknown ``model_type`` (the message lists the valid ones), a bad ``device``, or a checkpoint that
            cannot be read or does not fit the architecture (the message names ``model_type`` and the path).
        FileNotFoundError: ``checkpoint`` does not exist.
        CheckpointDownloadError: offline or checksum mismatch when downloading (says where to put the file by hand).
    """
    entry = _entry(model_type)
    dev = resolve_device(device)
    if checkpoint is None:
        path = default_checkpoint_path(model_type)
        assert entry.url is not None and entry.checksum is not None, "registry entries with a file have a URL"
        if path.is_file():
            _verify_cached(path, entry.checksum, entry.url)
        else:
            download_checkpoint(entry.url, path, entry.checksum)
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"`{arg_name}` file {str(path)!r} for SAM {model_type!r} does not exist.")
        if not path.is_file():
            raise ValueError(f"`{arg_name}` must be a file, but {str(path)!r} is a folder.")
    logger.info("loading SAM %s from %s onto %s", model_type, path, dev)
    start = time.perf_counter()
    state = _read_state_dict(path, model_type, arg_name)
    sam = entry.build()
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys, size mismatches
        summary = str(exc).splitlines()
        raise ValueError(
            f"`{arg_name}` {str(path)!r} does not fit the SAM {model_type!r} architecture (is it another model "
            f"type?): {' '.join(s.strip() for s in summary[:3])[:400]}"
        ) from exc
    del state
    sam = sam.to(dev).eval()
    logger.info("SAM %s loaded in %.1f s", model_type, time.perf_counter() - start)
    return sam
