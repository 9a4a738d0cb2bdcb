"""The reference of a video: frame ``N`` marked with a label map, a box or a click (video commands and the trainer).

:func:`reference_labels` turns a marked frame into the ``(H, W)`` label map :class:`~.persam_video.PerSAMVideo`
starts from: a mask file (palette PNG: one object per palette index; any other mask: one object), or a box / a point
from which plain SAM makes the mask of object 1 (its best of three outputs by predicted IoU). Every error names the
argument (``--ref-mask``, ``--ref-box``, ``--ref-point`` for the CLI; the library's parameter names by default):
the names are a :class:`~.reference_prompt.ReferenceArgNames`, and boxes / points are parsed and checked by
:func:`~.reference_prompt.check_box` / :func:`~.reference_prompt.check_point`, as for photos.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from persam_dreambooth.data.video import read_label_map
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor
from persam_dreambooth.segmentation.reference_prompt import ReferenceArgNames, check_box, check_point

__all__ = ["check_reference_choice", "reference_labels"]


def check_reference_choice(mask: object, box: object, point: object,
                           names: ReferenceArgNames = ReferenceArgNames()) -> None:  # noqa: B008 (frozen)
    """Exactly one of the three reference forms must be given."""
    given = [n for n, v in ((names.mask, mask), (names.box, box), (names.point, point)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of `{names.mask}`, `{names.box}` and `{names.point}` to mark the subject "
                         f"on the reference frame; got {'none' if not given else ', '.join(given)}.")


def reference_labels(
    frame: np.ndarray,
    *,
    mask: str | os.PathLike[str] | np.ndarray | None = None,
    box: str | Sequence[float] | None = None,
    point: str | Sequence[float] | None = None,
    predictor: GuidedSamPredictor | None = None,
    names: ReferenceArgNames = ReferenceArgNames(),  # noqa: B008 (frozen)
) -> tuple[np.ndarray, float | None]:
    """The reference frame's label map from a mask, a box or a point: ``(labels (H, W) uint8, SAM score or None)``.

    Args:
        frame: ``(H, W, 3)`` uint8 reference frame.
        mask: a label-map file (see :func:`~persam_dreambooth.data.video.read_label_map`) or an ``(H, W)`` integer
            array.
        box, point: ``"x0,y0,x1,y1"`` / ``"x,y"`` in frame pixels (or numbers); SAM makes object 1's mask.
        predictor: needed for ``box`` / ``point``.

    Raises:
        ValueError: not exactly one form, a mask of another size than the frame, an empty mask, a box/point outside the
            frame, or SAM finding nothing there.
    """
    check_reference_choice(mask, box, point, names)
    height, width = frame.shape[:2]
    if mask is not None:
        labels = np.asarray(mask) if isinstance(mask, np.ndarray) else read_label_map(mask, names.mask)
        if labels.ndim != 2 or labels.shape != (height, width):
            raise ValueError(f"`{names.mask}` has size (H, W) = {tuple(labels.shape[:2])} but the reference frame "
                             f"has {(height, width)}; the mask must have exactly the frame's size.")
        if not labels.any():
            raise ValueError(f"`{names.mask}` is empty: it has no nonzero pixel, so there is no object to track.")
        if int(labels.max()) > 255 or int(labels.min()) < 0:
            raise ValueError(f"`{names.mask}` labels must be in 0..255, got {int(labels.min())}..{int(labels.max())}.")
        return labels.astype(np.uint8), None
    if predictor is None:
        raise ValueError("a `predictor` is needed to make the reference mask from a box or a point.")
    embedding = predictor.encode(frame, "reference frame")
    if box is not None:
        b = check_box(box, width, height, names.box)
        out = predictor.predict(embedding, box=torch.tensor(b, dtype=torch.float64), multimask_output=True)
        what = f"`{names.box}` {b}"
    else:
        p = check_point(point, width, height, names.point)  # type: ignore[arg-type]
        out = predictor.predict(embedding, point_coords=torch.tensor([p], dtype=torch.float64),
                                point_labels=torch.tensor([1]), multimask_output=True)
        what = f"`{names.point}` {p}"
    best = out.best
    sam_mask = predictor.upscale_mask(out.low_res_logits[best], embedding).cpu().numpy()
    if not sam_mask.any():
        raise ValueError(f"{what}: SAM found no object there on the reference frame; mark it differently or give "
                         f"`{names.mask}`.")
    return sam_mask.astype(np.uint8), float(out.iou_predictions[best])
