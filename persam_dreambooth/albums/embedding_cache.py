"""An on-disk cache of SAM image embeddings, keyed by image content and encoder identity.

One ``.safetensors`` file per (image, encoder): segmenting the same photos again, with another reference, another
method or more instances, skips the image encoder. The key is the SHA-256 of

* the decoded RGB pixels and their shape (:func:`pixels_sha256`: the same photo re-saved without change of pixels
  hits, a resized or re-compressed one misses), and
* the encoder identity (:class:`EncoderIdentity`): SAM model type, SHA-256 of the weights, ``img_size`` and the
  encoder dtype (``float32`` / ``bfloat16`` / ``float16`` autocast give different features).

Layout: ``<root>/<identity[:16]>/model.json`` (what the folder holds, for humans) and
``<root>/<identity[:16]>/<key[:2]>/<key>.safetensors`` with one tensor ``features`` ``(C, h, w)`` float32 and
metadata: format, identity, pixel digest, ``original_size``, ``input_size`` and the SHA-256 of the tensor bytes.

Safety: files are written to a temporary name and renamed into place (:func:`~persam_dreambooth.utils.io.atomic_path`),
so concurrent writers of the same key each rename a complete file (the last one wins; both are identical). A file
that cannot be read, is truncated, or whose metadata or checksum does not match is logged, deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from persam_dreambooth.segmentation.predictor import ImageEmbedding
from persam_dreambooth.segmentation.sam import SAM_BUILDERS, cache_dir
from persam_dreambooth.utils.io import atomic_path, atomic_write_json, dumps_json, file_sha256

__all__ = [
    "CACHE_FORMAT",
    "EmbeddingCache",
    "EncoderIdentity",
    "checkpoint_sha256",
    "pixels_sha256",
    "state_dict_sha256",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the file layout or metadata changes (old files then miss and are rewritten)
_STAMP_DIR = "checkpoint_sha256"  # under the package cache: remembered checkpoint hashes (path, size, mtime)


def pixels_sha256(image: np.ndarray) -> str:
    """SHA-256 (hex) of an ``(H, W, 3)`` uint8 RGB array: its shape, then its bytes in C order."""
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"`image` must be an (H, W, 3) uint8 array, got {array.dtype} {tuple(array.shape)}.")
    digest = hashlib.sha256(f"{array.shape[0]}x{array.shape[1]}x3:".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _stamp_file(path: Path) -> Path:
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / _STAMP_DIR / f"{name}.json"


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint file, hashed once per (path, size, mtime) and remembered in the package cache.

    The remembered value lives in ``$PERSAM_DREAMBOOTH_CACHE/checkpoint_sha256/`` (not beside your file), so a
    2.5 GB ViT-H checkpoint is read once, not on every run. A changed file (size or mtime) is hashed again.
    """
    path = Path(path)
    stat = path.stat()
    stamp = _stamp_file(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if (saved["path"], saved["size"], saved["mtime_ns"]) == (str(path.resolve()), stat.st_size, stat.st_mtime_ns):
            return str(saved["sha256"])
    logger.info("hashing %s (once; remembered in %s)", path, stamp.parent)
    digest = file_sha256(path)
    with contextlib.suppress(OSError):  # an unwritable cache only costs a re-hash next time
        atomic_write_json(stamp, {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "sha256": digest})
    return digest


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in key order), for models without a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous()  # any shape (0-d included) -> (n,)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())  # (n,) -> (n * itemsize,) raw bytes
    return digest.hexdigest()


def weights_sha256(
    sam: nn.Module | None = None, checkpoint: str | os.PathLike[str] | None = None, official_type: str | None = None
) -> str:
    """The SHA-256 that identifies ``sam``'s weights.

    Args:
        sam: the model (hashed with :func:`state_dict_sha256` when neither of the others is given).
        checkpoint: the file ``sam`` was loaded from: its SHA-256 (:func:`checkpoint_sha256`, remembered).
        official_type: the model type when ``sam`` came from ``load_sam(official_type)`` without a checkpoint, i.e.
            the official weights, verified against their published SHA-256, which is returned (no hashing).
    """
    if checkpoint is not None:
        return checkpoint_sha256(checkpoint)
    if official_type is not None:
        entry = SAM_BUILDERS.get(official_type)
        if entry is None or entry.checksum is None:
            raise ValueError(f"`official_type` {official_type!r} has no published checkpoint SHA-256.")
        return entry.checksum
    if sam is None:
        raise ValueError("Give `sam`, `checkpoint` or `official_type` to identify the weights.")
    return state_dict_sha256(sam)


@dataclass(frozen=True, kw_only=True)
class EncoderIdentity:
    """What decides an image embedding besides the pixels.

    Attributes:
        model_type: SAM model type (``vit_h``...).
        weights_sha256: :func:`weights_sha256` of the model.
        img_size: the encoder's square input side.
        encoder_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (autocast of the image encoder).
    """

    model_type: str
    weights_sha256: str
    img_size: int
    encoder_dtype: str

    @property
    def digest(self) -> str:
        """SHA-256 of the identity (format version included)."""
        text = dumps_json({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


class EmbeddingCache:
    """Image embeddings of one encoder on disk (see the module docstring for the key and the layout).

    Args:
        root: the cache folder (created on the first write).
        identity: the encoder that produced / will produce the embeddings.

    Attributes:
        hits, misses, writes, discarded: counters since construction (``discarded``: unreadable files removed).
    """

    def __init__(self, root: str | os.PathLike[str], identity: EncoderIdentity) -> None:
        self.root = Path(root)
        self.identity = identity
        self._identity_digest = identity.digest
        self.folder = self.root / self._identity_digest[:16]
        self.hits = self.misses = self.writes = self.discarded = 0
        self._lock = threading.Lock()  # counters only; files are safe by construction

    def key(self, pixels_digest: str) -> str:
        """The file key of an image (its :func:`pixels_sha256`) under this encoder."""
        return hashlib.sha256(f"{self._identity_digest}:{pixels_digest}".encode()).hexdigest()

    def path(self, pixels_digest: str) -> Path:
        """Where the embedding of the image with :func:`pixels_sha256` ``pixels_digest`` is stored."""
        key = self.key(pixels_digest)
        return self.folder / key[:2] / f"{key}.safetensors"

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def get(self, pixels_digest: str) -> ImageEmbedding | None:
        """The cached embedding (features ``(C, h, w)`` float32 on CPU), or ``None`` on a miss.

        A file that is unreadable, truncated or does not match (metadata, checksum) is deleted with a warning and
        counts as a miss.
        """
        path = self.path(pixels_digest)
        if not path.is_file():
            self._count("misses")
            return None
        try:
            embedding = self._read(path, pixels_digest)
        except Exception as exc:  # safetensors errors, OSError, bad metadata: all mean "recompute"
            logger.warning("embedding cache: discarding unreadable entry %s (%s); it is recomputed", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            self._count("discarded")
            self._count("misses")
            return None
        self._count("hits")
        return embedding

    def _read(self, path: Path, pixels_digest: str) -> ImageEmbedding:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            features = handle.get_tensor("features")
        expected = {"format": CACHE_FORMAT, "encoder": self._identity_digest, "pixels": pixels_digest}
        for name, value in expected.items():
            if meta.get(name) != value:
                raise ValueError(f"metadata {name!r} is {meta.get(name)!r}, expected {value!r}")
        if features.dtype != torch.float32 or features.ndim != 3:
            raise ValueError(f"features must be (C, h, w) float32, got {features.dtype} {tuple(features.shape)}")
        if _tensor_sha256(features) != meta.get("features_sha256"):
            raise ValueError("features checksum mismatch")
        original = tuple(int(v) for v in json.loads(meta["original_size"]))
        resized = tuple(int(v) for v in json.loads(meta["input_size"]))
        if len(original) != 2 or len(resized) != 2:
            raise ValueError(f"bad sizes {original} / {resized}")
        return ImageEmbedding(features, original, resized)  # type: ignore[arg-type]

    def put(self, pixels_digest: str, embedding: ImageEmbedding) -> bool:
        """Store ``embedding`` (any device/dtype; saved as float32 on CPU). Returns False if it could not be written.

        Never raises for disk problems (full, read-only): the cache is an optimisation, so a warning is logged.
        """
        features = embedding.features.detach().to("cpu", torch.float32).contiguous()  # (C, h, w)
        meta = {
            "format": CACHE_FORMAT,
            "encoder": self._identity_digest,
            "pixels": pixels_digest,
            "original_size": dumps_json([int(v) for v in embedding.original_size]),
            "input_size": dumps_json([int(v) for v in embedding.input_size]),
            "features_sha256": _tensor_sha256(features),
        }
        path = self.path(pixels_digest)
        try:
            self._describe()
            with atomic_path(path) as tmp:
                save_file({"features": features}, str(tmp), metadata=meta)
        except OSError as exc:
            logger.warning("embedding cache: could not write %s (%s); continuing without caching it", path, exc)
            return False
        self._count("writes")
        return True

    def _describe(self) -> None:
        info = self.folder / "model.json"
        if not info.is_file():
            atomic_write_json(info, {"format": CACHE_FORMAT, **asdict(self.identity)})


def _tensor_sha256(features: torch.Tensor) -> str:
    data = features.contiguous().reshape(-1).view(torch.uint8).numpy()  # (C, h, w) float32 -> raw bytes
    return hashlib.sha256(memoryview(data)).hexdigest()
