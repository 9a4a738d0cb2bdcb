"""Build a :class:`~.store.MaskSet` for the instance images before training.

* :func:`make_mask_set`: PerSAM (or PerSAM-F) segments the subject in every instance image from one marked
  reference photo (a mask, or a box / point that plain SAM turns into the reference mask first).
* :func:`copy_mask_set`: hand-made masks from a folder, copied into the run (so a run is self-contained).

Both write the set into a temporary folder and rename it into place once every mask is known to be non-empty, so a
failure never leaves a partial mask set; both add ``masks_grid.jpg``, an overlay contact sheet to check by eye.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from persam_dreambooth.data.images import check_unique_stems, load_image
from persam_dreambooth.masks.store import MaskSet
from persam_dreambooth.utils.io import atomic_dir, atomic_save_image
from persam_dreambooth.utils.overlay import masks_grid

logger = logging.getLogger(__name__)

__all__ = [
    "GRID_NAME", "make_mask_set", "copy_mask_set", "write_masks_grid", "segmenter_class",
]

GRID_NAME = "masks_grid.jpg"


def segmenter_class(method: str) -> Any:
    """``PerSAM`` or ``PerSAMF`` for a mask set's ``mask_method`` (``"persam-f"`` is accepted for ``"persam_f"``).

    Raises:
        ValueError: unknown method (naming ``mask_method``).
    """
    from persam_dreambooth.segmentation.methods import segmenter_class as by_name

    return by_name(method, "mask_method")


def _version() -> str:
    from persam_dreambooth import __version__

    return __version__


def make_mask_set(
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    reference_image: str | os.PathLike[str],
    *,
    reference_mask: str | os.PathLike[str] | None = None,
    reference_box: Sequence[float] | None = None,
    reference_point: Sequence[float] | None = None,
    method: str = "persam",
    sam: Any = None,
    sam_model_type: str = "vit_h",
    sam_checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> MaskSet:
    """Segment the subject in ``images`` with PerSAM(-F) and write the mask set to ``out_dir``.

    Args:
        images: the instance photos (their stems name the masks; they must be distinct).
        out_dir: the mask folder to create (replaced if it exists, only after every mask succeeded).
        reference_image: the marked photo (may be one of ``images``).
        reference_mask / reference_box / reference_point: exactly one; the box is ``(x0, y0, x1, y1)`` and the
            point ``(x, y)`` in reference-image pixels.
        method: ``"persam"`` or ``"persam_f"`` (``"persam-f"`` accepted).
        sam: a loaded ``Sam``; otherwise ``load_sam(sam_model_type, sam_checkpoint, device)``.

    Raises:
        ValueError: not exactly one reference prompt, an empty reference, or an image where nothing was found.
    """
    from persam_dreambooth.segmentation.methods import canonical_method
    from persam_dreambooth.segmentation.reference_prompt import read_marked_references, set_marked_reference

    method = canonical_method(method, "mask_method")
    marked = read_marked_references(  # every argument checked before SAM is loaded
        [reference_image],
        masks=None if reference_mask is None else [reference_mask],
        boxes=None if reference_box is None else [reference_box],
        points=None if reference_point is None else [reference_point],
    )
    stems = check_unique_stems(images, arg_name="instance images")
    segmenter_cls = segmenter_class(method)
    if sam is None:
        from persam_dreambooth.segmentation.sam import load_sam

        sam = load_sam(sam_model_type, checkpoint=sam_checkpoint, device=device)
    segmenter = segmenter_cls(sam)
    (shot,) = set_marked_reference(segmenter, marked)  # the reference photo is encoded once
    reference_score = shot.score
    ref_pixels = marked[0].image

    masks: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    for path, stem in tqdm(list(zip(images, stems, strict=True)), desc="masks", disable=not progress):
        pixels = load_image(path, "instance image")
        if pixels.shape == ref_pixels.shape and np.array_equal(pixels, ref_pixels):
            result = segmenter.segment_embedding(shot.embedding)  # the reference photo itself: already encoded
        else:
            result = segmenter.segment_embedding(segmenter.encode(pixels, "instance image"))
        if not result.mask.any():
            raise ValueError(
                f"{method} found no subject in instance image {str(path)!r}: the mask is empty. Check the "
                "reference (mask/box/point), use a reference photo closer to this one, or give `mask_dir`."
            )
        masks[stem] = result.mask
        entries[stem] = {
            "image": str(Path(path).resolve()),
            "score": round(float(result.score), 6),
            "coverage": round(float(result.mask.mean()), 6),
            "presence": round(float(np.max(result.similarity)), 6),  # peak location confidence (subject present?)
            "points_xy": np.asarray(result.points_xy).astype(int).tolist(),
            "fallbacks": list(getattr(result, "fallbacks", ())),
        }
        for note in getattr(result, "fallbacks", ()):
            logger.warning("%s: %s", stem, note)
    record = {
        "source": method,
        "method": method,
        "reference": {
            "image": str(Path(reference_image).resolve()),
            "mask": str(Path(reference_mask).resolve()) if reference_mask is not None else None,
            "box": list(reference_box) if reference_box is not None else None,
            "point": list(reference_point) if reference_point is not None else None,
            "reference_mask_score": reference_score,
        },
        "sam_model_type": sam_model_type,
        "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint is not None else None,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package_version": _version(),
        "images": entries,
    }
    return _write_set(out_dir, masks, record, images)


def copy_mask_set(
    images: Sequence[str | os.PathLike[str]], source: MaskSet, out_dir: str | os.PathLike[str]
) -> MaskSet:
    """Copy the masks of ``images`` from ``source`` into ``out_dir`` as PNG, with a record naming the source."""
    stems = check_unique_stems(images, arg_name="instance images")
    masks, entries = {}, {}
    for path, stem in zip(images, stems, strict=True):
        mask = source.load_for(path)
        if not mask.any():
            raise ValueError(f"the mask for instance image {str(path)!r} in {str(source.folder)!r} is empty.")
        masks[stem] = mask
        entries[stem] = {"image": str(Path(path).resolve()), "mask": str(source.path_for(path)),
                         "coverage": round(float(mask.mean()), 6)}
    record = {
        "source": "dir",
        "mask_dir": str(source.folder.resolve()),
        "source_record": source.record or None,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package_version": _version(),
        "images": entries,
    }
    return _write_set(out_dir, masks, record, images)


def _write_set(out_dir: str | os.PathLike[str], masks: dict[str, np.ndarray], record: dict[str, Any],
               images: Sequence[str | os.PathLike[str]]) -> MaskSet:
    """Build the set under a temporary name and put it in place whole, with the umask's ordinary modes."""
    with atomic_dir(out_dir) as tmp:
        MaskSet.write(tmp, masks, record)
        write_masks_grid(tmp, images, list(masks.values()), list(masks))
    return MaskSet.read(out_dir)


def write_masks_grid(
    folder: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], masks: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``folder/masks_grid.jpg``: each image with its mask tinted (``utils.overlay.masks_grid``)."""
    arrays = [load_image(p, "instance image") for p in images]
    path = Path(folder) / GRID_NAME
    atomic_save_image(masks_grid(arrays, [np.asarray(m, dtype=bool) for m in masks], labels), path, quality=90)
    return path
