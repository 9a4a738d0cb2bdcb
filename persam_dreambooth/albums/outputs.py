"""What an album run writes per photo, and when a photo counts as done (the output folder's layout).

Per photo ``<stem>``: ``<stem>.png`` (L mode, 0/255), ``<stem>_overlay.jpg``
(:func:`persam_dreambooth.utils.overlay.draw_overlay`) and one JSON row. With several instances (``max_instances``):
``<stem>_inst1.png``, ``<stem>_inst2.png``... one per instance, ``<stem>.png`` their union, and an overlay of all of
them. Every file is written atomically; the row of a photo is written only after its files, so a row means "this
photo's outputs are complete" (:func:`output_complete`). SAM-made reference masks are saved as ``reference_mask.png``
(:func:`reference_mask_stems`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from persam_dreambooth.segmentation.cascade import Segmentation
from persam_dreambooth.segmentation.multi_instance import union_mask
from persam_dreambooth.utils.io import atomic_save_image
from persam_dreambooth.utils.overlay import draw_overlay

__all__ = [
    "OVERLAY_SUFFIX",
    "REFERENCE_MASK_STEM",
    "check_instance_stems",
    "instance_name",
    "instance_record",
    "output_complete",
    "reference_mask_stems",
    "remove_stale_instances",
    "result_record",
    "save_instances",
    "save_mask_png",
    "save_segmentation",
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


def reference_mask_stems(count: int) -> list[str]:
    """Output names of SAM-made reference masks: ``reference_mask`` for one reference, else ``reference_mask_<i>``."""
    return [REFERENCE_MASK_STEM] if count == 1 else [f"{REFERENCE_MASK_STEM}_{i}" for i in range(1, count + 1)]
