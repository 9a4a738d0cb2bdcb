"""One reference path: photos marked with masks, boxes or clicks -> the segmenter's reference.

Used by ``segment`` (the album command) and by mask sets (:func:`persam_dreambooth.masks.make.make_mask_set`):

    marked = read_marked_references(images, boxes=["30,20,100,80"])   # validates everything, runs no model
    shots = set_marked_reference(persam, marked)                         # encodes each photo once

:func:`read_marked_references` checks every argument once (files, sizes, empty masks, box and point bounds) before
any model runs, with errors naming the argument (or flag) the caller gives in :class:`ReferenceArgNames`.
:func:`set_marked_reference` encodes each reference photo **once**: the same embedding makes SAM's mask from a box or
a click (:func:`mask_from_prompt`, plain SAM's best of three) and becomes the reference, and it is returned so that a
caller segmenting the reference photo too can reuse it.

Boxes are ``(x0, y0, x1, y1)`` in pixels with ``0 <= x0 < x1 <= W`` (SAM's box prompt: corners as coordinates);
points are ``(x, y)``, ``x`` the column, with ``0 <= x < W``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from persam_dreambooth.data.images import ImageLike, MaskLike, check_same_size, load_image, load_mask
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding

__all__ = [
    "MarkedReference",
    "ReferenceArgNames",
    "ReferenceShotMask",
    "check_box",
    "check_point",
    "mask_from_prompt",
    "read_marked_references",
    "set_marked_reference",
]

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass(frozen=True)
class ReferenceArgNames:
    """How errors name the arguments (the library's parameter names by default; the CLI passes its flags)."""

    image: str = "reference_image"
    mask: str = "reference_mask"
    box: str = "reference_box"
    point: str = "reference_point"


@dataclass(frozen=True)
class MarkedReference:
    """One reference photo and how it is marked, validated (no model has run).

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB. mask: ``(H, W)`` bool, non-empty, or None. box_xyxy / point_xy: or these.
        prompt_name: the argument that marked it, for messages (``"--ref-box #2"``).
    """

    image: np.ndarray
    mask: np.ndarray | None
    box_xyxy: Box | None
    point_xy: Point | None
    prompt_name: str


@dataclass(frozen=True)
class ReferenceShotMask:
    """What :func:`set_marked_reference` used for one shot: the mask, SAM's predicted IoU (None for a given mask)
    and the shot's embedding (reusable to segment the reference photo itself)."""

    mask: np.ndarray
    score: float | None
    embedding: ImageEmbedding


def _nth(name: str, index: int, total: int) -> str:
    return name if total == 1 else f"{name} #{index + 1}"


def _numbers(value: Any, count: int, arg_name: str, form: str) -> tuple[float, ...]:
    """``"a,b,..."`` or a sequence of ``count`` finite numbers."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(np.isfinite(v) for v in numbers):
        raise ValueError(f"`{arg_name}` must be {count} comma-separated numbers {form}, got {value!r}.")
    return numbers


def check_box(value: Any, width: int, height: int, arg_name: str = "box_xyxy") -> Box:
    """``"x0,y0,x1,y1"`` or 4 numbers (pixels), checked: ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``."""
    x0, y0, x1, y1 = _numbers(value, 4, arg_name, "x0,y0,x1,y1")
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        swapped = " (the corners look swapped: give the top-left corner x0,y0 first)" if x0 > x1 or y0 > y1 else ""
        raise ValueError(
            f"`{arg_name}` must lie inside the reference image (W x H = {width} x {height}) with x0 < x1 and y0 < y1, "
            f"i.e. 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (box_xyxy, pixels); got {value!r}{swapped}."
        )
    return x0, y0, x1, y1


def check_point(value: Any, width: int, height: int, arg_name: str = "point_xy") -> Point:
    """``"x,y"`` or 2 numbers (pixels, ``x`` = column), checked: ``0 <= x < W`` and ``0 <= y < H``."""
    x, y = _numbers(value, 2, arg_name, "x,y")
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(
            f"`{arg_name}` must lie inside the reference image (W x H = {width} x {height}), i.e. 0 <= x < {width} "
            f"and 0 <= y < {height} (point_xy, pixels); got {value!r}."
        )
    return x, y


def read_marked_references(
    images: Sequence[ImageLike],
    *,
    masks: Sequence[MaskLike] | None = None,
    boxes: Sequence[Any] | None = None,
    points: Sequence[Any] | None = None,
    names: ReferenceArgNames = ReferenceArgNames(),  # noqa: B008 (frozen)
) -> list[MarkedReference]:
    """Load and check the reference photos and exactly one kind of marking, one per photo (in order).

    Args:
        images: paths, PIL images or ``(H, W, 3)`` arrays (several = several shots of one object).
        masks / boxes / points: exactly one of them, as long as ``images``; boxes ``"x0,y0,x1,y1"`` or 4 numbers,
            points ``"x,y"`` or 2 numbers, in pixels of their photo.
        names: the argument names used in error messages.

    Raises:
        ValueError: not exactly one kind of marking, counts differ, a mask's size differs from its photo's, a mask is
            empty, or a box/point is malformed or outside its photo. FileNotFoundError: a file is missing.
    """
    given = [(n, v) for n, v in ((names.mask, masks), (names.box, boxes), (names.point, points)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of `{names.mask}`, `{names.box}` and `{names.point}`.")
    flag, values = given[0]
    count = len(images)
    if count == 0:
        raise ValueError(f"`{names.image}` must name at least one reference image.")
    if len(values) != count:
        raise ValueError(
            f"`{flag}` gives {len(values)} value(s) but `{names.image}` gives {count} image(s); give exactly one per "
            "reference image, in the same order."
        )
    arrays = [load_image(img, _nth(names.image, i, count)) for i, img in enumerate(images)]
    marked = []
    for i, (image, value) in enumerate(zip(arrays, values, strict=True)):
        name = _nth(flag, i, count)
        height, width = image.shape[:2]
        mask = box = point = None
        if masks is not None:
            mask = load_mask(value, name)
            check_same_size(image.shape, mask.shape, _nth(names.image, i, count), name)
            if not mask.any():
                shown = f" {os.fspath(value)!r}" if isinstance(value, (str, os.PathLike)) else ""
                raise ValueError(f"`{name}`{shown} is empty: it has no foreground (nonzero) pixel.")
        elif boxes is not None:
            box = check_box(value, width, height, name)
        else:
            point = check_point(value, width, height, name)
        marked.append(MarkedReference(image=image, mask=mask, box_xyxy=box, point_xy=point, prompt_name=name))
    return marked


@torch.no_grad()
def _sam_mask(predictor: GuidedSamPredictor, embedding: ImageEmbedding, box_xyxy: Box | None,
              point_xy: Point | None) -> tuple[np.ndarray, float]:
    """Plain SAM's best (highest predicted IoU) of its three masks for a checked box or point."""
    if box_xyxy is not None:
        out = predictor.predict(embedding, box=torch.tensor(box_xyxy, dtype=torch.float64), multimask_output=True)
    else:
        out = predictor.predict(
            embedding, point_coords=torch.tensor([point_xy], dtype=torch.float64), point_labels=torch.tensor([1]),
            multimask_output=True,
        )
    best = out.best
    mask = predictor.upscale_mask(out.low_res_logits[best], embedding)
    return mask.cpu().numpy(), float(out.iou_predictions[best])


def mask_from_prompt(
    predictor: GuidedSamPredictor,
    embedding: ImageEmbedding,
    box_xyxy: tuple[float, float, float, float] | None = None,
    point_xy: tuple[float, float] | None = None,
) -> tuple[np.ndarray, float]:
    """Plain SAM from one box or one positive point: the best (highest predicted IoU) of its three masks.

    Returns:
        ``(mask (H, W) bool, predicted IoU)``.

    Raises:
        ValueError: neither or both prompts given, or the prompt lies outside the image.
    """
    if (box_xyxy is None) == (point_xy is None):
        raise ValueError("Give exactly one of `box_xyxy` and `point_xy`.")
    height, width = embedding.original_size
    box = None if box_xyxy is None else check_box(box_xyxy, width, height, "box_xyxy")
    point = None if point_xy is None else check_point(point_xy, width, height, "point_xy")
    return _sam_mask(predictor, embedding, box, point)


def set_marked_reference(
    segmenter: Any,
    marked: Sequence[MarkedReference],
    encode: Callable[[list[np.ndarray]], list[ImageEmbedding]] | None = None,
    mask_name: str = "reference_mask",
) -> list[ReferenceShotMask]:
    """Encode each marked photo once, make SAM's mask from a box/click, and set the segmenter's reference.

    One shot sets exactly the paper's one-shot reference; several are pooled (PerSAM-F fits on all jointly).

    Args:
        segmenter: a ``PerSAM`` or ``PerSAMF``.
        marked: from :func:`read_marked_references`.
        encode: ``list of (H, W, 3) uint8 -> list of ImageEmbedding`` (e.g. a batched, cached encoder); default: the
            segmenter's predictor, one photo at a time.
        mask_name: what to suggest when SAM finds nothing at a box/click.

    Raises:
        ValueError: SAM found no object at a box or click.
    """
    images = [m.image for m in marked]
    start = time.perf_counter()
    logger.info("encoding %d reference photo(s) with SAM's image encoder", len(images))
    if encode is None:
        embeddings = [segmenter.predictor.encode(image, "reference image") for image in images]
    else:
        embeddings = list(encode(images))
    logger.info("reference photo(s) encoded in %.1f s", time.perf_counter() - start)
    shots = []
    for ref, embedding in zip(marked, embeddings, strict=True):
        if ref.mask is not None:
            shots.append(ReferenceShotMask(mask=ref.mask, score=None, embedding=embedding))
            continue
        mask, score = _sam_mask(segmenter.predictor, embedding, ref.box_xyxy, ref.point_xy)
        where = ref.box_xyxy if ref.box_xyxy is not None else ref.point_xy
        if not mask.any():
            raise ValueError(f"`{ref.prompt_name}`: SAM found no object at {where} in the reference image; mark it "
                             f"differently or give `{mask_name}`.")
        logger.info("reference mask from %s: %d pixels, predicted IoU %.3f", ref.prompt_name, int(mask.sum()), score)
        shots.append(ReferenceShotMask(mask=mask, score=score, embedding=embedding))
    if len(shots) == 1:  # one shot: exactly the paper's reference (PerSAM-F fits its weights here)
        segmenter.set_reference_embedding(shots[0].embedding, shots[0].mask)
    else:  # several shots: the target is pooled over all of them
        segmenter.set_reference_embedding([s.embedding for s in shots], [s.mask for s in shots])
    return shots
