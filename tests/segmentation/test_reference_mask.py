"""Reference-mask cells (Decision 2) against an independent implementation of the published rule (P4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from persam_dreambooth.segmentation.reference_mask import (
    REFERENCE_CELL_THRESHOLD,
    SmallReferenceWarning,
    reference_cells,
)

PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def published_cells(mask: np.ndarray, frame: int, grid: int) -> torch.Tensor:
    """P4 as published: the (128, 0, 0) RGB annotation goes through SAM's image preprocessing, then R > 0."""
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[mask] = (128, 0, 0)
    resized = ResizeLongestSide(frame).apply_image(rgb)  # PIL bilinear, uint8
    x = torch.as_tensor(resized).permute(2, 0, 1).float()
    x = (x - PIXEL_MEAN) / PIXEL_STD
    h, w = x.shape[-2:]
    x = F.pad(x, (0, frame - w, 0, frame - h))
    x = F.interpolate(x[None], size=(grid, grid), mode="bilinear")[0]
    return x[0] > 0


def ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


CASES = [
    # (H, W, ellipse params, frame, grid)
    (96, 128, (48, 64, 30, 40), 64, 4),
    (480, 640, (200, 300, 150, 220), 1024, 64),
    (1282, 1282, (700, 600, 400, 350), 1024, 64),
    (300, 170, (150, 85, 120, 60), 1024, 64),
    (2000, 900, (1000, 450, 700, 300), 1024, 64),
    (333, 333, (100, 200, 80, 60), 256, 16),
    # square cases where a float (unrounded) resize of the mask picks other cells than the published 8-bit resize
    (689, 689, (344.5, 344.5, 206.7, 206.7), 256, 16),
    (652, 652, (456.4, 326.0, 195.6, 260.8), 256, 16),
    (615, 615, (307.5, 307.5, 184.5, 184.5), 1024, 64),
    (60, 60, (30.0, 30.0, 18.0, 18.0), 1024, 64),  # upscaled to the frame
]


@pytest.mark.parametrize("h,w,params,frame,grid", CASES)
def test_cells_reproduce_the_published_rule_on_128_valued_masks(h, w, params, frame, grid):
    mask = ellipse(h, w, *params)
    ours = reference_cells(mask, frame, (grid, grid))
    want = published_cells(mask, frame, grid)
    assert not ours.fallback
    assert int(want.sum()) > 0
    assert torch.equal(ours.cells, want), f"{int((ours.cells != want).sum())} cells differ"


def test_threshold_constant():
    assert REFERENCE_CELL_THRESHOLD == pytest.approx(123.675 / 128)
    assert round(REFERENCE_CELL_THRESHOLD, 4) == 0.9662


def test_padding_cells_are_never_selected():
    mask = np.ones((40, 100), dtype=bool)  # everything is foreground; bottom of the frame is padding
    cells = reference_cells(mask, 64, (4, 4))
    content_rows = int(np.ceil(4 * 26 / 64))  # resized 26 x 64
    assert cells.cells[content_rows:].sum() == 0
    assert torch.all(cells.values[content_rows:] == 0)


def test_tiny_object_falls_back_to_the_best_cell_with_a_warning():
    mask = np.zeros((96, 128), dtype=bool)
    mask[40:46, 70:75] = True  # smaller than one 16-px patch of the 64-px frame
    with pytest.warns(SmallReferenceWarning, match="covers no whole embedding cell"):
        cells = reference_cells(mask, 64, (4, 4))
    assert cells.fallback
    assert int(cells.cells.sum()) == 1
    if float(cells.values.max()) > 0:  # the spec's rule: the cell with the highest resampled value
        row, col = divmod(int(cells.values.argmax()), 4)
    else:  # all values 0: the cell that holds the object (rows 20-22, cols 35-37 of the 64-px frame)
        row, col = 1, 2
    assert bool(cells.cells[row, col])
    assert torch.isfinite(cells.values).all()


@pytest.mark.parametrize("shape,rows,cols,want", [
    ((2000, 2000), slice(1500, 1501), slice(1700, 1701), (3, 3)),  # 1 pixel: 0 after the 8-bit resize
    ((64, 64), slice(18, 22), slice(34, 38), (1, 2)),  # misses the 2x2 pixels the grid resampling reads per cell
])
def test_fallback_cell_holds_the_object_when_every_value_is_zero(shape, rows, cols, want):
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    with pytest.warns(SmallReferenceWarning, match=f"row {want[0]}, col {want[1]}"):
        cells = reference_cells(mask, 64, (4, 4))
    assert float(cells.values.max()) == 0.0  # the case: no resampled value to choose by
    assert cells.fallback and cells.cells.nonzero().tolist() == [list(want)]


def test_empty_and_malformed_masks_are_errors():
    with pytest.raises(ValueError, match="`ref` is empty"):
        reference_cells(np.zeros((10, 10), dtype=bool), 64, (4, 4), arg_name="ref")
    with pytest.raises(ValueError, match="shape"):
        reference_cells(np.ones((10, 10, 3), dtype=bool), 64, (4, 4))


def test_fallback_takes_the_most_covered_cell_not_the_brightest_bilinear_sample():
    """Issue 11 item 7 / Decision 2: coverage decides, even when a bilinear sample points elsewhere."""
    from persam_dreambooth.segmentation.reference_mask import fallback_cell

    mask = np.zeros((64, 64), dtype=bool)
    mask[8, 8] = True  # one pixel at the centre of cell (0, 0): the only cell whose bilinear sample is > 0
    mask[0:5, 16:21] = True  # 25 pixels in a corner of cell (0, 1): no sample reads them
    with pytest.warns(SmallReferenceWarning):
        cells = reference_cells(mask, 64, (4, 4))
    assert cells.fallback
    assert float(cells.values[0, 0]) > 0 and float(cells.values[0, 1]) == 0  # the bilinear sample would pick (0, 0)
    assert cells.cells.nonzero().tolist() == [[0, 1]]
    assert fallback_cell(mask, 64, (4, 4)) == (0, 1)


def test_fallback_cell_ties_go_to_the_first_cell_in_row_major_order():
    from persam_dreambooth.segmentation.reference_mask import fallback_cell

    mask = np.zeros((64, 64), dtype=bool)
    mask[40:42, 0:2] = True  # cell (2, 0), 4 pixels
    mask[0:2, 60:62] = True  # cell (0, 3), 4 pixels: first in row-major order
    assert fallback_cell(mask, 64, (4, 4)) == (0, 3)
    with pytest.raises(ValueError, match="non-empty"):
        fallback_cell(np.zeros((8, 8), bool), 64, (4, 4))
