"""Segment a list of photos into an output folder: encode in batches, decode, write files in the background.

:func:`segment_images` encodes in batches (optional autocast, optional embedding cache, background loading, see
:mod:`.batch_encoder`), decodes a batch with one ``segment_embeddings`` call when the segmenter has it, and writes
each photo's files and row (:mod:`.outputs`) in a writer thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from persam_dreambooth.albums.batch_encoder import BatchEncoder
from persam_dreambooth.albums.outputs import (
    instance_record,
    remove_stale_instances,
    result_record,
    save_instances,
    save_segmentation,
    source_info,
)
from persam_dreambooth.albums.sharding import append_jsonl, write_results
from persam_dreambooth.segmentation.persam import PerSAM
from persam_dreambooth.utils.io import atomic_write_text

__all__ = ["AlbumOptions", "segment_images"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AlbumOptions:
    """How :func:`segment_images` runs.

    Attributes:
        batch_size: photos encoded (and decoded, with ``segment_embeddings``) together; 1 = the faithful path.
        max_instances: None = one mask per photo (default); k = up to k instances (``segment_embedding(...,
            max_instances=k)``), one PNG each plus their union.
        similarity_threshold: forwarded to the multi-instance search when set (else the segmenter's default).
        overlap_iou: forwarded likewise.
        prefetch: batches decoded ahead in a background thread (0: none).
        background_writes: write masks and overlays in a background thread (False: in the calling thread).
        progress: show a tqdm bar.
    """

    batch_size: int = 1
    max_instances: int | None = None
    similarity_threshold: float | None = None
    overlap_iou: float | None = None
    prefetch: int = 2
    background_writes: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {self.batch_size!r}.")
        if self.max_instances is not None and (not isinstance(self.max_instances, int) or self.max_instances < 1):
            raise ValueError(f"`max_instances` must be None or an int >= 1, got {self.max_instances!r}.")
        if self.max_instances is None and (self.similarity_threshold is not None or self.overlap_iou is not None):
            raise ValueError("`similarity_threshold` and `overlap_iou` apply only with `max_instances`.")

    def instance_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``segment_embedding(s)``: empty for the single-instance default."""
        if self.max_instances is None:
            return {}
        kwargs: dict[str, Any] = {"max_instances": self.max_instances}
        if self.similarity_threshold is not None:
            kwargs["similarity_threshold"] = self.similarity_threshold
        if self.overlap_iou is not None:
            kwargs["overlap_iou"] = self.overlap_iou
        return kwargs


def _decode(segmenter: Any, embeddings: list[Any], options: AlbumOptions) -> list[Any]:
    kwargs = options.instance_kwargs()
    if len(embeddings) > 1 and hasattr(segmenter, "segment_embeddings"):
        return list(segmenter.segment_embeddings(embeddings, **kwargs))
    return [segmenter.segment_embedding(e, **kwargs) for e in embeddings]


def _finish_photo(
    output_dir: Path, path: Path, stem: str, pixels: np.ndarray, result: Any, cached: bool, encode_share: float,
    max_instances: int | None, extra_fields: Mapping[str, Any] | None, log_file: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """Write one photo's files, then its row (appended to ``log_file`` last). Runs in the writer thread."""
    if max_instances is None:
        save_segmentation(output_dir, stem, pixels, result)
        remove_stale_instances(output_dir, stem)
        row = result_record(stem, path, result)
    else:
        save_instances(output_dir, stem, pixels, result)
        row = instance_record(stem, path, result)
    row["seconds"] = round(row["seconds"] + encode_share, 4)
    row["cached"] = bool(cached)
    row["source"] = source_info(path)
    row.update(extra_fields or {})
    if log_file is not None:
        append_jsonl(log_file, row)
    return row


def segment_images(
    persam: PerSAM,
    image_paths: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    stems: Sequence[str] | None = None,
    progress: bool = True,
    *,
    options: AlbumOptions | None = None,
    encoder: BatchEncoder | None = None,
    log_file: str | os.PathLike[str] | None = None,
    extra_fields: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Segment every photo with ``persam`` (reference already set) and write the outputs into ``output_dir``.

    Photos are decoded ahead in one background thread (``options.prefetch``) and their files (mask PNGs, overlay)
    written in another (``options.background_writes``), so the model is not kept waiting by the disk or by PIL.

    Args:
        persam: a :class:`PerSAM` (or PerSAM-F: anything with ``predictor`` and ``segment_embedding``) with its
            reference set.
        image_paths: the photos (validated by the caller: readable, distinct stems).
        output_dir: an existing folder.
        stems: output names per photo (default: the file stems).
        progress: show a tqdm bar over the photos (``options.progress`` wins when ``options`` is given).
        options: batch size and instances (default :class:`AlbumOptions`: one at a time, one instance).
        encoder: a :class:`~.batch_encoder.BatchEncoder` of ``persam.predictor`` (dtype, cache); default: float32,
            no cache.
        log_file: if given, each row is appended to this file as soon as its photo's outputs are written (the
            resume log) and ``results.jsonl`` is not written; if None, ``results.jsonl`` is written at the end.
        extra_fields: added to every row (e.g. PerSAM-F's ``scale_weights``).

    Returns:
        The rows, one per photo, in order. Each has :func:`result_record`'s fields (or :func:`instance_record`'s),
        plus ``source`` (:func:`source_info`), ``cached`` (embedding from the cache) and ``extra_fields``.
    """
    output_dir = Path(output_dir)
    options = options if options is not None else AlbumOptions(progress=progress)
    encoder = encoder if encoder is not None else BatchEncoder(persam.predictor)
    paths = [Path(p) for p in image_paths]
    stems = list(stems) if stems is not None else [p.stem for p in paths]
    if len(stems) != len(paths):
        raise ValueError(f"`stems` must have one entry per image ({len(paths)}), got {len(stems)}.")
    if log_file is not None:
        atomic_write_text(log_file, "")  # a fresh log: earlier rows were merged into results.jsonl by the caller
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(paths), desc="segment", unit="img", disable=not options.progress)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persam-write") if options.background_writes \
        else None  # one worker: rows are appended in input order
    pending: deque[Future[dict[str, Any]]] = deque()

    def collect(row: dict[str, Any]) -> None:
        records.append(row)
        for note in row["fallbacks"]:
            logger.warning("%s: %s", row["stem"], note)
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}")

    def drain(keep: int) -> None:  # collect finished writes, waiting while more than ``keep`` are in flight
        while pending and (len(pending) > keep or pending[0].done()):
            collect(pending.popleft().result())

    try:
        for batch in encoder.iter_batches(paths, options.batch_size, options.prefetch, arg_name="images"):
            start = time.perf_counter()
            embeddings = encoder.encode(batch)
            encode_share = (time.perf_counter() - start) / len(batch)
            results = _decode(persam, embeddings, options)
            for item, result in zip(batch, results, strict=True):
                args = (output_dir, paths[item.index], stems[item.index], item.pixels, result, item.cached,
                        encode_share, options.max_instances, extra_fields, log_file)
                if writer is None:
                    collect(_finish_photo(*args))
                else:
                    pending.append(writer.submit(_finish_photo, *args))
            del batch, embeddings, results
            drain(keep=2 * options.batch_size)  # bounded: photos waiting to be written hold their pixels
        drain(keep=0)
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # photos already handed over are still written (and logged) on errors
        bar.close()
    if log_file is None:
        write_results(output_dir, records)
    return records
