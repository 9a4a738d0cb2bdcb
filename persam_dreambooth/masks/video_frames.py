"""Pick DreamBooth instance images from a phone video: sharp, diverse frames where the subject is present.

    selection = select_instance_frames("dog.mp4", "run/", reference_box=(120, 80, 400, 360), num_frames=12)
    selection.instance_dir   # run/instance_frames/frame_00012.jpg ...
    selection.mask_dir       # run/masks/frame_00012.png ... + masks.json (a MaskSet, what the trainer reads)
                             # run/masks_grid.jpg, run/frame_selection.json

How the frames are chosen (docs/video.md):

1. **Candidates.** At most ``max_candidates`` frames, evenly strided from ``reference_frame`` to the end, are
   tracked with :class:`~persam_dreambooth.segmentation.persam_video.PerSAMVideo` from the reference (a mask, or a
   box / point that plain SAM turns into the mask). Frames before the reference frame are not considered.
2. **Subject present.** The marked frame is; another candidate counts when the tracked mask's SAM predicted IoU
   is at least ``min_score`` (default :data:`DEFAULT_MIN_SCORE` = 0.7) and it covers at least
   ``min_area_fraction`` of the frame (default 0.1 %). Frames where the subject is lost are skipped.
3. **Sharp.** Sharpness = variance of the 4-neighbour Laplacian of the grayscale pixels inside the subject's box (the
   subject's own focus and motion blur, not the background's). Candidates below the median sharpness of the present
   frames are dropped, unless that would leave fewer than ``num_frames``.
4. **Diverse.** Farthest-point sampling on the frames' SAM image embeddings (the encoder output averaged over the
   grid and L2-normalised, so pose, viewpoint and background all count), starting from the sharpest frame; each next
   frame maximises its smallest cosine distance to the frames already chosen (earlier frame on ties).

The chosen frames are decoded again (a second streamed pass) and written with their masks; all files are written
into a temporary folder first and moved into place only once everything succeeded.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MIN_AREA_FRACTION",
    "DEFAULT_MIN_SCORE",
    "FrameCandidate",
    "FrameSelection",
    "farthest_point_order",
    "laplacian_variance",
    "select_instance_frames",
]

logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 12
DEFAULT_MIN_SCORE = 0.7  #: SAM's predicted IoU of the tracked mask needed to count the subject as present
DEFAULT_MIN_AREA_FRACTION = 0.001  #: the tracked mask must cover at least this fraction of the frame
DEFAULT_MAX_CANDIDATES = 200
INSTANCE_DIR = "instance_frames"
MASK_DIR = "masks"
GRID_NAME = "masks_grid.jpg"
SELECTION_JSON = "frame_selection.json"


@dataclass
class FrameCandidate:
    """One tracked candidate frame.

    Attributes:
        index: frame index in the video; name: its output stem (``frame_00012``).
        score: SAM's predicted IoU of the subject's tracked mask; area: its pixels.
        sharpness: Laplacian variance inside the subject's box (0 when absent).
        present: passed the presence rule; chosen: selected.
    """

    index: int
    name: str
    score: float
    area: int
    sharpness: float
    present: bool
    chosen: bool = False


@dataclass
class FrameSelection:
    """What :func:`select_instance_frames` wrote."""

    output_dir: Path
    instance_dir: Path
    mask_dir: Path
    grid_path: Path
    chosen: list[FrameCandidate]
    candidates: list[FrameCandidate]


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D float image (0 for images smaller than 3x3)."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    g = gray.astype(np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]  # (H-2, W-2)
    return float(lap.var())


def farthest_point_order(embeddings: np.ndarray, count: int, first: int) -> list[int]:
    """Greedy farthest-point sampling by cosine distance: ``count`` row indices starting with ``first``.

    Shapes: embeddings ``(N, D)`` L2-normalised rows. Ties go to the lower index.
    """
    count = min(count, len(embeddings))
    chosen = [first]
    nearest = 1.0 - embeddings @ embeddings[first]  # (N,) distance to the closest chosen frame
    nearest[first] = -np.inf
    while len(chosen) < count:
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, 1.0 - embeddings @ embeddings[nxt])
        nearest[chosen] = -np.inf
    return chosen


def _sharpness(image: np.ndarray, box: Sequence[int] | None) -> float:
    if box is None:
        return 0.0
    x0, y0, x1, y1 = box
    crop = image[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
    gray = crop @ np.array([0.299, 0.587, 0.114])  # (h, w, 3) -> (h, w)
    return laplacian_variance(gray)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def select_instance_frames(
    video: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    reference_frame: int = 0,
    reference_mask: str | os.PathLike[str] | np.ndarray | None = None,
    reference_box: str | Sequence[float] | None = None,
    reference_point: str | Sequence[float] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    method: str = "persam",
    min_score: float = DEFAULT_MIN_SCORE,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    sam: Any = None,
    sam_model_type: str = "vit_h",
    sam_checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
    encoder_dtype: str = "float32",
    progress: bool = True,
    arg_names: dict[str, str] | None = None,
) -> FrameSelection:
    """Choose ``num_frames`` sharp, diverse frames with the subject present and write them with their masks.

    Args:
        video: a video file or a folder of frames.
        output_dir: receives ``instance_frames/``, ``masks/`` (a :class:`~persam_dreambooth.masks.store.MaskSet`),
            ``masks_grid.jpg`` and ``frame_selection.json`` (existing ones are replaced; other files are kept).
        reference_frame: the frame the reference marks.
        reference_mask / reference_box / reference_point: exactly one (mask file or ``(H, W)`` array; box
            ``(x0, y0, x1, y1)`` or ``"x0,y0,x1,y1"``; point ``(x, y)``), in frame pixels. Every nonzero pixel of a
            mask counts as the subject (one object).
        num_frames: how many frames to pick (fewer if fewer are present).
        method: ``"persam"`` or ``"persam_f"`` (the tracker).
        min_score, min_area_fraction: the presence rule (module docstring).
        max_candidates: at most this many frames are tracked and scored.
        sam: a loaded ``Sam``; otherwise ``load_sam(sam_model_type, sam_checkpoint, device)``.
        encoder_dtype: the tracker's image-encoder autocast (``"float32"``, ``"bfloat16"``, ``"float16"``).
        arg_names: how errors name the arguments, e.g. ``{"video": "--instance_video", "reference_frame":
            "--reference_frame", "reference_mask": "--reference_mask", ...}`` (defaults: the parameter names).

    Raises:
        FileNotFoundError / ValueError: a bad video or reference (named), or the subject present in no frame.
    """
    import torch
    from tqdm.auto import tqdm

    from persam_dreambooth.data.video import open_video
    from persam_dreambooth.segmentation.persam_video import PerSAMVideo
    from persam_dreambooth.segmentation.reference_prompt import ReferenceArgNames
    from persam_dreambooth.segmentation.video_reference import check_reference_choice, reference_labels
    from persam_dreambooth.utils.io import check_output_dir

    names = {k: k for k in ("video", "reference_frame", "reference_mask", "reference_box", "reference_point",
                            "num_frames", "max_candidates", "min_score", "min_area_fraction", "output_dir")}
    names.update(arg_names or {})
    ref_names = ReferenceArgNames(mask=names["reference_mask"], box=names["reference_box"],
                                  point=names["reference_point"])
    check_reference_choice(reference_mask, reference_box, reference_point, ref_names)
    num_frames = _check_int(num_frames, names["num_frames"], 1)
    max_candidates = _check_int(max_candidates, names["max_candidates"], 1)
    reference_frame = _check_int(reference_frame, names["reference_frame"], 0)
    if not (isinstance(min_score, int | float) and math.isfinite(min_score)):
        raise ValueError(f"`{names['min_score']}` must be a finite number, got {min_score!r}.")
    if not 0 <= min_area_fraction < 1:
        raise ValueError(f"`{names['min_area_fraction']}` must be in [0, 1), got {min_area_fraction!r}.")
    if method not in ("persam", "persam_f"):
        raise ValueError(f"`method` must be 'persam' or 'persam_f', got {method!r}.")
    output_dir = check_output_dir(output_dir, names["output_dir"])  # a file or an unwritable folder: refused now

    source = open_video(video, names["video"])
    stride = 1
    if source.frame_count is not None:
        stride = max(1, math.ceil((source.frame_count - reference_frame) / max_candidates))
    frames = source.frames(every_nth=stride, max_frames=max_candidates, start=reference_frame)
    ref = next(frames, None)
    if ref is None or ref.index != reference_frame:
        raise ValueError(f"`{names['reference_frame']}` {reference_frame} is out of range: `{names['video']}` has "
                         f"{source.frame_count if source.frame_count is not None else 'fewer'} frame(s).")
    if reference_mask is not None:
        labels, _ = reference_labels(ref.image, mask=reference_mask, names=ref_names)
    if sam is None:
        from persam_dreambooth.segmentation.sam import load_sam

        sam = load_sam(sam_model_type, checkpoint=sam_checkpoint, device=device)
    tracker = PerSAMVideo(sam, method, encoder_dtype=encoder_dtype)  # type: ignore[arg-type]
    if reference_mask is None:
        labels, _ = reference_labels(ref.image, box=reference_box, point=reference_point,
                                     predictor=tracker.predictor, names=ref_names)
    first = (labels > 0).astype(np.uint8)  # the subject: every marked pixel, one object
    height, width = first.shape

    candidates: list[FrameCandidate] = []
    embeddings: list[np.ndarray] = []
    packed: list[np.ndarray] = []  # (H*W/8,) packed masks of the candidates

    def record(index: int, image: np.ndarray, mask: np.ndarray, score: float, emb: torch.Tensor,
               marked: bool = False) -> None:
        area = int(mask.sum())
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = None if area == 0 else (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
        present = marked or (score >= min_score and area >= min_area_fraction * height * width)
        candidates.append(FrameCandidate(index=index, name=f"frame_{index:05d}", score=float(score), area=area,
                                         sharpness=_sharpness(image, box) if present else 0.0, present=present))
        vector = emb.float().mean(dim=(1, 2)).cpu().numpy()  # (C, h, w) -> (C,)
        embeddings.append(vector / max(float(np.linalg.norm(vector)), 1e-12))
        packed.append(np.packbits(mask.reshape(-1)))

    embedding = tracker.encode(ref.image, names["video"])
    objects = tracker.init_objects(embedding, first)
    record(ref.index, ref.image, first > 0, 1.0, embedding.features, marked=True)  # present by definition
    total = None if source.frame_count is None else min(max_candidates, len(range(reference_frame,
                                                                                  source.frame_count, stride)))
    with tqdm(total=total, initial=1, desc="tracking candidates", unit="frame", disable=not progress) as bar:
        for data in frames:
            embedding = tracker.encode(data.image, f"{names['video']} frame {data.index}")
            labels_i, results = tracker.step(embedding, objects, np.uint8)
            record(data.index, data.image, labels_i > 0, results[0].score, embedding.features)
            bar.update(1)

    present = [i for i, c in enumerate(candidates) if c.present]  # the marked frame always is
    sharp_values = np.array([candidates[i].sharpness for i in present])
    median = float(np.median(sharp_values))
    sharp = [i for i in present if candidates[i].sharpness >= median]
    if len(sharp) < num_frames:  # keep the sharpest num_frames of the present frames
        sharp = sorted(present, key=lambda i: (-candidates[i].sharpness, i))[:num_frames]
    if len(present) < num_frames:
        logger.warning("only %d frame(s) have the subject present; writing those (asked for %d)", len(present),
                       num_frames)
    pool = sorted(sharp)
    vectors = np.stack([embeddings[i] for i in pool])  # (n, C)
    first_pick = max(range(len(pool)), key=lambda k: (candidates[pool[k]].sharpness, -k))
    picked = sorted(pool[k] for k in farthest_point_order(vectors, num_frames, first_pick))
    for i in picked:
        candidates[i].chosen = True
    chosen = [candidates[i] for i in picked]
    masks = {candidates[i].name: np.unpackbits(packed[i], count=height * width).reshape(height, width).astype(bool)
             for i in picked}
    return _write(output_dir, source, chosen, candidates, masks, {
        "video": str(Path(video).resolve()), "reference_frame": reference_frame, "method": method,
        "num_frames": num_frames, "min_score": min_score, "min_area_fraction": min_area_fraction, "stride": stride,
        "sharpness": "variance of the 4-neighbour Laplacian inside the subject's box; kept >= median of present",
        "diversity": "farthest-point sampling, cosine distance of mean SAM image embeddings",
    })


def _write(output_dir: Path, source: Any, chosen: list[FrameCandidate], candidates: list[FrameCandidate],
           masks: dict[str, np.ndarray], settings: dict[str, Any]) -> FrameSelection:
    from PIL import Image

    from persam_dreambooth import __version__
    from persam_dreambooth.masks.store import MaskSet
    from persam_dreambooth.utils.io import atomic_write_json
    from persam_dreambooth.utils.overlay import masks_grid

    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".frames.", suffix=".tmp", dir=output_dir))
    try:
        wanted = {c.index: c for c in chosen}
        images: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (thumbnail (h, w, 3), its mask (h, w))
        (tmp / INSTANCE_DIR).mkdir()
        last = max(wanted)
        for data in source.frames():  # second pass: only the chosen frames are kept
            if data.index in wanted:
                name = wanted[data.index].name
                Image.fromarray(data.image).save(tmp / INSTANCE_DIR / f"{name}.jpg", quality=95)
                small = Image.fromarray(data.image)
                small.thumbnail((256, 256))
                mask_small = Image.fromarray(masks[name].astype(np.uint8) * 255).resize(small.size)
                images[name] = (np.asarray(small), np.asarray(mask_small) > 127)
            if data.index >= last:
                break
        record = {"source": "video", "method": settings["method"], "settings": settings,
                  "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "package_version": __version__,
                  "images": {c.name: {"frame": c.index, "score": round(c.score, 6), "area": c.area,
                                      "sharpness": round(c.sharpness, 3)} for c in chosen}}
        MaskSet.write(tmp / MASK_DIR, masks, record)
        names = [c.name for c in chosen]
        grid = masks_grid([images[n][0] for n in names], [images[n][1] for n in names], names)
        grid.save(tmp / GRID_NAME, quality=90)
        atomic_write_json(tmp / SELECTION_JSON, {"settings": settings,
                                                 "candidates": [asdict(c) for c in candidates]})
        (output_dir / GRID_NAME).unlink(missing_ok=True)
        for item in (INSTANCE_DIR, MASK_DIR, SELECTION_JSON, GRID_NAME):  # the grid last: its presence = complete
            target = output_dir / item
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FrameSelection(output_dir=output_dir, instance_dir=output_dir / INSTANCE_DIR,
                          mask_dir=output_dir / MASK_DIR, grid_path=output_dir / GRID_NAME, chosen=chosen,
                          candidates=candidates)
