"""PerSAM's result type and its three-pass cascade on encoded images (docs/design/persam_method.md §3, Decision 5).

* :class:`Segmentation`: what segmenting one image returns (PerSAM and PerSAM-F alike).
* :func:`location_confidence`: the similarity map of a target vector on an encoded image, at the image's size.
* :func:`persam_cascade` / :func:`persam_cascade_batch`: the guided first pass and the two refinements, for one image
  or for several images with one decoder call per stage.

:mod:`~.persam` wraps these in the :class:`~.persam.PerSAM` class; import from there in user code.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from persam_dreambooth.segmentation.location_prior import (
    attention_prior,
    box_from_mask,
    select_point_prompts,
    similarity_map,
    upscale_to_original,
)
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding

__all__ = [
    "NUM_STAGES",
    "EmptyMaskWarning",
    "check_similarities",
    "Segmentation",
    "location_confidence",
    "make_segmentation",
    "persam_cascade",
    "persam_cascade_batch",
]

NUM_STAGES = 3  # one guided pass + two refinements (docs/design/persam_method.md §3)


class EmptyMaskWarning(UserWarning):
    """An intermediate cascade mask was empty; the previous stage's result was kept (Decision 5)."""


@dataclass(kw_only=True)
class Segmentation:
    """The result of segmenting one image (one instance), by PerSAM or PerSAM-F.

    Attributes:
        mask: ``(H, W)`` bool, the final mask.
        score: SAM's predicted IoU of the final mask.
        points_xy: ``(N, 2)`` int64 point prompts ``(x, y)`` = (column, row); positives first, then negatives
            (PerSAM: one of each; PerSAM-F: the positive point only).
        point_labels: ``(N,)`` int64, 1 positive / 0 negative.
        similarity: ``(H, W)`` float32 location confidence (cosine similarity with the target, in [-1, 1]); for a
            later instance of a multi-instance search, the map with the earlier instances suppressed.
        stage_logits: ``(3, h_lr, w_lr)`` float32 low-res logits of the chosen mask after each cascade stage (a
            stage that was skipped repeats the previous one; PerSAM-F's stage 1 is the weighted mix of three).
        stage_scores: ``(3,)`` float32 predicted IoU of the chosen mask after each stage (same repetition rule).
        stage_used: the stage (1-3) whose mask is ``mask``: 3 unless a fallback stopped the cascade early.
        box_xyxy: ``(4,)`` int64 box prompt ``[x0, y0, x1, y1]`` (inclusive pixels) of the stage whose mask is
            returned (stage 3 normally), ``None`` if that stage had no box.
        fallbacks: human-readable notes on every fallback taken (empty tuple normally).
        seconds: wall time of this segmentation (encoding included when :meth:`PerSAM.segment` encoded it; a batch's
            time divided by its images for batched calls).
    """

    mask: np.ndarray
    score: float
    points_xy: np.ndarray
    point_labels: np.ndarray
    similarity: np.ndarray
    stage_logits: np.ndarray
    stage_scores: np.ndarray
    stage_used: int = NUM_STAGES
    box_xyxy: np.ndarray | None = None
    fallbacks: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def area(self) -> int:
        """Number of mask pixels."""
        return int(self.mask.sum())


def location_confidence(predictor: GuidedSamPredictor, embedding: ImageEmbedding, target: Tensor) -> Tensor:
    """PerSAM's location prior: cosine similarity of ``target`` with every feature, upscaled to the image (P5).

    Shapes:
        target ``(C,)`` raw -> ``(H, W)`` float32 on the predictor's device.
    """
    features = embedding.features.to(predictor.device)
    grid_map = similarity_map(target.to(predictor.device), features)  # (h, w)
    return upscale_to_original(
        grid_map, predictor.low_res_size, predictor.frame_size, embedding.input_size, embedding.original_size
    )  # (H, W)


def check_similarities(
    embeddings: Sequence[ImageEmbedding], similarities: Sequence[Tensor | None] | None, device: torch.device
) -> list[Tensor | None]:
    """Validate caller-given ``(H, W)`` maps (one per embedding, ``None`` = compute) and move them to ``device``."""
    if similarities is None:
        return [None] * len(embeddings)
    if len(similarities) != len(embeddings):
        raise ValueError(
            f"`similarities` must hold one map per embedding ({len(embeddings)}), got {len(similarities)}."
        )
    out: list[Tensor | None] = []
    for i, (emb, sim) in enumerate(zip(embeddings, similarities, strict=True)):
        if sim is not None and tuple(sim.shape) != tuple(emb.original_size):
            raise ValueError(
                f"`similarities[{i}]` must have shape (H, W) == {tuple(emb.original_size)}, got {tuple(sim.shape)}."
            )
        out.append(None if sim is None else sim.to(device))
    return out


@torch.no_grad()
def persam_cascade(
    predictor: GuidedSamPredictor,
    embedding: ImageEmbedding,
    target: Tensor,
    similarity: Tensor | None = None,
    guidance: bool = True,
) -> Segmentation:
    """PerSAM's prompts and three decoder passes on one encoded image (docs/design/persam_method.md §3).

    1. Location prior: cosine similarity of the target with the image features, upscaled to ``(H, W)``; the arg-max
       pixel is the positive point, the arg-min the negative one.
    2. Stage 1: single-mask pass with target-guided attention and target-semantic prompting (if ``guidance``).
    3. Stage 2: multimask pass fed the stage-1 low-res logits; the best predicted IoU wins.
    4. Stage 3: multimask pass with the tight box of the stage-2 mask and its logits; the best predicted IoU wins.
       If the stage-2 mask is empty (no box), stage 3 is skipped and stage 2's result is kept (Decision 5).

    Args:
        predictor: the guided predictor of the SAM that produced ``embedding``.
        embedding: the image to segment.
        target: ``(C,)`` raw target vector (:func:`~.location_prior.target_embedding`).
        similarity: ``(H, W)`` map to take the points and attention prior from instead of computing it (e.g. with
            already-found instances suppressed). ``None``: computed from ``target``.
        guidance: use the two injections in stage 1 (PerSAM). False gives plain SAM with PerSAM's prompts.

    Returns:
        A :class:`Segmentation` on CPU (``seconds`` covers this call only).
    """
    height, width = embedding.original_size
    if similarity is not None and tuple(similarity.shape) != (height, width):
        raise ValueError(f"`similarity` must have shape (H, W) == {(height, width)}, got {tuple(similarity.shape)}.")
    return persam_cascade_batch(predictor, [embedding], target, [similarity], guidance)[0]


@torch.no_grad()
def persam_cascade_batch(
    predictor: GuidedSamPredictor,
    embeddings: Sequence[ImageEmbedding],
    target: Tensor,
    similarities: Sequence[Tensor | None] | None = None,
    guidance: bool = True,
) -> list[Segmentation]:
    """:func:`persam_cascade` on several images, each stage one decoder call for all of them.

    The guided attention prior is per image (``attn_sim`` ``(B, 1, 1, h*w)``); stage 3 runs, batched, on the images
    whose stage-2 mask is non-empty, the others keep stage 2 (Decision 5). With one image the numbers are
    :func:`persam_cascade`'s exactly; with several they agree to float rounding. ``seconds`` of each result is the
    batch's wall time divided by the number of images.

    Args:
        similarities: one ``(H, W)`` map per image (or ``None`` entries / ``None``: computed from ``target``).

    Returns:
        One :class:`Segmentation` per embedding, in order.
    """
    if not embeddings:
        return []
    start = time.perf_counter()
    device = predictor.device
    embs = [e if e.features.device == device else e.to(device) for e in embeddings]  # e.g. cached on CPU
    target = target.to(device)
    sims: list[Tensor] = [
        location_confidence(predictor, emb, target) if sim is None else sim
        for emb, sim in zip(embs, check_similarities(embs, similarities, device), strict=True)
    ]
    prompts = [select_point_prompts(sim, topk=1, negative=True) for sim in sims]
    points, labels = [p[0] for p in prompts], [p[1] for p in prompts]
    attn_sim = target_emb = None
    if guidance:
        attn_sim = torch.cat([
            attention_prior(sim, predictor.grid_size, predictor.frame_size, emb.input_size)
            for sim, emb in zip(sims, embs, strict=True)
        ])  # B x (1, 1, 1, h*w) -> (B, 1, 1, h*w): one prior per image
        target_emb = target.reshape(1, 1, -1)  # (C,) -> (1, 1, C), broadcast over the batch and the decoder tokens

    # Stage 1: one mask (token 0), both injections.
    out1 = predictor.predict_batch(
        embs, points, labels, multimask_output=False, attn_sim=attn_sim, target_embedding=target_emb
    )
    logits = [[o.low_res_logits[0]] for o in out1]
    scores = [[o.iou_predictions[0]] for o in out1]
    # Stage 2: feed back the logits, three masks, no injections.
    out2 = predictor.predict_batch(
        embs, points, labels, mask_inputs=[lg[0][None] for lg in logits], multimask_output=True
    )
    masks: list[Tensor] = []
    boxes: list[Tensor | None] = []
    for i, out in enumerate(out2):
        best = out.best
        logits[i].append(out.low_res_logits[best])
        scores[i].append(out.iou_predictions[best])
        masks.append(predictor.upscale_mask(logits[i][1], embs[i]))  # (H, W) bool
        boxes.append(box_from_mask(masks[i]))
    # Stage 3: box of the chosen mask + its logits, three masks; only where stage 2 gave a box.
    boxed = {i: box for i, box in enumerate(boxes) if box is not None}
    if boxed:
        out3 = predictor.predict_batch(
            [embs[i] for i in boxed], [points[i] for i in boxed], [labels[i] for i in boxed],
            boxes=list(boxed.values()), mask_inputs=[logits[i][1][None] for i in boxed], multimask_output=True,
        )
        for i, out in zip(boxed, out3, strict=True):
            best = out.best
            logits[i].append(out.low_res_logits[best])
            scores[i].append(out.iou_predictions[best])
            masks[i] = predictor.upscale_mask(logits[i][2], embs[i])
    seconds = (time.perf_counter() - start) / len(embs)
    results = []
    for i in range(len(embs)):
        fallbacks: list[str] = []
        if boxes[i] is None:
            note = "stage 2 mask is empty, so there is no box for stage 3: kept the stage-2 result (Decision 5)"
            warnings.warn(note, EmptyMaskWarning, stacklevel=3)  # 3: skip the no_grad wrapper
            fallbacks.append(note)
            logits[i].append(logits[i][1])
            scores[i].append(scores[i][1])
        box = boxes[i]
        results.append(make_segmentation(masks[i], points[i], labels[i], sims[i], logits[i], scores[i],
                                         stage_used=2 if box is None else 3, box=box, fallbacks=fallbacks,
                                         seconds=seconds))
    return results


def make_segmentation(
    mask: Tensor,
    points: Tensor,
    labels: Tensor,
    similarity: Tensor,
    stage_logits: Sequence[Tensor],
    stage_scores: Sequence[Tensor],
    *,
    stage_used: int,
    box: Tensor | None,
    fallbacks: Sequence[str],
    seconds: float,
) -> Segmentation:
    """Gather one image's cascade tensors (any device) into a :class:`Segmentation` of numpy arrays on the CPU.

    Shapes: mask ``(H, W)`` bool; points ``(N, 2)``; labels ``(N,)``; similarity ``(H, W)``; ``NUM_STAGES`` stage
    logits ``(h_lr, w_lr)`` and scores ``()`` (the last ones are the returned mask's); box ``(4,)`` or ``None``.
    """
    return Segmentation(
        mask=mask.cpu().numpy(),
        score=float(stage_scores[-1]),
        points_xy=points.cpu().numpy(),
        point_labels=labels.cpu().numpy(),
        similarity=similarity.float().cpu().numpy(),
        stage_logits=torch.stack(list(stage_logits)).float().cpu().numpy(),  # NUM_STAGES x (h_lr, w_lr) -> (3, ...)
        stage_scores=torch.stack(list(stage_scores)).float().cpu().numpy(),  # (3,)
        stage_used=stage_used,
        box_xyxy=None if box is None else box.cpu().numpy(),
        fallbacks=tuple(fallbacks),
        seconds=seconds,
    )
