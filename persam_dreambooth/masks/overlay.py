"""A contact sheet of instance images with their masks tinted on top (``OUT/masks/masks_grid.jpg``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

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
    """Thumbnails (longer side ``tile``) of each image with its mask overlaid, in a near-square grid with labels."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images (>= 1), got {len(images)} images and {len(masks)} masks.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (cols * tile, rows * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        thumb = Image.fromarray(overlay_mask(image, mask))
        thumb.thumbnail((tile, tile), Image.Resampling.BILINEAR)
        row, col = divmod(i, cols)
        x0, y0 = col * tile, row * (tile + label_h)
        sheet.paste(thumb, (x0 + (tile - thumb.width) // 2, y0 + (tile - thumb.height) // 2))
        if labels:
            draw.text((x0 + 2, y0 + tile), str(labels[i])[:40], fill=(0, 0, 0))
    return sheet
