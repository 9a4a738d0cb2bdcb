"""The mask follows the image through resize, crop and flip: a planted square stays aligned."""

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth.data.transforms import PairTransform, crop_pair, hflip_pair, random_crop_box, resize_pair


def _planted(hw=(60, 90), box=(10, 50, 30, 70)):
    """A grey image with a white square at rows y0:y1, cols x0:x1 and the matching bool mask."""
    y0, x0, y1, x1 = box
    image = np.full((*hw, 3), 40, dtype=np.uint8)
    image[y0:y1, x0:x1] = 255
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return Image.fromarray(image), mask


def _aligned(image: Image.Image, mask: np.ndarray) -> None:
    bright = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    assert mask.shape == bright.shape
    assert mask.dtype == np.float32 and 0.0 <= mask.min() and mask.max() <= 1.0
    # bright pixels <=> mask pixels, including the soft, resized edge (both resized with the same filter)
    expected = (bright - 40 / 255) / (1 - 40 / 255)
    assert np.abs(expected - mask).max() < 0.02


@pytest.mark.parametrize("center_crop", [True, False])
@pytest.mark.parametrize("random_flip", [True, False])
def test_planted_square_stays_aligned(center_crop, random_flip):
    image, mask = _planted()
    transform = PairTransform(32, center_crop=center_crop, random_flip=random_flip)
    flips = set()
    for seed in range(12):
        out_image, out_mask, params = transform(image, mask, np.random.default_rng(seed))
        assert out_image.size == (32, 32)
        _aligned(out_image, out_mask)
        flips.add(params.flipped)
    assert flips == ({True, False} if random_flip else {False})


def test_crop_and_flip_are_exact_and_random_crop_moves():
    image, mask = _planted()
    float_mask = mask.astype(np.float32)
    boxes = {random_crop_box((60, 90), 40, np.random.default_rng(s)) for s in range(10)}
    assert len(boxes) > 1 and all(b.top + 40 <= 60 and b.left + 40 <= 90 for b in boxes)
    for box in boxes:
        cropped, cmask = crop_pair(image, float_mask, box)
        assert np.array_equal(cmask > 0.5, mask[box.top: box.top + 40, box.left: box.left + 40])
        flipped, fmask = hflip_pair(cropped, cmask)
        assert np.array_equal(np.asarray(flipped), np.asarray(cropped)[:, ::-1])
        assert np.array_equal(fmask, cmask[:, ::-1])
        _aligned(flipped, fmask)


def test_resize_keeps_aspect_and_checks_sizes():
    image, mask = _planted()
    out, out_mask = resize_pair(image, mask, 32)
    assert out.size == (48, 32) and out_mask.shape == (32, 48)
    with pytest.raises(ValueError, match=r"`mask` must have shape \(H, W\) == image \(60, 90\), got \(60, 91\)"):
        resize_pair(image, np.zeros((60, 91), dtype=bool), 32)
    with pytest.raises(ValueError, match="`rng` is required"):
        PairTransform(32).augment(out, out_mask)
