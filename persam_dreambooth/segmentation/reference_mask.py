"""Which embedding-grid cells belong to the reference object (persam_method.md Decision 2, P4).

The published code runs its (128, 0, 0)-coloured annotation through SAM's *image* preprocessing (resize, pixel-mean
normalisation, zero padding), samples it bilinearly onto the grid and keeps the cells whose red value is above 0 after
normalisation, i.e. above ``pixel_mean[0] = 123.675`` in raw units. We load any mask as bool, resample it as a
float in [0, 1] with the same geometry, and apply the equivalent threshold ``123.675 / 128``
(:data:`REFERENCE_CELL_THRESHOLD`), which reproduces the published cell counts without the colour trick.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

__all__ = ["REFERENCE_CELL_THRESHOLD", "ReferenceCells", "SmallReferenceWarning", "reference_cells"]

#: A grid cell is "target" when the resampled [0, 1] mask exceeds this value. It is 123.675 / 128: PerSeg masks have
#: foreground value 128 and the published code keeps a cell when the resampled value exceeds SAM's red pixel mean
#: (123.675), i.e. when the 2x2 pixels at the centre of the cell's patch are ~96.6 % foreground on average.
REFERENCE_CELL_THRESHOLD = 123.675 / 128  # = 0.96621...


class SmallReferenceWarning(UserWarning):
    """The reference object covers no whole grid cell; the single best cell is used instead."""


@dataclass
class ReferenceCells:
    """The reference mask on the embedding grid.

    Attributes:
        cells: ``(h, w)`` bool, the cells pooled into the target embedding (at least one).
        values: ``(h, w)`` float32, the resampled mask in [0, 1] (0 on padding cells).
        fallback: True when no cell passed :data:`REFERENCE_CELL_THRESHOLD` and the best single cell was used.
    """

    cells: torch.Tensor
    values: torch.Tensor
    fallback: bool


def reference_cells(
    mask: np.ndarray, frame_size: int, grid_size: Sequence[int], arg_name: str = "mask"
) -> ReferenceCells:
    """Map a bool ``(H, W)`` reference mask to the embedding grid (Decision 2).

    Steps: resize the mask as a float image to ``ResizeLongestSide(frame_size)``'s size (PIL bilinear, antialiased
    when shrinking, the same rounding of the target size); zero-pad to ``frame_size`` x ``frame_size``; resample
    bilinearly (align_corners=False, no antialias) to ``grid_size``; threshold at :data:`REFERENCE_CELL_THRESHOLD`.
    If no cell passes, the cell with the highest value is used and a :class:`SmallReferenceWarning` is issued.

    Raises:
        ValueError: the mask is not 2-D or has no foreground pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"`{arg_name}` must have shape (H, W), got {tuple(mask.shape)}.")
    if not mask.any():
        raise ValueError(f"`{arg_name}` is empty: it has no foreground pixel, so there is no reference object.")
    height, width = mask.shape
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, frame_size)
    as_float = Image.fromarray(mask.astype(np.float32))  # mode "F"
    resized = np.array(as_float.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    del as_float
    framed = torch.zeros(frame_size, frame_size, dtype=torch.float32)
    framed[:new_h, :new_w] = torch.from_numpy(resized)  # zero padding bottom/right, as Sam.preprocess
    values = F.interpolate(framed[None, None], tuple(grid_size), mode="bilinear", align_corners=False)[0, 0]  # (h, w)
    cells = values > REFERENCE_CELL_THRESHOLD
    fallback = not bool(cells.any())
    if fallback:
        best = int(values.argmax())
        row, col = divmod(best, values.shape[1])
        cells = torch.zeros_like(cells)
        cells[row, col] = True
        message = (
            f"`{arg_name}`: the reference object ({int(mask.sum())} pixels) covers no whole embedding cell "
            f"(grid {tuple(grid_size)}, each cell ~{frame_size // grid_size[0]} px of the resized image); using the "
            f"single best cell (row {row}, col {col}, coverage {float(values[row, col]):.2f}). Results may be poor: "
            "use a larger reference object or a closer crop."
        )
        warnings.warn(message, SmallReferenceWarning, stacklevel=3)
    return ReferenceCells(cells=cells, values=values, fallback=fallback)
