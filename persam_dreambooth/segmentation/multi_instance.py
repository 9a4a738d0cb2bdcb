"""Several instances of the reference object in one image: segment, suppress, repeat.

Specified in docs/design/persam_method.md §9.1.

The most requested extension of PerSAM (Personalize-SAM issues #9, #24; the author's suggestion there): after an
instance is found, its pixels are suppressed in the similarity map and the cascade runs again on the suppressed map,
whose new arg-max is the most similar place not yet explained. :func:`find_instances` implements this for PerSAM and
PerSAM-F alike (it takes the method's batched cascade as a callable), for several images at once.

The rules, in order, for each image:

1. The first instance is the method's ordinary single-instance result, computed on the unmodified map (so
   ``max_instances=1`` returns exactly ``[segment(image)]``). It is kept even if its similarity is low; an empty first
   mask ends the search (there is nothing to suppress).
2. Before each further round, the pixels of every instance found so far are set to the **minimum of the original
   map** (a finite value: the z-scored attention prior of PerSAM stays finite, and suppressed pixels get the lowest
   prior). The round's candidate is the arg-max of this map. The search stops when every pixel is suppressed or the
   candidate's similarity is below ``similarity_threshold``.
3. The cascade runs on the suppressed map (PerSAM: the negative point is the map's arg-min, which may now lie on an
   earlier instance: "not that one"). The new mask is **rejected, and the search stops**, if it is empty, adds no
   pixel outside the earlier instances, or has IoU above ``overlap_iou`` with one of them: the candidate was the most
   similar remaining place, so it led back to an object already found and later candidates are less similar still.
4. Otherwise it is appended and the search continues until ``max_instances`` instances are found.

Every round either suppresses new pixels or stops, so there are at most ``max_instances`` cascades per image.
Suppressing a mask leaves a "halo" of high similarity around it (the map is bilinearly upscaled from the feature
grid), which is why a candidate can lead back to a found object; rule 3 turns that into a stop.

Defaults: ``similarity_threshold = 0.65`` (cosine similarity with the target, in [-1, 1]): the value OpenVINO
Training Extensions' zero-shot visual prompting and Geti's PerSAM use on the same map
(docs/design/persam_method.md §7.2-7.3).
An absolute cosine is comparable across images and references, unlike a ratio to the first peak. ``overlap_iou =
0.8``: OTX's duplicate-mask threshold and the community multi-object script's (§4.6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from persam_dreambooth.utils.mask_geometry import mask_iou

if TYPE_CHECKING:
    from persam_dreambooth.segmentation.cascade import Segmentation
    from persam_dreambooth.segmentation.predictor import ImageEmbedding

__all__ = [
    "DEFAULT_OVERLAP_IOU",
    "DEFAULT_SIMILARITY_THRESHOLD",
    "check_instance_args",
    "find_instances",
    "union_mask",
]

logger = logging.getLogger(__name__)

DEFAULT_SIMILARITY_THRESHOLD = 0.65  #: stop when the next candidate's cosine similarity is below this (OTX, Geti)
DEFAULT_OVERLAP_IOU = 0.8  #: reject (and stop at) a new mask overlapping an earlier one above this IoU (OTX)

CascadeBatch = Callable[[Sequence["ImageEmbedding"], Sequence[Tensor]], list["Segmentation"]]


def check_instance_args(max_instances: object, similarity_threshold: object, overlap_iou: object) -> None:
    """Validate the multi-instance keywords.

    Raises:
        ValueError: ``max_instances`` is not an int >= 1, ``similarity_threshold`` is not a finite number, or
            ``overlap_iou`` is not in [0, 1].
    """
    if isinstance(max_instances, bool) or not isinstance(max_instances, (int, np.integer)) or max_instances < 1:
        raise ValueError(f"`max_instances` must be None or an int >= 1, got {max_instances!r}.")
    if isinstance(similarity_threshold, bool) or not isinstance(similarity_threshold, (int, float)) or not np.isfinite(
        similarity_threshold
    ):
        raise ValueError(f"`similarity_threshold` must be a finite number, got {similarity_threshold!r}.")
    if isinstance(overlap_iou, bool) or not isinstance(overlap_iou, (int, float)) or not 0.0 <= overlap_iou <= 1.0:
        raise ValueError(f"`overlap_iou` must be a number in [0, 1], got {overlap_iou!r}.")


def union_mask(segmentations: Segmentation | Sequence[Segmentation]) -> np.ndarray:
    """The union of the instances' masks: ``(H, W)`` bool (a single :class:`Segmentation` gives its own mask).

    Raises:
        ValueError: an empty list (no size to give the mask), or masks of different shapes.
    """
    items = [segmentations] if hasattr(segmentations, "mask") else list(segmentations)  # type: ignore[arg-type]
    if not items:
        raise ValueError("`segmentations` is empty: the union of no mask has no size.")
    out = np.array(items[0].mask, dtype=bool, copy=True)
    for i, seg in enumerate(items[1:], start=1):
        if seg.mask.shape != out.shape:
            raise ValueError(f"`segmentations[{i}].mask` has shape {seg.mask.shape}, expected {out.shape}.")
        out |= seg.mask
    return out


def find_instances(
    cascade: CascadeBatch,
    similarity: Callable[[ImageEmbedding], Tensor],
    embeddings: Sequence[ImageEmbedding],
    max_instances: int,
    *,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    overlap_iou: float = DEFAULT_OVERLAP_IOU,
) -> list[list[Segmentation]]:
    """Find up to ``max_instances`` instances in each image (the rules are in the module docstring).

    Args:
        cascade: the method's batched cascade, ``(embeddings, similarity maps) -> one Segmentation each``.
        similarity: the method's location confidence of an embedding, ``(H, W)``.
        embeddings: the images; each round runs one batched cascade over the images still searching.
        max_instances: ``k >= 1``.
        similarity_threshold: a further candidate whose similarity is below this ends the search.
        overlap_iou: a new mask with IoU above this with an earlier instance is rejected and ends the search.

    Returns:
        Per image, a list of 1..k :class:`Segmentation` in the order found; each one's ``similarity`` is the
        (suppressed) map its cascade used.
    """
    check_instance_args(max_instances, similarity_threshold, overlap_iou)
    maps = [similarity(emb) for emb in embeddings]  # (H, W) each, on the model's device
    floors = [m.min() for m in maps]  # the suppression value: each map's own minimum
    found: list[list[Segmentation]] = [[] for _ in embeddings]
    unions = [np.zeros(tuple(emb.original_size), dtype=bool) for emb in embeddings]
    active = list(range(len(embeddings)))
    round_ = 0
    while active:
        if round_ > 0:
            candidates = []
            for i in active:
                suppressed = torch.from_numpy(unions[i]).to(maps[i].device)
                # a new map each round: earlier results keep the map they were computed from
                maps[i] = maps[i].masked_fill(suppressed, floors[i])
                if bool(suppressed.all()):
                    logger.debug("image %d: every pixel is suppressed after %d instance(s)", i, len(found[i]))
                    continue
                peak = float(maps[i].max())
                if peak < similarity_threshold:
                    logger.debug("image %d: next candidate similarity %.4f < %.4f, stop", i, peak,
                                 similarity_threshold)
                    continue
                candidates.append(i)
            active = candidates
            if not active:
                break
        results = cascade([embeddings[i] for i in active], [maps[i] for i in active])
        still = []
        for i, seg in zip(active, results, strict=True):
            reason = None
            if not seg.mask.any():
                reason = "empty mask"
            elif round_ > 0:
                if not (seg.mask & ~unions[i]).any():
                    reason = "no pixel outside the instances found"
                else:
                    best = max(mask_iou(seg.mask, prev.mask) for prev in found[i])
                    if best > overlap_iou:
                        reason = f"IoU {best:.3f} > {overlap_iou} with an earlier instance"
            if round_ == 0 or reason is None:
                found[i].append(seg)
                unions[i] |= seg.mask
            if reason is not None:
                logger.debug("image %d, round %d: stop (%s)", i, round_ + 1, reason)
            elif len(found[i]) < max_instances:
                still.append(i)
        active = still
        round_ += 1
    return found
