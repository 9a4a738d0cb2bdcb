"""mIoU / bIoU on hand-made masks with known answers."""

import numpy as np
import pytest

from persam_dreambooth.evaluation.segmentation_metrics import (
    PooledIoU,
    boundary_band,
    boundary_iou,
    boundary_width,
    mean_over_classes,
)
from persam_dreambooth.utils.mask_geometry import mask_iou


def _reference_band(mask: np.ndarray, d: int) -> np.ndarray:
    """The Boundary-IoU definition, literally: pad by one zero pixel, erode d times with a 3x3 kernel
    (outside the padded array counts as foreground, like OpenCV's default border), crop, subtract."""
    m = np.pad(mask.astype(bool), 1)
    for _ in range(d):
        p = np.pad(m, 1, constant_values=True)
        out = np.ones_like(m)
        for dy in range(3):
            for dx in range(3):
                out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
        m = out
    return mask.astype(bool) & ~m[1:-1, 1:-1]


def test_boundary_width_follows_the_diagonal():
    assert boundary_width(100, 100) == 3  # 0.02 * 141.42 = 2.83 -> 3
    assert boundary_width(10, 10) == 1  # 0.28 -> at least 1
    assert boundary_width(480, 640) == 16  # 0.02 * 800 = 16


def test_band_of_a_square_is_a_ring_of_width_d():
    mask = np.zeros((100, 100), bool)
    mask[20:30, 40:50] = True
    band = boundary_band(mask)
    assert band.sum() == 100 - 16  # inner 4x4 survives 3 erosions
    assert not band[23:27, 43:47].any()


def test_band_counts_the_image_border_as_boundary():
    mask = np.ones((20, 30), bool)
    band = boundary_band(mask)  # d = 1
    assert band.sum() == 20 * 30 - 18 * 28


@pytest.mark.parametrize("seed", range(5))
def test_band_matches_iterated_erosion(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(20, 70, size=2)
    mask = rng.random((h, w)) > 0.4
    mask[5:15, 5:18] = True
    d = boundary_width(h, w)
    assert np.array_equal(boundary_band(mask), _reference_band(mask, d))


def test_iou_known_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:5, 0:4] = True  # 20 px
    b[0:5, 2:6] = True  # 20 px, overlap 10
    assert mask_iou(a, b) == pytest.approx(10 / 30)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_boundary_iou_identical_and_disjoint():
    a = np.zeros((50, 50), bool)
    a[10:30, 10:30] = True
    b = np.zeros((50, 50), bool)
    b[35:45, 35:45] = True
    assert boundary_iou(a, a) == 1.0
    assert boundary_iou(a, b) == 0.0


def test_boundary_iou_shifted_square_by_hand():
    # 100x100 image -> d = 3. Square A rows/cols 20..39, square B shifted right by 10 columns.
    a = np.zeros((100, 100), bool)
    b = np.zeros((100, 100), bool)
    a[20:40, 20:40] = True
    b[20:40, 30:50] = True
    ba, bb = boundary_band(a), boundary_band(b)
    assert ba.sum() == 400 - 14 * 14 == bb.sum()
    inter = (ba & bb).sum()
    # Overlap region columns 30..39: A's band there = top/bottom 3 rows (x10 cols) + A's right strip cols 37..39
    # on the 14 middle rows; B's band = top/bottom rows + B's left strip cols 30..32 on the middle rows.
    # Intersection = top/bottom rows over the 10 overlapping columns: 2 * 3 * 10 = 60.
    assert inter == 60
    assert boundary_iou(a, b) == pytest.approx(60 / (2 * 204 - 60))


def test_pooled_iou_is_pooled_not_averaged():
    cls = PooledIoU()
    p1 = np.zeros((10, 10), bool)
    g1 = np.zeros((10, 10), bool)
    p1[:, :5] = True  # 50
    g1[:, :10] = True  # 100 -> inter 50, union 100
    p2 = np.zeros((10, 10), bool)
    g2 = np.zeros((10, 10), bool)
    p2[0, 0] = True  # 1
    g2[0, 0:2] = True  # 2 -> inter 1, union 2
    cls.add(p1, g1)
    cls.add(p2, g2)
    assert cls.iou == pytest.approx(51 / 102)
    assert cls.accuracy == pytest.approx(51 / 102)
    assert [r["iou"] for r in cls.per_image] == [0.5, 0.5]
    other = PooledIoU()
    other.add(g1, g1)
    summary = mean_over_classes({"a": cls, "b": other})
    assert summary["mIoU"] == pytest.approx(100 * (51 / 102 + 1.0) / 2)
    assert summary["bIoU"] == pytest.approx(100 * (cls.biou + 1.0) / 2)


def test_errors_name_the_arguments():
    with pytest.raises(ValueError, match=r"`pred` has shape"):
        mask_iou(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    with pytest.raises(ValueError, match="`dilation_ratio`"):
        boundary_band(np.zeros((3, 3), bool), dilation_ratio=0)
    with pytest.raises(ValueError, match="empty"):
        mean_over_classes({})
