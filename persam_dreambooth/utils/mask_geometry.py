"""Two measurements of masks, each with one convention for the whole package.

* :func:`bbox`: the tight box ``(x0, y0, x1, y1)`` with ``x1``/``y1`` **exclusive** (numpy slicing:
  ``mask[y0:y1, x0:x1]`` is the box; width ``x1 - x0``). SAM's box *prompt* is another quantity: the published PerSAM
  gives SAM the corner pixels' own coordinates, ``(x0, y0, x1 - 1, y1 - 1)``
  (:func:`persam_dreambooth.segmentation.location_prior.box_from_mask`).
* :func:`mask_iou`: ``|A & B| / |A | B|``, and **1.0 for two empty masks** (identical masks agree perfectly; the
  PerSeg evaluation counts an empty prediction of an absent object as right). The multi-instance search compares
  only non-empty masks, so the convention does not change its results.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bbox", "check_mask_pair", "mask_iou"]


def _as_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def bbox(mask: Any) -> tuple[int, int, int, int] | None:
    """The tight box ``(x0, y0, x1, y1)`` around the foreground (``x1``, ``y1`` exclusive), or None when empty.

    Args:
        mask: ``(H, W)`` bool numpy array or tensor, or float where > 0.5 counts as foreground.
    """
    arr = _as_numpy(mask)
    if arr.ndim != 2:
        raise ValueError(f"`mask` must have shape (H, W), got {tuple(arr.shape)}.")
    fg = arr if arr.dtype == bool else arr > 0.5
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def check_mask_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as ``(H, W)`` bool numpy arrays of one shape.

    Raises:
        ValueError: a mask is not 2-D, or the shapes differ (both named, with their shapes).
    """
    pred, gt = _as_numpy(pred), _as_numpy(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"`pred` and `gt` must be (H, W) masks, got shapes {pred.shape} and {gt.shape}.")
    if pred.shape != gt.shape:
        raise ValueError(f"`pred` has shape (H, W) = {pred.shape} but `gt` has {gt.shape}; they must match.")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def mask_iou(pred: Any, gt: Any) -> float:
    """Intersection over union of two ``(H, W)`` masks (nonzero = foreground); **1.0 when both are empty**.

    Raises:
        ValueError: a mask is not 2-D, or the shapes differ (both named, with their shapes).
    """
    pred, gt = check_mask_pair(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & gt)) / union
