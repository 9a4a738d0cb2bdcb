"""Joint image + mask geometry: every transform of an image is applied to its mask in the same call.

The image is a PIL RGB image; the mask an ``(H, W)`` float32 array in [0, 1] (bool masks are converted). The
training pipeline is DreamBooth's: resize the shorter side to ``size`` (bilinear, antialiased when shrinking), then
a centre or random ``size`` x ``size`` crop, then an optional horizontal flip. The mask is resized with the same
bilinear filter as a float image, so its edges become soft rather than jagged; crop and flip are exact.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a sample's augmentation is a pure function
of its seed (which makes resumed runs exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "CropBox",
    "PairParams",
    "PairTransform",
    "resize_pair",
    "crop_pair",
    "hflip_pair",
    "center_crop_box",
    "random_crop_box",
]


@dataclass(frozen=True)
class CropBox:
    """A crop window in pixels: rows ``top:top + height``, columns ``left:left + width``."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class PairParams:
    """What a :class:`PairTransform` did: the resized ``(H, W)``, the crop window and whether it flipped."""

    resized_hw: tuple[int, int]
    crop: CropBox
    flipped: bool


def _mask_float(mask: np.ndarray, image: Image.Image) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"`mask` must have shape (H, W), got {tuple(arr.shape)}.")
    if arr.shape != (image.height, image.width):
        raise ValueError(
            f"`mask` must have shape (H, W) == image ({image.height}, {image.width}), got {tuple(arr.shape)}."
        )
    return arr.astype(np.float32, copy=False)


def resize_pair(image: Image.Image, mask: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray]:
    """Resize so the shorter side is ``size`` (aspect kept; the longer side rounds like torchvision's ``Resize``).

    Returns:
        ``(image (H', W'), mask (H', W') float32 in [0, 1])``.
    """
    if size < 1:
        raise ValueError(f"`size` must be >= 1, got {size}.")
    mask = _mask_float(mask, image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return image, mask
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    as_float = Image.fromarray(np.ascontiguousarray(mask))  # float32 -> PIL mode "F"
    mask = np.asarray(as_float.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)  # same filter
    return image, np.clip(mask, 0.0, 1.0)


def center_crop_box(hw: tuple[int, int], size: int) -> CropBox:
    """The centred ``size`` x ``size`` window of an ``(H, W)`` image (rounding like torchvision's CenterCrop)."""
    height, width = hw
    _check_crop(hw, size)
    return CropBox(top=int(round((height - size) / 2.0)), left=int(round((width - size) / 2.0)), height=size,
                   width=size)


def random_crop_box(hw: tuple[int, int], size: int, rng: np.random.Generator) -> CropBox:
    """A uniformly random ``size`` x ``size`` window of an ``(H, W)`` image."""
    height, width = hw
    _check_crop(hw, size)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return CropBox(top=top, left=left, height=size, width=size)


def _check_crop(hw: tuple[int, int], size: int) -> None:
    if size > hw[0] or size > hw[1]:
        raise ValueError(f"crop size {size} is larger than the image (H, W) = {tuple(hw)}; resize first.")


def crop_pair(image: Image.Image, mask: np.ndarray, box: CropBox) -> tuple[Image.Image, np.ndarray]:
    """Crop the image and the mask to the same window. Shapes: ``(H, W)`` -> ``(box.height, box.width)``."""
    mask = _mask_float(mask, image)
    image = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    return image, mask[box.top: box.top + box.height, box.left: box.left + box.width]  # rows, then columns


def hflip_pair(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Mirror the image and the mask left-right."""
    mask = _mask_float(mask, image)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1].copy()  # reverse the column axis


class PairTransform:
    """DreamBooth's instance transform, applied to an image and its mask together.

    Args:
        size: the square output side (``resolution``).
        center_crop: centre crop; otherwise a random crop (diffusers' DreamBooth default).
        random_flip: flip left-right with probability 0.5.

    The work splits in two so callers can cache the deterministic part: :meth:`resize` (the same every epoch) and
    :meth:`augment` (crop and flip, random unless ``center_crop`` and not ``random_flip``).
    """

    def __init__(self, size: int, center_crop: bool = False, random_flip: bool = False) -> None:
        if size < 1:
            raise ValueError(f"`size` must be >= 1, got {size}.")
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip

    @property
    def is_random(self) -> bool:
        """True when :meth:`augment` depends on its generator (random crop or random flip)."""
        return not self.center_crop or self.random_flip

    def resize(self, image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """The deterministic part: shorter side to ``size``."""
        return resize_pair(image, mask, self.size)

    def augment(
        self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, np.ndarray, PairParams]:
        """Crop (centre or random) and optionally flip a resized pair; ``rng`` is required when random."""
        if self.is_random and rng is None:
            raise ValueError("`rng` is required for a random crop or flip.")
        hw = (image.height, image.width)
        box = center_crop_box(hw, self.size) if self.center_crop else random_crop_box(hw, self.size, rng)
        image, mask = crop_pair(image, mask, box)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        if flipped:
            image, mask = hflip_pair(image, mask)
        return image, mask, PairParams(resized_hw=hw, crop=box, flipped=flipped)

    def __call__(
        self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, np.ndarray, PairParams]:
        """Resize, crop and flip. Returns ``(image (size, size), mask (size, size) float32, params)``."""
        image, mask = self.resize(image, mask)
        return self.augment(image, mask, rng)
