"""PerSAM and PerSAM-F on video: track several objects from a frame-0 label map (docs/design/persam_video.md).

    tracker = PerSAMVideo(load_sam("vit_h"), method="persam")       # or method="persam_f"
    labels = tracker.track(frames, first_labels)                      # one (H, W) label map per frame
    for frame in tracker.iter_track(frame_iterator, first_labels):   # streaming: one frame in memory at a time
        frame.labels, frame.objects

The method, exactly as the published video scripts with the three fixes of ``persam_video.md`` (Decisions 1-8):

* **Frame 0.** Per object (label order): the object's grid cells (:func:`video_reference_cells`, Decision 5, with the
  coverage fallback of Fix C), the target ``t = (max + mean) / 2`` of frame 0's raw features over those cells, and a
  box slot = the object's frame-0 mask. PerSAM-F also fits its two mixing weights on frame 0 (§4.1,
  :func:`fit_video_weights`).
* **Every later frame.** Encode the frame once. Per object: the ``topk`` most similar pixels (PerSAM 2, PerSAM-F 1)
  plus the centre of the slot's expanded box (:func:`expanded_box`) are positive points; three decoder passes
  (PerSAM §3: "largest" output with Fix A, mask feedback, box + mask feedback; PerSAM-F §4.2: lambda-mixed output,
  box + mixed-logit feedback, box + logit feedback) give one high-resolution logit map. The maps of all objects
  compete per pixel against a constant zero (arg-max, first on ties): the winner's frame-0 label is the pixel's label.
  Each object's slot becomes its pixels in that label map, or keeps its last non-empty mask (Fix B).
* Empty intermediate masks never raise (Decision 6): the event is recorded in :attr:`ObjectResult.events`.

Neither tracker uses PerSAM's target-guided attention or target-semantic prompting. Shapes: ``H, W`` frame size,
``K`` objects, ``C`` feature channels.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from persam_dreambooth.data.images import ImageLike, load_image
from persam_dreambooth.segmentation.cascade import location_confidence
from persam_dreambooth.segmentation.location_prior import box_from_mask, target_embedding
from persam_dreambooth.segmentation.losses import dice_loss, sigmoid_focal_loss
from persam_dreambooth.segmentation.predictor import DecoderOutput, GuidedSamPredictor, ImageEmbedding
from persam_dreambooth.segmentation.reference_mask import SmallReferenceWarning, cell_coverage, fallback_cell

__all__ = [
    "VIDEO_CELL_THRESHOLD",
    "VIDEO_DEFAULTS",
    "ObjectPasses",
    "ObjectResult",
    "PerSAMVideo",
    "TrackedObject",
    "VideoFrame",
    "check_first_labels",
    "compose_labels",
    "expanded_box",
    "fit_video_weights",
    "object_result",
    "video_reference_cells",
]

logger = logging.getLogger(__name__)

Method = Literal["persam", "persam_f"]

#: The video scripts paint the object mask with value 215 and run it through SAM's image preprocessing, so a cell is
#: "target" when its resampled red value exceeds SAM's red pixel mean 123.675, i.e. when the [0, 1] mask resampled to
#: the grid exceeds 123.675 / 215 (persam_video.md Decision 5; same cells on all 29 object masks of the sample).
VIDEO_CELL_THRESHOLD = 123.675 / 215  # = 0.575233...
_VIDEO_MASK_LEVEL = 215  # the published mask value: the mask is resized as a 0/215 8-bit image (same rounding)

#: Published defaults of the two video scripts (persam_video.md §3, §4).
VIDEO_DEFAULTS: dict[str, dict[str, float | int]] = {
    "persam": {"topk": 2, "box_margin": 10},
    "persam_f": {"topk": 1, "box_margin": 10, "steps": 800, "lr": 4e-4},
}
_ADAMW_EPS = 1e-4  # published AdamW eps (other arguments: PyTorch defaults, weight decay 0.01)
_ENCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class ObjectResult:
    """One object on one frame.

    Attributes:
        label: the object's frame-0 label value.
        score: SAM's predicted IoU of the output whose logits were used (pass C normally); ``nan`` on frame 0.
        area: pixels of the object in the frame's label map.
        box_xyxy: ``(x0, y0, x1, y1)`` tight box (inclusive pixels) of those pixels, ``None`` if it has none.
        points_xy: ``(N, 2)`` positive points ``(x, y)`` given to SAM (top-k similar pixels, then the box centre).
        prompt_box: the expanded previous box given to pass A, ``(x0, y0, x1, y1)``.
        events: notes on Decision-6 fallbacks taken for this object on this frame (empty normally).
        choices: the output (0-2) chosen by decoder passes A, B and C; -1 for PerSAM-F's mix in pass A, a skipped
            pass, or frame 0.
    """

    label: int
    score: float
    area: int
    box_xyxy: tuple[int, int, int, int] | None
    points_xy: np.ndarray
    prompt_box: tuple[int, int, int, int] | None = None
    events: tuple[str, ...] = ()
    choices: tuple[int, int, int] = (-1, -1, -1)


@dataclass
class ObjectPasses:
    """What one object's three decoder passes give on one frame (before the composition).

    Attributes:
        logits: ``(H, W)`` high-resolution logit map competing in the composition.
        score, points, box, events: as in :class:`ObjectResult` (``box`` = the pass-A prompt box).
        choices: the output chosen by passes A, B, C (0-2; -1 = the PerSAM-F mix in pass A, or a skipped pass).
    """

    logits: Tensor
    score: float
    points: np.ndarray
    box: tuple[int, int, int, int]
    events: tuple[str, ...]
    choices: tuple[int, int, int]


@dataclass
class VideoFrame:
    """One frame of a tracked video.

    Attributes:
        index: position in the sequence given to :meth:`PerSAMVideo.iter_track` (0 = the reference frame).
        labels: ``(H, W)`` integer label map (0 background, else a frame-0 label), dtype of ``first_labels``.
        objects: one :class:`ObjectResult` per object, in label order.
        seconds: wall time of this frame (decoding the input excluded; PerSAM-F's fit included on frame 0).
    """

    index: int
    labels: np.ndarray
    objects: list[ObjectResult]
    seconds: float


@dataclass(eq=False)
class TrackedObject:
    """The state of one object while tracking.

    Attributes:
        label: frame-0 label value.
        target: ``(C,)`` raw ``(max + mean) / 2`` target vector (the similarity uses its normalised copy).
        slot: ``(H, W)`` bool, the mask its next box prompt comes from (Fix B: the last mask it was present in).
        weights: ``(3,)`` PerSAM-F mixing weights ``[1 - w1 - w2, w1, w2]``, ``None`` for PerSAM.
        fit_losses: ``(steps,)`` PerSAM-F training loss per step, ``None`` for PerSAM.
        small_reference: True when no cell passed the cell rule and the best-covered cell was used (Fix C).
    """

    label: int
    target: Tensor
    slot: Tensor
    weights: Tensor | None = None
    fit_losses: Tensor | None = None
    small_reference: bool = False
    cells: Tensor | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------- primitives
def video_reference_cells(
    mask: np.ndarray, frame_size: int, grid_size: Sequence[int], arg_name: str = "first_labels"
) -> tuple[Tensor, bool]:
    """The grid cells of one frame-0 object mask (persam_video.md §2 step 1, Decisions 4-5).

    The bool mask is resized as a 0/215 8-bit image to ``ResizeLongestSide(frame_size)``'s size (PIL bilinear: the
    published rounding), scaled to [0, 1], zero-padded to the square frame, resampled bilinearly (align_corners=False)
    to the grid and thresholded at :data:`VIDEO_CELL_THRESHOLD`. If no cell passes (an object smaller than about one
    patch), the single cell with the largest mask *coverage* is used (the float-resized, zero-padded mask averaged
    over each cell's patch; first in row-major order on ties) and a ``SmallReferenceWarning`` is issued (Fix C).
    (Where the resized frame does not fill whole cells, e.g. not 16:9, the published colour trick pads with raw
    123.675 and we pad with 0, which can change a cell at the content's bottom or right edge; 854x480, 640x360 and
    1920x1080 fill whole cells.)

    Shapes:
        mask ``(H, W)`` bool, non-empty -> ``(cells (h, w) bool, fallback)``.
    """
    height, width = mask.shape
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, frame_size)
    as_uint8 = Image.fromarray(mask.astype(np.uint8) * _VIDEO_MASK_LEVEL)  # (H, W) 0/215, mode "L"
    resized = np.asarray(as_uint8.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)  # (h', w')
    framed = torch.zeros(frame_size, frame_size, dtype=torch.float32)
    framed[:new_h, :new_w] = torch.from_numpy(resized) / _VIDEO_MASK_LEVEL  # [0, 1], zero padding bottom/right
    values = F.interpolate(framed[None, None], tuple(grid_size), mode="bilinear", align_corners=False)[0, 0]  # (h, w)
    cells = values > VIDEO_CELL_THRESHOLD
    if bool(cells.any()):
        return cells, False
    row, col = fallback_cell(mask, frame_size, grid_size)  # the one rule of images and video (Decision 2)
    coverage = cell_coverage(mask, frame_size, grid_size)  # (h, w), for the message
    cells = torch.zeros_like(cells)
    cells[row, col] = True
    warnings.warn(
        f"`{arg_name}`: the object ({int(mask.sum())} pixels) covers no embedding cell; using the best-covered cell "
        f"(row {row}, col {col}, coverage {float(coverage[row, col]):.3f}) as its reference (persam_video.md Fix C).",
        SmallReferenceWarning, stacklevel=3,
    )
    return cells, True


def expanded_box(mask: Tensor, margin: int) -> tuple[int, int, int, int]:
    """The published box prompt of a non-empty mask: its tight box grown by ``margin`` pixels (§3 step 2, V2).

    ``x0 - margin`` becomes 0 when it is <= 0 (``y0`` likewise); ``x1 + margin`` becomes ``W`` (one past the last
    column) when it is >= ``W`` (``y1`` likewise with ``H``).

    Shapes:
        mask ``(H, W)`` bool, non-empty -> ``(x0, y0, x1, y1)`` ints.
    """
    box = box_from_mask(mask)
    if box is None:
        raise ValueError("`mask` is empty: an empty slot has no box (Fix B keeps the last non-empty mask).")
    height, width = mask.shape
    c0, r0, c1, r1 = (int(v) for v in box)
    c0 = 0 if c0 - margin <= 0 else c0 - margin
    r0 = 0 if r0 - margin <= 0 else r0 - margin
    c1 = width if c1 + margin >= width else c1 + margin
    r1 = height if r1 + margin >= height else r1 + margin
    return c0, r0, c1, r1


def _box_centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    c0, r0, c1, r1 = box
    return (c0 + c1) // 2, (r0 + r1) // 2


def _topk_points(similarity: Tensor, topk: int) -> Tensor:
    """The ``topk`` largest pixels of ``(H, W)`` in ``torch.topk`` order as ``(topk, 2)`` int64 ``(x, y)`` (P6)."""
    width = similarity.shape[1]
    idx = similarity.reshape(-1).topk(topk).indices  # (H, W) -> (H*W,) row-major -> (topk,)
    rows = torch.div(idx, width, rounding_mode="floor")
    return torch.stack([idx - rows * width, rows], dim=1).to(torch.int64)  # (topk, 2) as (x = col, y = row)


def compose_labels(logit_maps: Sequence[Tensor], labels: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Per-pixel arg-max of a constant-zero background and the objects' logit maps (§3 step 6).

    Background wins where no logit is > 0; ties between objects go to the earlier one; an exact 0 is background.

    Shapes:
        K maps ``(H, W)`` -> ``(H, W)`` label map (``labels[k]`` where object k wins, else 0).
    """
    # The arg-max over (zeros, map_1, ..., map_K), first maximum on ties, one map at a time (a strict ">" keeps the
    # earlier winner on ties; 3-4x faster than torch.argmax over a stacked (K + 1, H, W) tensor on CPU).
    best = torch.zeros_like(logit_maps[0])  # (H, W) the background's constant 0
    winner = torch.zeros(best.shape, dtype=torch.int64, device=best.device)  # (H, W) in 0..K
    for k, logits in enumerate(logit_maps, start=1):
        better = logits > best
        winner.masked_fill_(better, k)
        best = torch.maximum(best, logits)
    winner = winner.cpu().numpy()
    lut = np.asarray([0, *labels], dtype=dtype)  # (K + 1,) winner index -> label value
    return lut[winner]


def check_first_labels(first_labels: object, frame_hw: Sequence[int] | None = None,
                       arg_name: str = "first_labels") -> np.ndarray:
    """Validate the frame-0 label map: ``(H, W)`` integers >= 0 (bool counts as label 1), at least one object.

    Raises:
        ValueError: wrong shape or size, non-integer or negative values, or no object.
    """
    arr = np.asarray(first_labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"`{arg_name}` must be an (H, W) integer label map, got shape {tuple(arr.shape)}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`{arg_name}` must hold integers (0 = background, k = object k), got dtype {arr.dtype}.")
    if frame_hw is not None and tuple(arr.shape) != tuple(frame_hw[:2]):
        raise ValueError(f"`{arg_name}` has size (H, W) = {tuple(arr.shape)} but the reference frame has "
                         f"{tuple(frame_hw[:2])}; the label map must have exactly the frame's size.")
    if arr.size and arr.min() < 0:
        raise ValueError(f"`{arg_name}` holds negative labels (min {int(arr.min())}); use 0 for background.")
    if not arr.any():
        raise ValueError(f"`{arg_name}` is empty: it has no nonzero label, so there is no object to track.")
    return arr


def fit_video_weights(
    logits: Tensor, gt: Tensor, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """PerSAM-F's video fit of one object (persam_video.md §4.1): ``lambda = [1 - w1 - w2, w1, w2]``, ``w`` from 1/3.

    Loss: dice (+1) + sigmoid focal (0.25, 2, mean) of the mixed logits against the frame-0 mask; AdamW(lr, eps 1e-4,
    weight decay 0.01), cosine annealing over ``steps`` (eta_min 0); per step zero grad, backward, step, scheduler
    step. The three logit maps are constants, computed once (Decision 7).

    Shapes:
        logits ``(3, H, W)`` high-resolution logits; gt ``(H, W)`` bool -> ``(weights (3,), losses (steps,))``.
    """
    flat = logits.detach().float().reshape(3, -1)  # (3, H, W) -> (3, H*W)
    target = gt.to(device=flat.device, dtype=torch.float32).reshape(1, -1)  # (H, W) -> (1, H*W)
    w = torch.nn.Parameter(torch.ones(2, 1, device=flat.device) / 3)
    optimizer = torch.optim.AdamW([w], lr=lr, eps=_ADAMW_EPS)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = torch.empty(steps)
    with torch.enable_grad():
        for step in range(steps):
            weight = torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0)  # (2, 1) -> (3, 1)
            mixed = (flat * weight).sum(0).unsqueeze(0)  # (3, H*W) -> (1, H*W)
            loss = dice_loss(mixed, target) + sigmoid_focal_loss(mixed, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses[step] = loss.detach()
    with torch.no_grad():
        weights = torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0).reshape(3)  # (3, 1) -> (3,)
    return weights.detach(), losses


# ---------------------------------------------------------------------------------------------------- tracker
class PerSAMVideo:
    """Track the objects of a frame-0 label map through a video with PerSAM or PerSAM-F (module docstring).

    Args:
        sam: any ``segment_anything.modeling.Sam`` on its device, in eval mode (not modified).
        method: ``"persam"`` (training-free) or ``"persam_f"`` (fits 2 mixing weights per object on frame 0).
        topk: positive points from the similarity map (published: PerSAM 2, PerSAM-F 1).
        box_margin: pixels added around the previous box (published 10).
        steps, lr: PerSAM-F's fit (published 800 steps, 4e-4); ignored by PerSAM.
        encoder_dtype: ``"float32"`` (default, the faithful path), ``"bfloat16"`` or ``"float16"``: the image encoder
            (only) runs under ``torch.autocast``; its features are returned as float32 and the decoder is never
            autocast.

    Raises:
        ValueError: unknown ``method`` or an out-of-range setting (the message names it).
    """

    def __init__(
        self,
        sam: Sam,
        method: Method = "persam",
        *,
        topk: int | None = None,
        box_margin: int | None = None,
        steps: int | None = None,
        lr: float | None = None,
        encoder_dtype: str = "float32",
    ) -> None:
        if encoder_dtype not in _ENCODER_DTYPES:
            raise ValueError(f"`encoder_dtype` must be one of {list(_ENCODER_DTYPES)}, got {encoder_dtype!r}.")
        self.encoder_dtype = encoder_dtype
        if method not in VIDEO_DEFAULTS:
            raise ValueError(f"`method` must be 'persam' or 'persam_f', got {method!r}.")
        defaults = VIDEO_DEFAULTS[method]
        self.method: Method = method
        self.topk = int(defaults["topk"] if topk is None else topk)
        self.box_margin = int(defaults["box_margin"] if box_margin is None else box_margin)
        self.steps = int(VIDEO_DEFAULTS["persam_f"]["steps"] if steps is None else steps)
        self.lr = float(VIDEO_DEFAULTS["persam_f"]["lr"] if lr is None else lr)
        for name, value, low in (("topk", self.topk, 1), ("box_margin", self.box_margin, 0), ("steps", self.steps, 1)):
            if value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a finite number > 0, got {self.lr}.")
        self.predictor = GuidedSamPredictor(sam)

    @property
    def sam(self) -> Sam:
        return self.predictor.sam

    def encode(self, image: ImageLike, arg_name: str = "frame") -> ImageEmbedding:
        """Encode one frame (``GuidedSamPredictor.encode``; under autocast when ``encoder_dtype`` is not float32)."""
        if self.encoder_dtype == "float32":
            return self.predictor.encode(image, arg_name)
        device_type = self.predictor.device.type
        with torch.autocast(device_type=device_type, dtype=_ENCODER_DTYPES[self.encoder_dtype]):
            embedding = self.predictor.encode(image, arg_name)
        return ImageEmbedding(embedding.features.float(), embedding.original_size, embedding.input_size)

    # ------------------------------------------------------------------------------------------------ public API
    def track(self, frames: Iterable[ImageLike], first_labels: np.ndarray) -> list[np.ndarray]:
        """One ``(H, W)`` label map per frame; frame 0's is a copy of ``first_labels``.

        Args:
            frames: a sequence or iterator of frames (paths, PIL images or ``(H, W, 3)`` uint8 RGB arrays), all of
                frame 0's size; frame 0 is the one ``first_labels`` annotates.
            first_labels: ``(H, W)`` integer label map of frame 0 (0 background, ``k`` object ``k``).

        Holds every label map in memory; use :meth:`iter_track` for long videos.
        """
        return [frame.labels for frame in self.iter_track(frames, first_labels)]

    def iter_track(self, frames: Iterable[ImageLike], first_labels: np.ndarray) -> Iterator[VideoFrame]:
        """Stream :meth:`track`: yield a :class:`VideoFrame` per frame as it is done (frame 0 first).

        Only the current frame, its embedding and one mask per object are held, so memory does not grow with the
        video's length. Frames are read from ``frames`` lazily.

        Raises:
            ValueError: ``frames`` is empty, a frame is unreadable or has another size than frame 0 (named
                ``frames[i]``), or ``first_labels`` is invalid (see :func:`check_first_labels`).
        """
        iterator = iter(frames)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("`frames` is empty: give at least the frame that `first_labels` annotates.") from None
        image0 = load_image(first, "frames[0]")
        labels0 = check_first_labels(first_labels, image0.shape)
        start = time.perf_counter()
        objects = self.init_objects(self.encode(image0, "frames[0]"), labels0)
        del image0
        yield VideoFrame(index=0, labels=labels0.copy(), objects=[
            object_result(obj.label, labels0, float("nan"), np.zeros((0, 2), np.int64), None, ())
            for obj in objects
        ], seconds=time.perf_counter() - start)
        size = labels0.shape
        for index, item in enumerate(iterator, start=1):
            image = load_image(item, f"frames[{index}]")
            if image.shape[:2] != size:
                raise ValueError(f"`frames[{index}]` has size (H, W) = {image.shape[:2]} but frame 0 has {size}; "
                                 "every frame of a video must have the same size.")
            start = time.perf_counter()
            embedding = self.encode(image, f"frames[{index}]")
            del image
            labels, results = self.step(embedding, objects, labels0.dtype)
            yield VideoFrame(index=index, labels=labels, objects=results, seconds=time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------------ frame 0
    @torch.no_grad()
    def init_objects(self, embedding: ImageEmbedding, first_labels: np.ndarray) -> list[TrackedObject]:
        """Targets, box slots (and PerSAM-F weights) of every object of the validated frame-0 label map."""
        device = self.predictor.device
        features = embedding.features.to(device)
        objects = []
        for label in (int(v) for v in np.unique(first_labels) if v != 0):
            mask = first_labels == label  # (H, W) bool
            cells, small = video_reference_cells(mask, self.predictor.frame_size, self.predictor.grid_size,
                                                  arg_name=f"first_labels (object {label})")
            target = target_embedding(features, cells.to(device), pooling="max_mean")  # (C,)
            slot = torch.from_numpy(mask).to(device)
            obj = TrackedObject(label=label, target=target, slot=slot, small_reference=small, cells=cells)
            if self.method == "persam_f":
                obj.weights, obj.fit_losses = self._fit(embedding, obj)
            objects.append(obj)
        return objects

    def _fit(self, embedding: ImageEmbedding, obj: TrackedObject) -> tuple[Tensor, Tensor]:
        """PerSAM-F §4.1: top-1 self-similarity point + centre of the expanded GT box, that box; 3 logit maps."""
        similarity = location_confidence(self.predictor, embedding, obj.target)  # (H, W)
        box = expanded_box(obj.slot, self.box_margin)
        points = torch.cat([_topk_points(similarity, self.topk), torch.tensor([_box_centre(box)])])  # (topk + 1, 2)
        del similarity
        out = self.predictor.predict(embedding, points, torch.ones(len(points), dtype=torch.int64),
                                     box=np.asarray(box), multimask_output=True, return_high_res=True)
        assert out.high_res_logits is not None
        return fit_video_weights(out.high_res_logits, obj.slot, self.steps, self.lr)

    # ------------------------------------------------------------------------------------------------ later frames
    @torch.no_grad()
    def step(
        self, embedding: ImageEmbedding, objects: Sequence[TrackedObject], dtype: np.dtype | type = np.int64
    ) -> tuple[np.ndarray, list[ObjectResult]]:
        """Segment one encoded frame: per object three decoder passes, then composition and propagation (Fix B).

        ``objects``' slots are updated in place. Returns ``(labels (H, W), one ObjectResult per object)``.
        """
        passes = [self._object_logits(embedding, obj) for obj in objects]
        labels = compose_labels([p.logits for p in passes], [obj.label for obj in objects], dtype)
        results = []
        for obj, done in zip(objects, passes, strict=True):
            present = labels == obj.label
            if present.any():  # Fix B: otherwise the slot keeps the last mask the object was present in
                obj.slot = torch.from_numpy(present).to(obj.slot.device)
            for event in done.events:
                logger.info("object %d: %s", obj.label, event)
            result = object_result(obj.label, labels, done.score, done.points, done.box, done.events, present)
            result.choices = done.choices
            results.append(result)
        return labels, results

    def _object_logits(self, embedding: ImageEmbedding, obj: TrackedObject) -> ObjectPasses:
        """One object's three decoder passes on one frame (§3 steps 1-5, §4.2 steps 1-5)."""
        predictor = self.predictor
        threshold = predictor.sam.mask_threshold
        similarity = location_confidence(predictor, embedding, obj.target)  # (H, W)
        box = expanded_box(obj.slot, self.box_margin)
        points = torch.cat([_topk_points(similarity, self.topk), torch.tensor([_box_centre(box)])])  # (topk + 1, 2)
        del similarity
        labels = torch.ones(len(points), dtype=torch.int64)
        events: list[str] = []
        out_a = predictor.predict(embedding, points, labels, box=np.asarray(box), multimask_output=True,
                                  return_high_res=True)
        high_a = out_a.high_res_logits  # (3, H, W)
        assert high_a is not None
        if obj.weights is None:  # PerSAM pass A: the output with the most pixels (Fix A: true int64 counts)
            counts = (high_a > threshold).sum(dim=(1, 2), dtype=torch.int64)  # (3,)
            choice_a = int(counts.argmax())
            mask_input = out_a.low_res_logits[choice_a][None]  # (1, h_lr, w_lr)
            pass_b_box = None  # PerSAM's pass B has no box (V3)
        else:  # PerSAM-F pass A: the lambda-mixed output; fallback: argmax(scores * lambda_0) (V4)
            choice_a = -1  # the mix of all three
            lam = obj.weights.to(high_a.device)
            mixed_high = (high_a * lam[:, None, None]).sum(0)  # (3, H, W) * (3, 1, 1) -> (H, W)
            mask_input = (out_a.low_res_logits * lam[:, None, None]).sum(0)[None]  # (1, h_lr, w_lr)
            pass_b_box = box_from_mask(mixed_high > threshold)
            if pass_b_box is None:
                choice_a = int((out_a.iou_predictions * lam[0]).argmax())
                pass_b_box = box_from_mask(high_a[choice_a] > threshold)
                events.append(f"the lambda-mixed pass-A mask is empty: took the box of output {choice_a} "
                              "(argmax of scores * lambda_0)")
                if pass_b_box is None:
                    events.append("that mask is empty too: skipped passes B and C, kept the mixed pass-A logits "
                                  "(Decision 6)")
                    return ObjectPasses(mixed_high, float((out_a.iou_predictions * lam).sum()), points.numpy(), box,
                                        tuple(events), (choice_a, -1, -1))
            del mixed_high
        del high_a
        out_b = predictor.predict(embedding, points, labels, box=None if pass_b_box is None else pass_b_box.cpu(),
                                  mask_input=mask_input, multimask_output=True)
        best_b = out_b.best
        high_b = predictor.upscale(out_b.low_res_logits[best_b][None], embedding)[0]  # (H, W)
        tight = box_from_mask(high_b > threshold)
        if tight is None:
            events.append("the pass-B mask is empty: skipped pass C and kept pass B's logits (Decision 6)")
            return ObjectPasses(high_b, float(out_b.iou_predictions[best_b]), points.numpy(), box, tuple(events),
                                (choice_a, best_b, -1))
        del high_b
        out_c = predictor.predict(embedding, points, labels, box=tight.cpu(),
                                  mask_input=out_b.low_res_logits[best_b][None], multimask_output=True)
        return ObjectPasses(_best_high(predictor, out_c, embedding), float(out_c.iou_predictions[out_c.best]),
                            points.numpy(), box, tuple(events), (choice_a, best_b, out_c.best))


def _best_high(predictor: GuidedSamPredictor, out: DecoderOutput, embedding: ImageEmbedding) -> Tensor:
    """The high-resolution ``(H, W)`` logits of the output with the highest predicted IoU (first on ties)."""
    return predictor.upscale(out.low_res_logits[out.best][None], embedding)[0]


def object_result(
    label: int, labels: np.ndarray, score: float, points: np.ndarray, box: tuple[int, int, int, int] | None,
    events: Sequence[str], present: np.ndarray | None = None,
) -> ObjectResult:
    """The :class:`ObjectResult` of object ``label`` given the frame's label map (``present`` = its pixels)."""
    present = labels == label if present is None else present
    rows = np.flatnonzero(present.any(axis=1))
    cols = np.flatnonzero(present.any(axis=0))
    tight = None if rows.size == 0 else (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    return ObjectResult(label=label, score=score, area=int(present.sum()), box_xyxy=tight,
                        points_xy=np.asarray(points, dtype=np.int64).reshape(-1, 2), prompt_box=box,
                        events=tuple(events))
