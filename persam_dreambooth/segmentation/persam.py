"""PerSAM: training-free one-shot personalised segmentation with SAM (persam_method.md §3, Decisions 1-5).

    persam = PerSAM(sam)
    persam.set_reference(ref_image, ref_mask)   # encodes the reference once
    result = persam.segment(image)               # -> Segmentation

The pieces are separate so that callers can reuse them: :class:`~.predictor.GuidedSamPredictor` encodes images into
:class:`~.predictor.ImageEmbedding` values and decodes prompts; :meth:`PerSAM.set_reference_embedding` and
:meth:`PerSAM.segment_embedding` accept embeddings computed elsewhere (cached, batched); :func:`persam_cascade` runs
the three decoder passes for one embedding and one target vector, optionally on a caller-given similarity map.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor

from persam_dreambooth.data.images import ImageLike, MaskLike, check_same_size, load_image, load_mask
from persam_dreambooth.segmentation.location_prior import (
    attention_prior,
    box_from_mask,
    select_point_prompts,
    similarity_map,
    target_embedding,
    upscale_to_original,
)
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding
from persam_dreambooth.segmentation.reference_mask import ReferenceCells, reference_cells

__all__ = ["PerSAM", "PerSAMReference", "Segmentation", "EmptyMaskWarning", "persam_cascade", "mask_from_prompt"]

logger = logging.getLogger(__name__)

NUM_STAGES = 3  # one guided pass + two refinements (persam_method.md §3)


class EmptyMaskWarning(UserWarning):
    """An intermediate cascade mask was empty; the previous stage's result was kept (Decision 5)."""


@dataclass(kw_only=True)
class Segmentation:
    """The result of segmenting one image.

    Attributes:
        mask: ``(H, W)`` bool, the final mask.
        score: SAM's predicted IoU of the final mask.
        points_xy: ``(N, 2)`` int64 point prompts ``(x, y)`` = (column, row); positives first, then negatives.
        point_labels: ``(N,)`` int64, 1 positive / 0 negative.
        similarity: ``(H, W)`` float32 location confidence (cosine similarity with the target, in [-1, 1]).
        stage_logits: ``(3, h_lr, w_lr)`` float32 low-res logits of the chosen mask after each cascade stage (a
            stage that was skipped repeats the previous one).
        stage_scores: ``(3,)`` float32 predicted IoU of the chosen mask after each stage (same repetition rule).
        stage_used: the stage (1-3) whose mask is ``mask``: 3 unless a fallback stopped the cascade early.
        box_xyxy: ``(4,)`` int64 box prompt of stage 3 ``[x0, y0, x1, y1]`` (inclusive pixels), ``None`` if skipped.
        fallbacks: human-readable notes on every fallback taken (empty tuple normally).
        seconds: wall time of this segmentation (encoding included when :meth:`PerSAM.segment` encoded it).
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


@dataclass(frozen=True)
class PerSAMReference:
    """The reference, encoded once.

    Attributes:
        embedding: the reference image's :class:`ImageEmbedding`.
        mask: ``(H, W)`` bool reference mask.
        cells: the mask on the embedding grid (:func:`~.reference_mask.reference_cells`).
        target: ``(C,)`` raw mean feature inside the cells (un-normalised: the semantic prompt uses it as is).
    """

    embedding: ImageEmbedding
    mask: np.ndarray
    cells: ReferenceCells
    target: Tensor


@torch.no_grad()
def persam_cascade(
    predictor: GuidedSamPredictor,
    embedding: ImageEmbedding,
    target: Tensor,
    similarity: Tensor | None = None,
    guidance: bool = True,
) -> Segmentation:
    """PerSAM's prompts and three decoder passes on one encoded image (persam_method.md §3).

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
    start = time.perf_counter()
    if embedding.features.device != predictor.device:  # e.g. an embedding cached on CPU
        embedding = embedding.to(predictor.device)
    target = target.to(predictor.device)
    height, width = embedding.original_size
    if similarity is None:
        grid_map = similarity_map(target, embedding.features)  # (h, w)
        similarity = upscale_to_original(
            grid_map, predictor.low_res_size, predictor.frame_size, embedding.input_size, embedding.original_size
        )  # (H, W)
    elif tuple(similarity.shape) != (height, width):
        raise ValueError(f"`similarity` must have shape (H, W) == {(height, width)}, got {tuple(similarity.shape)}.")
    else:
        similarity = similarity.to(predictor.device)
    points_xy, labels = select_point_prompts(similarity, topk=1, negative=True)
    attn_sim = target_emb = None
    if guidance:
        attn_sim = attention_prior(similarity, predictor.grid_size, predictor.frame_size, embedding.input_size)
        target_emb = target.reshape(1, 1, -1)  # (C,) -> (1, 1, C), broadcast over the decoder tokens

    # Stage 1: one mask (token 0), both injections.
    out1 = predictor.predict(
        embedding, points_xy, labels, multimask_output=False, attn_sim=attn_sim, target_embedding=target_emb
    )
    logits = [out1.low_res_logits[0]]
    scores = [out1.iou_predictions[0]]
    # Stage 2: feed back the logits, three masks, no injections.
    out2 = predictor.predict(embedding, points_xy, labels, mask_input=logits[0][None], multimask_output=True)
    best = out2.best
    logits.append(out2.low_res_logits[best])
    scores.append(out2.iou_predictions[best])
    mask = predictor.upscale_mask(logits[1], embedding)  # (H, W) bool
    box = box_from_mask(mask)
    fallbacks: list[str] = []
    if box is None:
        note = "stage 2 mask is empty, so there is no box for stage 3: kept the stage-2 result (Decision 5)"
        warnings.warn(note, EmptyMaskWarning, stacklevel=3)  # 3: skip the no_grad wrapper
        fallbacks.append(note)
        logits.append(logits[1])
        scores.append(scores[1])
        stage_used = 2
    else:
        # Stage 3: box of the chosen mask + its logits, three masks.
        out3 = predictor.predict(
            embedding, points_xy, labels, box=box, mask_input=logits[1][None], multimask_output=True
        )
        best = out3.best
        logits.append(out3.low_res_logits[best])
        scores.append(out3.iou_predictions[best])
        del mask
        mask = predictor.upscale_mask(logits[2], embedding)
        stage_used = 3
    return Segmentation(
        mask=mask.cpu().numpy(),
        score=float(scores[-1]),
        points_xy=points_xy.cpu().numpy(),
        point_labels=labels.cpu().numpy(),
        similarity=similarity.float().cpu().numpy(),
        stage_logits=torch.stack(logits).float().cpu().numpy(),  # (3, h_lr, w_lr)
        stage_scores=torch.stack(scores).float().cpu().numpy(),
        stage_used=stage_used,
        box_xyxy=None if box is None else box.cpu().numpy(),
        fallbacks=tuple(fallbacks),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def mask_from_prompt(
    predictor: GuidedSamPredictor,
    embedding: ImageEmbedding,
    box_xyxy: tuple[float, float, float, float] | None = None,
    point_xy: tuple[float, float] | None = None,
) -> tuple[np.ndarray, float]:
    """Plain SAM from one box or one positive point: the best (highest predicted IoU) of its three masks.

    Used to make a reference mask when the user gives a box or a click instead of a mask.

    Returns:
        ``(mask (H, W) bool, predicted IoU)``.

    Raises:
        ValueError: neither or both prompts given, or the prompt lies outside the image.
    """
    if (box_xyxy is None) == (point_xy is None):
        raise ValueError("Give exactly one of `box_xyxy` and `point_xy`.")
    height, width = embedding.original_size
    if box_xyxy is not None:
        x0, y0, x1, y1 = box_xyxy
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"`box_xyxy` must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (image W x H = "
                f"{width} x {height}), got {tuple(box_xyxy)}."
            )
        out = predictor.predict(embedding, box=torch.tensor(box_xyxy, dtype=torch.float64), multimask_output=True)
    else:
        x, y = point_xy  # type: ignore[misc]
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"`point_xy` must satisfy 0 <= x < {width} and 0 <= y < {height} (image W x H = {width} x {height}), "
                f"got {tuple(point_xy)}."  # type: ignore[arg-type]
            )
        out = predictor.predict(
            embedding, point_coords=torch.tensor([[x, y]], dtype=torch.float64), point_labels=torch.tensor([1]),
            multimask_output=True,
        )
    best = out.best
    mask = predictor.upscale_mask(out.low_res_logits[best], embedding)
    return mask.cpu().numpy(), float(out.iou_predictions[best])


class PerSAM:
    """Personalised SAM: find the reference object in new images (training-free).

    Args:
        sam: any ``segment_anything.modeling.Sam`` (any size) on its device, in eval mode. It is not modified.

    Example::

        persam = PerSAM(load_sam("vit_h"))
        persam.set_reference(ref_image, ref_mask)
        result = persam.segment(image)   # result.mask: (H, W) bool
    """

    def __init__(self, sam: Sam) -> None:
        self.predictor = GuidedSamPredictor(sam)
        self._reference: PerSAMReference | None = None  # set by set_reference

    @property
    def sam(self) -> Sam:
        return self.predictor.sam

    @property
    def reference(self) -> PerSAMReference:
        """The current reference; ``RuntimeError`` before :meth:`set_reference`."""
        if self._reference is None:
            raise RuntimeError("Call `set_reference(image, mask)` before `segment`.")
        return self._reference

    def encode(self, image: ImageLike, arg_name: str = "image") -> ImageEmbedding:
        """Encode an image with SAM's image encoder (see :meth:`GuidedSamPredictor.encode`)."""
        return self.predictor.encode(image, arg_name)

    def set_reference(self, image: ImageLike, mask: MaskLike) -> PerSAMReference:
        """Encode the reference image and pool its features inside ``mask`` into the target vector.

        Args:
            image: ``(H, W, 3)`` uint8 RGB array, PIL image or path (EXIF orientation applied).
            mask: ``(H, W)`` bool, 0/1, 0/255 array, PIL L/P/RGB/RGBA (alpha) image or path; foreground = nonzero.

        Raises:
            ValueError: the mask's size differs from the image's (both are named), or the mask is empty.
        """
        array = load_image(image, "image")
        bool_mask = load_mask(mask, "mask")
        check_same_size(array.shape, bool_mask.shape, "image", "mask")
        if not bool_mask.any():
            raise ValueError("`mask` is empty: it has no foreground pixel, so there is no reference object.")
        embedding = self.predictor.encode(array, "image")
        return self.set_reference_embedding(embedding, bool_mask)

    def set_reference_embedding(self, embedding: ImageEmbedding, mask: MaskLike) -> PerSAMReference:
        """Like :meth:`set_reference` for an image already encoded by this PerSAM's SAM."""
        bool_mask = load_mask(mask, "mask")
        check_same_size(embedding.original_size, bool_mask.shape, "image", "mask")
        cells = reference_cells(bool_mask, self.predictor.frame_size, self.predictor.grid_size, arg_name="mask")
        features = embedding.features.to(self.predictor.device)
        target = target_embedding(features, cells.cells.to(features.device), pooling="mean")  # (C,)
        self._reference = PerSAMReference(embedding=embedding, mask=bool_mask, cells=cells, target=target)
        return self._reference

    def segment_embedding(self, embedding: ImageEmbedding) -> Segmentation:
        """Segment the reference object in an already-encoded image (no encoder call)."""
        return persam_cascade(self.predictor, embedding, self.reference.target)

    def segment(self, image: ImageLike) -> Segmentation:
        """Segment the reference object in ``image`` (path, PIL image or ``(H, W, 3)`` uint8 array).

        The reference embedding is reused: only ``image`` is encoded. Never raises on an empty intermediate mask
        (see :class:`Segmentation`.fallbacks).
        """
        reference = self.reference
        start = time.perf_counter()
        embedding = self.predictor.encode(image, "image")
        result = persam_cascade(self.predictor, embedding, reference.target)
        result.seconds = time.perf_counter() - start
        return result
