"""The package's one bounding-box convention, one mask IoU and one resolve_device, with their edge cases."""

import numpy as np
import pytest
import torch

from persam_dreambooth.segmentation.location_prior import box_from_mask
from persam_dreambooth.utils.devices import resolve_device
from persam_dreambooth.utils.mask_geometry import bbox, mask_iou


def test_bbox_is_exclusive_and_slices_the_mask():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    x0, y0, x1, y1 = bbox(mask)
    assert (x0, y0, x1, y1) == (3, 2, 9, 5)
    assert mask[y0:y1, x0:x1].all() and mask[y0:y1, x0:x1].sum() == mask.sum()
    single = np.zeros((4, 4), dtype=bool)
    single[1, 2] = True
    assert bbox(single) == (2, 1, 3, 2)  # one pixel: width and height 1
    assert bbox(np.zeros((4, 4), dtype=bool)) is None
    assert bbox(torch.from_numpy(mask)) == (3, 2, 9, 5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        bbox(np.zeros((2, 3, 4), dtype=bool))


def test_sam_box_prompt_is_the_inclusive_form_of_bbox():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((12, 17)) > 0.9
        x0, y0, x1, y1 = bbox(mask)
        assert box_from_mask(torch.from_numpy(mask)).tolist() == [x0, y0, x1 - 1, y1 - 1]


def test_mask_iou_conventions():
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    assert mask_iou(a, b) == 1.0  # two empty masks agree perfectly
    b[0, 0] = True
    assert mask_iou(a, b) == 0.0 and mask_iou(b, a) == 0.0  # one empty, one not
    a[0, 0:2] = True
    assert mask_iou(a, b) == 0.5
    assert mask_iou(torch.from_numpy(a), torch.from_numpy(b)) == 0.5
    with pytest.raises(ValueError, match="`pred` has shape"):
        mask_iou(np.zeros((3, 4), bool), np.zeros((4, 3), bool))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="`--device` must be a torch device"):
        resolve_device("gpu0", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`--device` is 'cuda' but CUDA is not available"):
            resolve_device("cuda", "--device")
