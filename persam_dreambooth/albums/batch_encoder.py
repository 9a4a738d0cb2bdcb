"""Encoding many images: batches, optional autocast, an optional embedding cache and background loading.

    encoder = BatchEncoder(persam.predictor, encoder_dtype="bfloat16", cache=cache)
    for batch in encoder.iter_batches(paths, batch_size=8):      # photos decoded/resized in a background thread
        embeddings = encoder.encode(batch)                        # cache hits skip the encoder; misses: one call
        ...

* ``encoder_dtype="float32"`` (default) with batches of one runs exactly ``GuidedSamPredictor.encode``: the features
  are bit-identical to :meth:`~.persam.PerSAM.segment`'s. Batches of several images in float32 agree to float
  rounding (the encoder's matmuls see another batch size).
* ``"bfloat16"`` / ``"float16"``: the image encoder (only) runs under ``torch.autocast``; the features are returned
  as float32, and the decoder, which runs later, is never autocast.

Shapes: ``(H, W, 3)`` uint8 photos, ``(3, h', w')`` uint8 resized tensors, ``(C, h, w)`` float32 features.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from persam_dreambooth.albums.embedding_cache import EmbeddingCache, pixels_sha256
from persam_dreambooth.data.images import ImageLike, load_image
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding

__all__ = ["ENCODER_DTYPES", "BatchEncoder", "LoadedImage", "check_encoder_dtype"]

ENCODER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def check_encoder_dtype(name: str, arg_name: str = "encoder_dtype") -> str:
    """Return ``name`` if it is a key of :data:`ENCODER_DTYPES`, else raise ``ValueError`` naming ``arg_name``."""
    if name not in ENCODER_DTYPES:
        raise ValueError(f"`{arg_name}` must be one of {list(ENCODER_DTYPES)}, got {name!r}.")
    return name


@dataclass(eq=False)
class LoadedImage:
    """One photo, decoded and ready for the encoder (or already encoded, from the cache).

    Attributes:
        index: its position in the caller's list.
        source: the path (or ``None`` for an in-memory image).
        pixels: ``(H, W, 3)`` uint8 RGB.
        digest: :func:`~.embedding_cache.pixels_sha256` of ``pixels`` when a cache is used, else ``None``.
        embedding: the cached embedding (a hit), or ``None``.
        prepared: ``(3, h', w')`` uint8 resized tensor on the model's device for a miss, else ``None``.
        original_size: ``(H, W)``.
        cached: True when ``embedding`` came from the cache (no encoder call for this photo).
    """

    index: int
    source: Path | None
    pixels: np.ndarray
    digest: str | None
    embedding: ImageEmbedding | None
    prepared: Tensor | None
    original_size: tuple[int, int]
    cached: bool = False


class BatchEncoder:
    """Run SAM's image encoder on batches of photos, with optional autocast and cache.

    Args:
        predictor: the :class:`~.predictor.GuidedSamPredictor` whose SAM encodes.
        encoder_dtype: ``"float32"`` (faithful default), ``"bfloat16"`` or ``"float16"`` (autocast of the encoder).
        cache: an :class:`~.embedding_cache.EmbeddingCache` built for the same SAM and ``encoder_dtype``, or None.

    Attributes:
        encoder_calls: image-encoder forward calls made so far (a batch counts once).
        images_encoded: photos that went through the encoder (cache misses).
        encoder_seconds: wall time spent in the encoder (synchronised on CUDA).
    """

    def __init__(
        self, predictor: GuidedSamPredictor, encoder_dtype: str = "float32", cache: EmbeddingCache | None = None
    ) -> None:
        self.predictor = predictor
        self.encoder_dtype = check_encoder_dtype(encoder_dtype)
        if cache is not None and cache.identity.encoder_dtype != encoder_dtype:
            raise ValueError(
                f"`cache` was built for encoder dtype {cache.identity.encoder_dtype!r}, but `encoder_dtype` is "
                f"{encoder_dtype!r}; their embeddings differ."
            )
        self.cache = cache
        self.encoder_calls = 0
        self.images_encoded = 0
        self.encoder_seconds = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, image: ImageLike, index: int = 0, arg_name: str = "image") -> LoadedImage:
        """Decode ``image``; look it up in the cache; resize a miss for the encoder. Thread-safe (CPU + a copy)."""
        pixels = load_image(image, arg_name)  # (H, W, 3) uint8 RGB
        source = Path(image) if isinstance(image, str | os.PathLike) else None
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        digest = embedding = prepared = None
        if self.cache is not None:
            digest = pixels_sha256(pixels)
            embedding = self.cache.get(digest)
        if embedding is None:
            prepared, size = self.predictor.prepare(pixels, arg_name)  # (3, h', w') uint8 on the device
        return LoadedImage(index, source, pixels, digest, embedding, prepared, size, cached=embedding is not None)

    def iter_batches(
        self, images: Sequence[ImageLike], batch_size: int = 1, prefetch: int = 2, arg_name: str = "images"
    ) -> Iterator[list[LoadedImage]]:
        """Yield :class:`LoadedImage` lists of up to ``batch_size``, in order, loading ahead in one background thread.

        Args:
            images: paths (or arrays / PIL images).
            batch_size: photos per batch (>= 1).
            prefetch: batches decoded ahead of the one being encoded (0: load in the calling thread).
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if prefetch < 0:
            raise ValueError(f"`prefetch` must be >= 0, got {prefetch}.")
        items = list(images)
        if prefetch == 0:
            for start in range(0, len(items), batch_size):
                yield [self.load(items[i], i, f"{arg_name}[{i}]") for i in range(start, min(len(items),
                                                                                           start + batch_size))]
            return
        ahead = batch_size * (prefetch + 1)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persam-load")
        pending: deque[Future[LoadedImage]] = deque()
        try:
            submitted = 0
            while submitted < len(items) or pending:
                while submitted < len(items) and len(pending) < ahead:
                    pending.append(pool.submit(self.load, items[submitted], submitted, f"{arg_name}[{submitted}]"))
                    submitted += 1
                batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
                yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, batch: Sequence[LoadedImage]) -> list[ImageEmbedding]:
        """The embeddings of ``batch``, in order: hits from the cache, misses in one encoder call (then cached).

        Features are float32 ``(C, h, w)``; hits are on CPU, misses on the model's device.
        """
        misses = [item for item in batch if item.embedding is None]
        if misses:
            encoded = self._run_encoder([m.prepared for m in misses], [m.original_size for m in misses])
            for item, embedding in zip(misses, encoded, strict=True):
                item.embedding = embedding
                item.prepared = None  # free the resized copy
                if self.cache is not None and item.digest is not None:
                    self.cache.put(item.digest, embedding)
        return [item.embedding for item in batch]  # type: ignore[misc]

    def encode_images(self, images: Sequence[ImageLike], arg_name: str = "images") -> list[ImageEmbedding]:
        """Encode ``images`` (paths, PIL images or arrays) in one batch, through the cache. No background thread."""
        loaded = [self.load(img, i, f"{arg_name}[{i}]" if len(images) > 1 else arg_name)
                  for i, img in enumerate(images)]
        return self.encode(loaded)

    @torch.no_grad()
    def _run_encoder(self, tensors: Sequence[Tensor | None], sizes: Sequence[tuple[int, int]]) -> list[ImageEmbedding]:
        device = self.predictor.device
        _sync(device)
        start = time.perf_counter()
        autocast = (
            torch.autocast(device_type=device.type, dtype=ENCODER_DTYPES[self.encoder_dtype])
            if self.encoder_dtype != "float32" else contextlib.nullcontext()
        )
        with autocast:
            embeddings = self.predictor.encode_prepared(tensors, sizes)  # type: ignore[arg-type]
        if self.encoder_dtype != "float32" or len(embeddings) > 1:
            # float32 features, each its own tensor (not a view that keeps the whole batch alive)
            embeddings = [
                ImageEmbedding(e.features.float().clone(), e.original_size, e.input_size) for e in embeddings
            ]
        _sync(device)
        with self._lock:
            self.encoder_seconds += time.perf_counter() - start
            self.encoder_calls += 1
            self.images_encoded += len(embeddings)
        return embeddings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
