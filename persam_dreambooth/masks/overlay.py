"""A contact sheet of instance images with their masks tinted on top (``OUT/masks/masks_grid.jpg``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from persam_dreambooth.utils.grids import tile_grid

__all__ = ["overlay_mask", "masks_grid"]

_TINT = np.array([255, 40, 40], dtype=np.float32)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Tint the mask red over the image and draw its outline.

    Shapes:
        ``image (H, W, 3) uint8``, ``mask (H, W) bool`` -> ``(H, W, 3) uint8``.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"`mask` must have shape (H, W) == image {image.shape[:2]}, got {mask.shape}.")
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * _TINT
    # Outline: mask pixels with a 4-neighbour outside the mask (borders count as outside).
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # (H, W) all neighbours in
    out[mask & ~inner] = _TINT
    return out.clip(0, 255).astype(np.uint8)


def masks_grid(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: Sequence[str] | None = None,
    tile: int = 256, cols: int | None = None,
) -> Image.Image:
    """Each image with its mask overlaid, scaled to ``tile`` px (longer side), in a near-square grid with labels."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images (>= 1), got {len(images)} images and {len(masks)} masks.")
    overlays = [Image.fromarray(overlay_mask(image, mask)) for image, mask in zip(images, masks, strict=True)]
    captions = [str(label) for label in labels] if labels is not None else None
    return tile_grid(overlays, cols=cols, captions=captions, tile_size=tile)
