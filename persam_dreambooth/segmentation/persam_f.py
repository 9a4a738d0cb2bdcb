"""PerSAM-F: PerSAM with two learned weights mixing SAM's three mask scales.

Specified in docs/design/persam_method.md §4 and its Decisions 1, 5 and 6.

    persamf = PerSAMF(sam, steps=1000, lr=1e-3)
    persamf.set_reference(ref_image, ref_mask)   # encodes the reference and fits the weights
    persamf.scale_weights                        # (3,) [1 - w1 - w2, w1, w2]
    persamf.segment(image)                       # -> Segmentation, the same fields as PerSAM's

Fitting (:func:`~.scale_fit.fit_scale_weights`): the reference's positive point (arg-max of its self-similarity
with the ``(max + mean) / 2`` target) goes through SAM's decoder **once**; the three high-resolution logit maps are
mixed by ``lambda = [1 - w1 - w2, w1, w2]`` and ``w`` is fitted with dice + focal against the reference mask at its
original resolution, AdamW(lr, eps 1e-4, weight decay 0.01) and a cosine schedule over ``steps``. The published code
re-runs the decoder at every step with identical inputs; the weights are the same to float rounding.

Inference (no target-guided attention, no semantic prompt, positive point only):

1. Stage 1: the positive point, three masks; mix the high-res logits (mask = mixed > 0) and the low-res logits.
2. Stage 2: the box of the stage-1 mask + the mixed low-res logits, three masks, the best predicted IoU wins.
3. Stage 3: the box of the stage-2 mask + its logits, three masks, the best predicted IoU wins.

Fallbacks (Decision 5; recorded in ``Segmentation.fallbacks`` with an :class:`~.cascade.EmptyMaskWarning`, never an
exception): an empty mixed mask falls back to stage 1's best-scored single output (plain SAM's choice; the published
video script's ``argmax(scores * lambda_0)`` would pick the worst mask when ``lambda_0 < 0``); if that is empty too,
the empty stage-1 result is returned (``stage_used = 1``). An empty stage-2 mask keeps stage 2 (``stage_used = 2``).

Several references: the target pools all shots' cells together, each shot gets its own positive point and logits,
and the weights minimise the mean over shots of their dice + focal losses (one shot = the paper's objective).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor

from persam_dreambooth.segmentation.cascade import (
    NUM_STAGES,
    EmptyMaskWarning,
    Segmentation,
    check_similarities,
    location_confidence,
    make_segmentation,
)
from persam_dreambooth.segmentation.location_prior import box_from_mask, select_point_prompts
from persam_dreambooth.segmentation.persam import PerSAM, PerSAMReference, ReferenceShot
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding
from persam_dreambooth.segmentation.scale_fit import ScaleFit, fit_scale_weights

__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "PerSAMF", "PerSAMFReference", "persam_f_cascade", "persam_f_cascade_batch"]

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1000  #: published number of optimizer steps
DEFAULT_LR = 1e-3  #: published AdamW learning rate


@dataclass(frozen=True)
class PerSAMFReference(PerSAMReference):
    """PerSAM-F's reference: the shots, the ``(max + mean) / 2`` target and the fitted mixing weights.

    Attributes:
        weights: ``(3,)`` float32 ``[1 - w1 - w2, w1, w2]`` (on the model's device).
        losses: ``(steps,)`` float32 training loss at each step (before its update).
        points_xy: per shot, the ``(1, 2)`` positive point ``(x, y)`` the weights were fitted with.
    """

    weights: Tensor
    losses: Tensor
    points_xy: tuple[np.ndarray, ...]


def persam_f_cascade(
    predictor: GuidedSamPredictor,
    embedding: ImageEmbedding,
    target: Tensor,
    weights: Tensor,
    similarity: Tensor | None = None,
) -> Segmentation:
    """PerSAM-F's inference on one encoded image (module docstring; docs/design/persam_method.md §4.5).

    Args:
        target: ``(C,)`` raw target (PerSAM-F: ``(max + mean) / 2`` pooling); weights: ``(3,)`` mixing weights.
        similarity: ``(H, W)`` map to take the positive point from instead of computing it (e.g. suppressed).
    """
    height, width = embedding.original_size
    if similarity is not None and tuple(similarity.shape) != (height, width):
        raise ValueError(f"`similarity` must have shape (H, W) == {(height, width)}, got {tuple(similarity.shape)}.")
    return persam_f_cascade_batch(predictor, [embedding], target, weights, [similarity])[0]


@torch.no_grad()
def persam_f_cascade_batch(
    predictor: GuidedSamPredictor,
    embeddings: Sequence[ImageEmbedding],
    target: Tensor,
    weights: Tensor,
    similarities: Sequence[Tensor | None] | None = None,
) -> list[Segmentation]:
    """:func:`persam_f_cascade` on several images, each stage one decoder call for the images that reach it.

    ``stage_logits`` are the mixed low-res logits (stage 1), then the chosen mask's low-res logits of the two
    refinements; ``stage_scores[0]`` is the ``lambda``-weighted sum of stage 1's predicted IoUs. ``box_xyxy`` is the
    box prompt of the stage whose mask is returned (``None`` for stage 1). ``seconds``: batch time / images.
    """
    if not embeddings:
        return []
    start = time.perf_counter()
    device = predictor.device
    threshold = predictor.sam.mask_threshold
    embs = [e if e.features.device == device else e.to(device) for e in embeddings]
    target = target.to(device)
    lam = weights.to(device=device, dtype=torch.float32).reshape(-1)  # (3,)
    sims: list[Tensor] = [
        location_confidence(predictor, emb, target) if sim is None else sim
        for emb, sim in zip(embs, check_similarities(embs, similarities, device), strict=True)
    ]
    prompts = [select_point_prompts(sim, topk=1, negative=False) for sim in sims]  # positive point only
    points, labels = [p[0] for p in prompts], [p[1] for p in prompts]
    count = len(embs)
    logits: list[list[Tensor]] = [[] for _ in range(count)]
    scores: list[list[Tensor]] = [[] for _ in range(count)]
    masks: list[Tensor] = []
    next_boxes: list[Tensor | None] = []  # box of the current mask: the next stage's prompt
    prompt_boxes: list[Tensor | None] = [None] * count  # box prompt of the stage whose mask is current
    used = [1] * count  # the stage whose mask is current
    notes: list[list[str]] = [[] for _ in range(count)]

    # Stage 1: three masks; mix the high-res logits for the mask and the low-res ones for the next prompt.
    for i, out in enumerate(predictor.predict_batch(embs, points, labels, multimask_output=True)):
        high = predictor.upscale(out.low_res_logits, embs[i])  # (3, H, W)
        mask = (high * lam[:, None, None]).sum(0) > threshold  # weights (3,) -> (3, 1, 1), as published
        low = (out.low_res_logits * lam[:, None, None]).sum(0)  # (h_lr, w_lr)
        score = (out.iou_predictions * lam).sum()
        box = box_from_mask(mask)
        if box is None:
            best = out.best
            notes[i].append(f"the mixed stage-1 mask is empty: used stage 1's best-scored output ({best}) instead")
            mask, low, score = high[best] > threshold, out.low_res_logits[best], out.iou_predictions[best]
            box = box_from_mask(mask)
            if box is None:
                notes[i].append("that mask is empty too: no box for stage 2, kept the stage-1 result (Decision 5)")
        del high
        logits[i].append(low)
        scores[i].append(score)
        masks.append(mask)
        next_boxes.append(box)

    # Stages 2 and 3: box of the previous mask + the previous logits, three masks, best predicted IoU.
    for stage in (2, 3):
        todo = {i: box for i, box in enumerate(next_boxes) if used[i] == stage - 1 and box is not None}
        if not todo:
            break
        outs = predictor.predict_batch(
            [embs[i] for i in todo], [points[i] for i in todo], [labels[i] for i in todo],
            boxes=list(todo.values()), mask_inputs=[logits[i][-1][None] for i in todo], multimask_output=True,
        )
        for i, out in zip(todo, outs, strict=True):
            best = out.best
            logits[i].append(out.low_res_logits[best])
            scores[i].append(out.iou_predictions[best])
            masks[i] = predictor.upscale_mask(logits[i][-1], embs[i])
            prompt_boxes[i] = next_boxes[i]
            next_boxes[i] = box_from_mask(masks[i])
            used[i] = stage
            if stage == 2 and next_boxes[i] is None:
                notes[i].append("stage 2 mask is empty, so there is no box for stage 3: kept the stage-2 result "
                                "(Decision 5)")

    seconds = (time.perf_counter() - start) / count
    results = []
    for i in range(count):
        for note in notes[i]:
            warnings.warn(note, EmptyMaskWarning, stacklevel=3)
        while len(logits[i]) < NUM_STAGES:  # a skipped stage repeats the previous one
            logits[i].append(logits[i][-1])
            scores[i].append(scores[i][-1])
        results.append(make_segmentation(masks[i], points[i], labels[i], sims[i], logits[i], scores[i],
                                         stage_used=used[i], box=prompt_boxes[i], fallbacks=notes[i],
                                         seconds=seconds))
    return results


class PerSAMF(PerSAM):
    """PerSAM-F: PerSAM's interface, with scale weights fitted on the reference (module docstring).

    Args:
        sam: any ``segment_anything.modeling.Sam`` on its device (not modified).
        steps: optimizer steps of the fit (published: 1000).
        lr: AdamW's base learning rate (published: 1e-3).

    Raises:
        ValueError: ``steps < 1`` or ``lr <= 0``.
    """

    pooling: Literal["mean", "max_mean"] = "max_mean"

    def __init__(self, sam: Sam, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"`steps` must be an int >= 1, got {steps!r}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        super().__init__(sam)
        self.steps = int(steps)
        self.lr = float(lr)

    @property
    def reference(self) -> PerSAMFReference:
        """The current reference with its fitted weights; ``RuntimeError`` before :meth:`set_reference`."""
        return super().reference  # type: ignore[return-value]

    @property
    def scale_weights(self) -> np.ndarray:
        """``(3,)`` float32 mixing weights ``[1 - w1 - w2, w1, w2]`` of SAM's three masks (after the fit)."""
        return self.reference.weights.detach().float().cpu().numpy().copy()

    @property
    def fit_losses(self) -> np.ndarray:
        """``(steps,)`` float32 training loss of each step of the last fit."""
        return self.reference.losses.detach().float().cpu().numpy().copy()

    def _make_reference(self, shots: tuple[ReferenceShot, ...], target: Tensor) -> PerSAMFReference:
        """Decode each shot once from its positive point and fit the weights on the three logit maps."""
        logits, gts, points = [], [], []
        for shot in shots:
            sim = location_confidence(self.predictor, shot.embedding, target)  # self-similarity, (H, W)
            point, label = select_point_prompts(sim, topk=1, negative=False)
            del sim
            out = self.predictor.predict(shot.embedding, point, label, multimask_output=True)
            logits.append(self.predictor.upscale(out.low_res_logits, shot.embedding))  # (3, H, W) at original size
            gts.append(torch.from_numpy(shot.mask))
            points.append(point.cpu().numpy())
        pixels = sum(int(g.numel()) for g in gts)
        logger.info("PerSAM-F: fitting the scale weights (%d steps on %d reference(s), %.2f Mpx)", self.steps,
                    len(shots), pixels / 1e6)
        start = time.perf_counter()
        fit: ScaleFit = fit_scale_weights(logits if len(shots) > 1 else logits[0], gts if len(shots) > 1 else gts[0],
                                          self.steps, self.lr)
        logger.info("PerSAM-F: scale weights fitted in %.1f s: %s", time.perf_counter() - start,
                    ", ".join(f"{float(w):.3f}" for w in fit.weights))
        return PerSAMFReference(shots=shots, target=target, weights=fit.weights, losses=fit.losses,
                                points_xy=tuple(points))

    def _cascade_batch(
        self, embeddings: Sequence[ImageEmbedding], similarities: Sequence[Tensor | None] | None = None
    ) -> list[Segmentation]:
        reference = self.reference
        return persam_f_cascade_batch(self.predictor, embeddings, reference.target, reference.weights, similarities)
