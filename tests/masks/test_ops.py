"""Mask operations: dilation, feathering, area downsampling to the latent grid, coverage, bbox."""

import numpy as np
import pytest
import torch

from persam_dreambooth.masks import bbox, coverage, dilate, feather, to_latent_resolution


def test_dilate_grows_a_point_into_a_disk_and_keeps_type():
    mask = np.zeros((21, 21), dtype=bool)
    mask[10, 10] = True
    grown = dilate(mask, 3)
    assert isinstance(grown, np.ndarray) and grown.dtype == bool
    yy, xx = np.mgrid[:21, :21]
    disk = (yy - 10) ** 2 + (xx - 10) ** 2 <= 9
    assert np.array_equal(grown, disk)
    assert np.array_equal(dilate(mask, 0), mask)
    # at the border the disk is clipped, not wrapped
    corner = np.zeros((8, 8), dtype=bool)
    corner[0, 0] = True
    assert dilate(corner, 2).sum() == sum(1 for y in range(3) for x in range(3) if x * x + y * y <= 4)


def test_dilate_soft_tensor_is_a_grayscale_max():
    mask = torch.zeros(2, 1, 9, 9)
    mask[0, 0, 4, 4] = 0.5
    out = dilate(mask, 1)
    assert out.shape == mask.shape and out.dtype == torch.float32
    assert out[0, 0, 3:6, 4].tolist() == [0.5, 0.5, 0.5] and out[0, 0, 3, 3] == 0  # a radius-1 disk is a plus
    assert out[1].sum() == 0
    with pytest.raises(ValueError, match="dilation radius"):
        dilate(mask, -1)


def test_feather_softens_edges_and_keeps_the_inside():
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    soft = feather(mask, 1)
    assert soft.dtype == np.float32
    assert soft[8, 8] == 1.0 and soft[0, 0] == 0.0
    assert 0.0 < soft[4, 8] < 1.0 and 0.0 < soft[3, 8] < 1.0


def test_latent_downsampling_is_an_area_average_that_preserves_coverage():
    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 3:13, 5:22] = 1.0  # edges not on the 4x4 grid: partially covered cells
    small = to_latent_resolution(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert torch.allclose(coverage(small), coverage(mask), atol=1e-6)
    assert small[0, 0, 0, 1] == pytest.approx(1 * 3 / 16)  # rows 3 of 0-3, cols 5-7 of 4-7: 1x3 pixels
    assert small[0, 0, 1, 2] == 1.0 and small.min() == 0.0
    # a bool (H, W) mask works and keeps its leading shape
    as_bool = to_latent_resolution(mask[0, 0] > 0.5, (8, 8))
    assert as_bool.shape == (8, 8) and torch.equal(as_bool, small[0, 0])


def test_coverage_and_bbox():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    assert coverage(mask).item() == pytest.approx(18 / 200)
    assert bbox(mask) == (3, 2, 9, 5)
    assert bbox(np.zeros((4, 4), dtype=bool)) is None
    assert bbox(torch.from_numpy(mask).float()) == (3, 2, 9, 5)
