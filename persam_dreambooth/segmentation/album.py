"""Segment a list of photos into an output folder: masks, overlays and a ``results.jsonl`` summary.

Per image ``<stem>``: ``<stem>.png`` (L mode, 0/255), ``<stem>_overlay.jpg`` (:func:`~.visualize.draw_overlay`) and
one JSON line in ``results.jsonl``. Every file is written atomically; ``results.jsonl`` is rewritten after each image,
so it always lists exactly the images whose outputs are complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from persam_dreambooth.data.images import load_image
from persam_dreambooth.segmentation.persam import PerSAM, Segmentation
from persam_dreambooth.segmentation.visualize import draw_overlay
from persam_dreambooth.utils.io import atomic_save_image, atomic_write_text

__all__ = [
    "RESULTS_FILE",
    "REFERENCE_MASK_STEM",
    "check_unique_stems",
    "save_mask_png",
    "save_segmentation",
    "segment_images",
    "result_record",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
REFERENCE_MASK_STEM = "reference_mask"  # <output>/reference_mask.png (+ _overlay.jpg) when made from a box/point


def check_unique_stems(
    paths: Sequence[str | os.PathLike[str]], arg_name: str = "images", reserved: Iterable[str] = ()
) -> list[str]:
    """The file stems of ``paths``, checked to be distinct (case-insensitively) and not ``reserved``.

    Outputs are named by stem, so ``a.jpg`` and ``a.png`` (or ``A.jpg`` on a case-insensitive disk) would overwrite
    each other.

    Raises:
        ValueError: two paths share a stem, or a stem is reserved; the message names the files.
    """
    seen: dict[str, Path] = {}
    reserved_cf = {r.casefold(): r for r in reserved}
    stems = []
    for raw in paths:
        path = Path(raw)
        key = path.stem.casefold()
        if key in reserved_cf:
            raise ValueError(
                f"`{arg_name}`: {str(path)!r} would be saved as {path.stem!r}, a name this command uses for its own "
                f"output ({reserved_cf[key]!r}); rename the file."
            )
        if key in seen:
            raise ValueError(
                f"`{arg_name}`: {str(seen[key])!r} and {str(path)!r} have the same name stem {path.stem!r}; outputs "
                "are named by stem and would overwrite each other. Rename one, or run them separately."
            )
        seen[key] = path
        stems.append(path.stem)
    return stems


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
    atomic_save_image(overlay, output_dir / f"{stem}_overlay.jpg", quality=90)


def segment_images(
    persam: PerSAM,
    image_paths: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    stems: Sequence[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Segment every image with ``persam`` (reference already set) and write the outputs into ``output_dir``.

    Args:
        persam: a :class:`PerSAM` with its reference set.
        image_paths: the photos (validated by the caller: readable, distinct stems).
        output_dir: an existing folder.
        stems: output names per image (default: the file stems).
        progress: show a tqdm bar over the images.

    Returns:
        The records written to ``results.jsonl`` (one per image, in order).
    """
    output_dir = Path(output_dir)
    stems = list(stems) if stems is not None else [Path(p).stem for p in image_paths]
    records: list[dict[str, Any]] = []
    bar = tqdm(list(zip(image_paths, stems, strict=True)), desc="segment", unit="img", disable=not progress)
    for path, stem in bar:
        image = load_image(path, "images")
        result = persam.segment(image)
        save_segmentation(output_dir, stem, image, result)
        del image
        records.append(result_record(stem, path, result))
        atomic_write_text(output_dir / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        for note in result.fallbacks:
            logger.warning("%s: %s", stem, note)
        bar.set_postfix(score=f"{result.score:.3f}")
    return records
