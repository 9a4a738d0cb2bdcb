"""Which embedding-grid cells belong to the reference object (docs/design/persam_method.md Decision 2, P4).

The published code runs its (128, 0, 0)-coloured annotation through SAM's *image* preprocessing (resize, pixel-mean
normalisation, zero padding), samples it bilinearly onto the grid and keeps the cells whose red value is above 0 after
normalisation, i.e. above ``pixel_mean[0] = 123.675`` in raw units. We load any mask as bool, resize it with the same
geometry as a 0/128 8-bit image (like a PerSeg annotation, so the rounding is the published one), scale it to [0, 1],
zero-pad, resample to the grid and apply the equivalent threshold ``123.675 / 128``
(:data:`REFERENCE_CELL_THRESHOLD`). This reproduces the published cells exactly on square images, without the colour
trick. (On non-square images the published code pads with the *normalised* zero, i.e. raw 123.675, which changes the
partial cells at the content edge; we pad with 0, as Decision 2 asks.)
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

__all__ = ["REFERENCE_CELL_THRESHOLD", "ReferenceCells", "SmallReferenceWarning", "cell_coverage", "fallback_cell",
           "reference_cells"]

#: A grid cell is "target" when the resampled [0, 1] mask exceeds this value. It is 123.675 / 128: PerSeg masks have
#: foreground value 128 and the published code keeps a cell when the resampled value exceeds SAM's red pixel mean
#: (123.675), i.e. when the 2x2 pixels at the centre of the cell's patch are ~96.6 % foreground on average.
REFERENCE_CELL_THRESHOLD = 123.675 / 128  # = 0.96621...
_MASK_LEVEL = 128  # the foreground value of PerSeg annotations: the mask is resized as a 0/128 8-bit image


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

    Steps: resize the mask as a 0/128 8-bit image to ``ResizeLongestSide(frame_size)``'s size (PIL bilinear,
    antialiased when shrinking, the same rounding of the target size) and scale it to [0, 1]; zero-pad to
    ``frame_size`` x ``frame_size``; resample bilinearly (align_corners=False, no antialias) to ``grid_size``;
    threshold at :data:`REFERENCE_CELL_THRESHOLD`.
    If no cell passes, the one cell of :func:`fallback_cell` (largest mask coverage) is used and a
    :class:`SmallReferenceWarning` is issued.

    Raises:
        ValueError: the mask is not 2-D or has no foreground pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"`{arg_name}` must have shape (H, W), got {tuple(mask.shape)}.")
    if not mask.any():
        raise ValueError(f"`{arg_name}` is empty: it has no foreground pixel, so there is no reference object.")
    height, width = mask.shape
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, frame_size)
    # The published resize runs on an 8-bit image whose foreground is 128, so every resized pixel is rounded to a
    # multiple of 1/128; resizing an L-mode 0/128 image reproduces that rounding exactly (a float resize differs in
    # borderline cells, even on square images) and uses a quarter of the memory of a float image.
    as_uint8 = Image.fromarray(mask.astype(np.uint8) * _MASK_LEVEL)  # (H, W) 0/128, mode "L"
    resized = np.array(as_uint8.resize((new_w, new_h), Image.Resampling.BILINEAR))  # (h', w') uint8, writable
    del as_uint8
    framed = torch.zeros(frame_size, frame_size, dtype=torch.float32)
    framed[:new_h, :new_w] = torch.from_numpy(resized).float() / _MASK_LEVEL  # [0, 1], zero padding bottom/right
    values = F.interpolate(framed[None, None], tuple(grid_size), mode="bilinear", align_corners=False)[0, 0]  # (h, w)
    cells = values > REFERENCE_CELL_THRESHOLD
    fallback = not bool(cells.any())
    if fallback:
        row, col = fallback_cell(mask, frame_size, grid_size)  # the cell holding most of the object
        score = cell_coverage(mask, frame_size, grid_size)
        cells = torch.zeros_like(cells)
        cells[row, col] = True
        message = (
            f"`{arg_name}`: the reference object ({int(mask.sum())} pixels) covers no whole embedding cell "
            f"(grid {tuple(grid_size)}, each cell ~{frame_size // grid_size[0]} px of the resized image); using the "
            f"cell holding most of it (row {row}, col {col}, coverage {float(score[row, col]):.3f}). Results may be "
            "poor: use a larger reference object or a closer crop."
        )
        warnings.warn(message, SmallReferenceWarning, stacklevel=3)
    return ReferenceCells(cells=cells, values=values, fallback=fallback)


def fallback_cell(mask: np.ndarray, frame_size: int, grid_size: Sequence[int]) -> tuple[int, int]:
    """The embedding cell for a reference too small for the cell rule: the one the mask covers most.

    Coverage is area pooling of the mask resized like SAM's input (``ResizeLongestSide(frame_size)``, float bilinear,
    so faint pixels are kept) and zero-padded to ``frame_size`` x ``frame_size``, onto the ``grid_size`` grid; ties go
    to the first cell in row-major order. One rule for images and video (``docs/design/persam_method.md``, Decision 2).
    Bilinear samples of the grid resampling are not used: they read only the few pixels at each cell's centre, so
    a tiny object off-centre would lose to a sliver that touches another cell's centre.

    Args:
        mask: ``(H, W)`` bool, non-empty. frame_size: SAM's input side (1024). grid_size: ``(h, w)`` embedding grid.

    Returns:
        ``(row, col)`` of the cell.
    """
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"`mask` must be a non-empty (H, W) mask, got shape {tuple(mask.shape)} with "
                         f"{int(np.count_nonzero(mask))} foreground pixels.")
    score = cell_coverage(mask, frame_size, grid_size)  # (h, w)
    row, col = divmod(int(score.argmax()), score.shape[1])  # argmax: the first maximum in row-major order
    return row, col


def cell_coverage(mask: np.ndarray, frame_size: int, grid_size: Sequence[int]) -> torch.Tensor:
    """The fraction of each grid cell's patch covered by the mask, resized like SAM's input (float bilinear) and
    zero-padded to ``frame_size`` x ``frame_size`` (area pooling; images and video, Decision 2).

    Shapes:
        mask ``(H, W)`` bool -> ``(h, w)`` float32 in [0, 1] for ``grid_size = (h, w)``.
    """
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], frame_size)
    as_float = Image.fromarray(mask.astype(np.float32))  # (H, W) 0/1, mode "F": no rounding of faint pixels
    resized = np.array(as_float.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)  # (h', w')
    del as_float
    framed = torch.zeros(frame_size, frame_size, dtype=torch.float32)
    framed[:new_h, :new_w] = torch.from_numpy(resized)
    return F.adaptive_avg_pool2d(framed[None, None], tuple(grid_size))[0, 0]  # (S, S) -> (h, w) patch means
