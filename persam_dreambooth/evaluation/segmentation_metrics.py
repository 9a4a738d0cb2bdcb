"""Segmentation metrics of the PerSeg benchmark: pooled per-class IoU (mIoU) and Boundary IoU (bIoU).

Definitions (``docs/design/persam_method.md`` §6.2-6.3, Decision 7):

* **IoU of one image pair**: :func:`persam_dreambooth.utils.mask_geometry.mask_iou` (1.0 for two empty masks).
* **IoU of a class** = Σ_images |P ∩ G| / Σ_images |P ∪ G| over the class's test images (pooled, not a per-image
  mean), as the published ``eval_miou.py`` computes it; **mIoU** = 100 × the mean over classes. **mAcc** likewise with
  Σ|P ∩ G| / Σ|G|.
* **Boundary IoU** (Cheng et al., CVPR 2021): the boundary band of a mask ``M`` is ``M − erode(M, d)``, with a 3×3
  erosion applied ``d = max(1, round(dilation_ratio × image diagonal))`` times on the mask zero-padded by one pixel
  (so pixels on the image border count as boundary). ``bIoU = |B_G ∩ B_P| / |B_G ∪ B_P|``, pooled per class like
  IoU (Decision 7), ``dilation_ratio = 0.02``.

``d`` iterations of a 3×3 erosion equal one erosion by a (2d+1)×(2d+1) square, computed here exactly with an integral
image (a pixel survives iff its whole window, zeros outside the image, is foreground).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from persam_dreambooth.utils.mask_geometry import check_mask_pair

__all__ = [
    "DEFAULT_DILATION_RATIO",
    "boundary_band",
    "boundary_iou",
    "PooledIoU",
    "mean_over_classes",
]

DEFAULT_DILATION_RATIO = 0.02
_EPS = 1e-10  # the published script's guard against an empty union


def boundary_width(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """``d = max(1, round(dilation_ratio × sqrt(H² + W²)))``, the number of 3×3 erosions."""
    if dilation_ratio <= 0:
        raise ValueError(f"`dilation_ratio` must be > 0, got {dilation_ratio}.")
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def boundary_band(mask: np.ndarray, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> np.ndarray:
    """The inner boundary band ``mask − erode(mask, d)`` of an ``(H, W)`` mask, as a bool ``(H, W)`` array."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be (H, W), got shape {mask.shape}.")
    h, w = mask.shape
    d = boundary_width(h, w, dilation_ratio)
    k = 2 * d + 1
    # Integral image of the mask zero-padded by d on every side: (H + 2d + 1, W + 2d + 1), leading zero row/col.
    padded = np.pad(mask.astype(np.int64), d)
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)
    # Window sum centred on original pixel (i, j) = padded rows i..i+2d, cols j..j+2d.
    window = integral[k:k + h, k:k + w] - integral[:h, k:k + w] - integral[k:k + h, :w] + integral[:h, :w]
    eroded = window == k * k
    return mask & ~eroded


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> float:
    """Boundary IoU of two ``(H, W)`` masks; 1.0 when both bands are empty."""
    pred, gt = check_mask_pair(pred, gt)
    bp, bg = boundary_band(pred, dilation_ratio), boundary_band(gt, dilation_ratio)
    union = int(np.count_nonzero(bp | bg))
    return 1.0 if union == 0 else int(np.count_nonzero(bp & bg)) / union


@dataclass
class PooledIoU:
    """Accumulates pooled IoU, accuracy and Boundary IoU over the test images of one class."""

    dilation_ratio: float = DEFAULT_DILATION_RATIO
    intersection: int = 0
    union: int = 0
    gt_area: int = 0
    boundary_intersection: int = 0
    boundary_union: int = 0
    per_image: list[dict[str, float]] = field(default_factory=list)

    def add(self, pred: np.ndarray, gt: np.ndarray, name: str = "") -> dict[str, float]:
        """Add one image's ``(H, W)`` prediction and ground truth; returns that image's own IoU and bIoU."""
        pred, gt = check_mask_pair(pred, gt)
        inter = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        bp, bg = boundary_band(pred, self.dilation_ratio), boundary_band(gt, self.dilation_ratio)
        b_inter = int(np.count_nonzero(bp & bg))
        b_union = int(np.count_nonzero(bp | bg))
        self.intersection += inter
        self.union += union
        self.gt_area += int(np.count_nonzero(gt))
        self.boundary_intersection += b_inter
        self.boundary_union += b_union
        record = {
            "name": name,
            "iou": 1.0 if union == 0 else inter / union,
            "biou": 1.0 if b_union == 0 else b_inter / b_union,
        }
        self.per_image.append(record)
        return record

    @property
    def count(self) -> int:
        return len(self.per_image)

    @property
    def iou(self) -> float:
        """Σ|P∩G| / (Σ|P∪G| + 1e-10), as the published script."""
        return self.intersection / (self.union + _EPS)

    @property
    def accuracy(self) -> float:
        """Σ|P∩G| / (Σ|G| + 1e-10)."""
        return self.intersection / (self.gt_area + _EPS)

    @property
    def biou(self) -> float:
        """Σ|B_P∩B_G| / (Σ|B_P∪B_G| + 1e-10)."""
        return self.boundary_intersection / (self.boundary_union + _EPS)


def mean_over_classes(per_class: Mapping[str, PooledIoU]) -> dict[str, float]:
    """``{"mIoU", "bIoU", "mAcc"}`` in percent: the mean over classes of the pooled per-class values."""
    if not per_class:
        raise ValueError("`per_class` is empty: no class was evaluated.")
    n = len(per_class)
    return {
        "mIoU": 100.0 * sum(c.iou for c in per_class.values()) / n,
        "bIoU": 100.0 * sum(c.biou for c in per_class.values()) / n,
        "mAcc": 100.0 * sum(c.accuracy for c in per_class.values()) / n,
    }
