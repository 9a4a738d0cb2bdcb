"""Segment a list of photos into an output folder: masks, overlays and ``results.jsonl``.

Per photo ``<stem>``: ``<stem>.png`` (L mode, 0/255), ``<stem>_overlay.jpg`` (:func:`~.visualize.draw_overlay`) and
one JSON row. With several instances (``max_instances``): ``<stem>_inst1.png``, ``<stem>_inst2.png``... one per
instance, ``<stem>.png`` their union, and an overlay of all of them. Every file is written atomically; the row of a
photo is written only after its files, so a row means "this photo's outputs are complete".

:func:`segment_images` encodes in batches (optional autocast, optional embedding cache, background loading, see
:mod:`.encoding`) and decodes a batch with one ``segment_embeddings`` call when the segmenter has it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from persam_dreambooth.segmentation.encoding import BatchEncoder
from persam_dreambooth.segmentation.multi_instance import union_mask
from persam_dreambooth.segmentation.persam import PerSAM, Segmentation
from persam_dreambooth.segmentation.sharding import RESULTS_FILE, append_jsonl, write_results
from persam_dreambooth.segmentation.visualize import draw_overlay
from persam_dreambooth.utils.io import atomic_save_image, atomic_write_text

__all__ = [
    "RESULTS_FILE",
    "REFERENCE_MASK_STEM",
    "AlbumOptions",
    "check_instance_stems",
    "instance_record",
    "output_complete",
    "save_instances",
    "save_mask_png",
    "save_segmentation",
    "segment_images",
    "result_record",
    "source_info",
]

logger = logging.getLogger(__name__)

REFERENCE_MASK_STEM = "reference_mask"  # <output>/reference_mask.png (+ _overlay.jpg) when made from a box/point
OVERLAY_SUFFIX = "_overlay.jpg"
_INSTANCE = "{stem}_inst{index}"  # one PNG per instance, numbered from 1
_INSTANCE_RE = re.compile(r"^(?P<stem>.+)_inst(?P<index>[1-9][0-9]*)$", re.IGNORECASE)


def check_instance_stems(paths: Sequence[str | os.PathLike[str]], arg_name: str = "images") -> None:
    """Reject a photo whose stem is another photo's instance-mask name (``a_inst2.jpg`` beside ``a.jpg``).

    With several instances per photo, ``a.jpg`` writes ``a_inst1.png``, ``a_inst2.png``...; a photo ``a_inst2.jpg``
    would overwrite one of them. (Distinct stems are :func:`~persam_dreambooth.data.images.check_unique_stems`'s job.)

    Raises:
        ValueError: such a collision; the message names both files.
    """
    by_stem = {Path(p).stem.casefold(): Path(p) for p in paths}
    for path in by_stem.values():
        match = _INSTANCE_RE.match(path.stem)
        if match and match["stem"].casefold() in by_stem:
            raise ValueError(
                f"`{arg_name}`: {str(path)!r} would overwrite instance mask {match['index']} of "
                f"{str(by_stem[match['stem'].casefold()])!r} (saved as {path.stem!r}.png); rename the file."
            )


def save_mask_png(mask: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Save a bool ``(H, W)`` mask as an L-mode PNG with values 0/255 (atomically)."""
    atomic_save_image(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255), path)  # 2-D uint8 -> mode L


def result_record(stem: str, image_path: str | os.PathLike[str] | None, result: Segmentation) -> dict[str, Any]:
    """The JSON-ready summary of one segmentation (one line of ``results.jsonl``)."""
    height, width = result.mask.shape
    area = result.area
    return {
        "stem": stem,
        "image": None if image_path is None else str(image_path),
        "score": round(float(result.score), 6),
        "points_xy": np.asarray(result.points_xy).astype(int).tolist(),
        "point_labels": np.asarray(result.point_labels).astype(int).tolist(),
        "mask_area": area,
        "mask_fraction": round(area / float(height * width), 6),
        "height": height,
        "width": width,
        "stage_used": int(result.stage_used),
        "fallbacks": list(result.fallbacks),
        "seconds": round(float(result.seconds), 4),
    }


def save_segmentation(output_dir: Path, stem: str, image: np.ndarray, result: Segmentation) -> None:
    """Write ``<stem>.png`` and ``<stem>_overlay.jpg`` into ``output_dir``."""
    save_mask_png(result.mask, output_dir / f"{stem}.png")
    overlay = draw_overlay(image, result.mask, result.points_xy, result.point_labels, result.similarity)
    atomic_save_image(overlay, output_dir / f"{stem}{OVERLAY_SUFFIX}", quality=90)


def instance_name(stem: str, index: int) -> str:
    """File name of instance ``index`` (from 1) of photo ``stem``: ``<stem>_inst<index>.png``."""
    return _INSTANCE.format(stem=stem, index=index) + ".png"


def save_instances(output_dir: Path, stem: str, image: np.ndarray, results: Sequence[Segmentation]) -> list[str]:
    """Write ``<stem>_inst<i>.png`` per instance, ``<stem>.png`` (their union) and one overlay of all of them.

    Instance PNGs left by an earlier run with more instances (``<stem>_inst<j>.png``, ``j > len(results)``) are
    removed, so the folder shows exactly this result. Returns the instance file names.
    """
    if not results:
        raise ValueError(f"`results` for {stem!r} must hold at least one instance.")
    names = []
    for index, result in enumerate(results, start=1):
        names.append(instance_name(stem, index))
        save_mask_png(result.mask, output_dir / names[-1])
    remove_stale_instances(output_dir, stem, keep=len(results))
    union = union_mask(results)
    save_mask_png(union, output_dir / f"{stem}.png")
    points = np.concatenate([np.asarray(r.points_xy).reshape(-1, 2) for r in results])  # (sum N_i, 2)
    labels = np.concatenate([np.asarray(r.point_labels).reshape(-1) for r in results])  # (sum N_i,)
    overlay = draw_overlay(image, union, points, labels, results[0].similarity)
    atomic_save_image(overlay, output_dir / f"{stem}{OVERLAY_SUFFIX}", quality=90)
    return names


def remove_stale_instances(output_dir: Path, stem: str, keep: int = 0) -> None:
    """Delete ``<stem>_inst<j>.png`` for every ``j > keep`` in ``output_dir``."""
    for path in output_dir.glob(f"{glob.escape(stem)}_inst*.png"):
        match = _INSTANCE_RE.match(path.stem)
        if match and match["stem"] == stem and int(match["index"]) > keep:
            path.unlink(missing_ok=True)


def instance_record(
    stem: str, image_path: str | os.PathLike[str] | None, results: Sequence[Segmentation]
) -> dict[str, Any]:
    """The JSON row of a multi-instance result: the first instance's fields (as :func:`result_record`), the union's
    area, and ``instances``: one entry per instance (file, score, points, area, box, stage, fallbacks)."""
    row = result_record(stem, image_path, results[0])
    union = union_mask(results)
    row["mask_area"] = int(union.sum())
    row["mask_fraction"] = round(row["mask_area"] / float(union.size), 6)
    row["fallbacks"] = [note for r in results for note in r.fallbacks]
    row["seconds"] = round(float(sum(r.seconds for r in results)), 4)
    row["num_instances"] = len(results)
    row["instances"] = [
        {
            "index": index,
            "mask": instance_name(stem, index),
            "score": round(float(r.score), 6),
            "points_xy": np.asarray(r.points_xy).astype(int).tolist(),
            "point_labels": np.asarray(r.point_labels).astype(int).tolist(),
            "mask_area": r.area,
            "box_xyxy": None if r.box_xyxy is None else np.asarray(r.box_xyxy).astype(int).tolist(),
            "stage_used": int(r.stage_used),
            "fallbacks": list(r.fallbacks),
        }
        for index, r in enumerate(results, start=1)
    ]
    return row


def source_info(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"bytes": size, "mtime_ns": ...}`` of an input photo: a row is reused on resume only if these still match."""
    stat = Path(path).stat()
    return {"bytes": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def _png_ok(path: Path, size_hw: tuple[int, int] | None) -> bool:
    try:
        with Image.open(path) as img:
            if img.format != "PNG" or (size_hw is not None and img.size != (size_hw[1], size_hw[0])):
                return False
            img.verify()  # reads every chunk and checks its CRC
    except Exception:  # noqa: BLE001 - any failure means "not complete"
        return False
    return True


def output_complete(
    output_dir: str | os.PathLike[str], row: Mapping[str, Any], image_path: str | os.PathLike[str],
    max_instances: int | None = None,
) -> bool:
    """Whether ``row`` describes complete outputs of ``image_path`` in ``output_dir`` (resume skips the photo).

    Complete = the row names this photo (same path, same file size and mtime), ``<stem>.png`` is a valid PNG of the
    row's size, the overlay opens, and with ``max_instances`` the row lists 1..``max_instances`` instances whose PNGs
    are valid too.
    """
    output_dir = Path(output_dir)
    try:
        stem = str(row["stem"])
        if row.get("image") != str(image_path) or row.get("source") != source_info(image_path):
            return False
        size = (int(row["height"]), int(row["width"]))
        if not _png_ok(output_dir / f"{stem}.png", size):
            return False
        with Image.open(output_dir / f"{stem}{OVERLAY_SUFFIX}") as overlay:
            if overlay.format != "JPEG":
                return False
        instances = row.get("instances")
        if max_instances is None:
            return instances is None
        if not isinstance(instances, list) or not 1 <= len(instances) <= max_instances:
            return False
        return all(_png_ok(output_dir / str(inst["mask"]), size) for inst in instances)
    except Exception:  # noqa: BLE001 - missing keys, missing files, bad types: not complete
        return False


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
        encoder: a :class:`~.encoding.BatchEncoder` of ``persam.predictor`` (dtype, cache); default: float32, no cache.
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
