"""Pictures for the page: a photo with its mask tinted (:func:`persam_dreambooth.utils.overlay.overlay_mask`, the
package's one mask tint), the clicks (green positive, red negative) and the box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from persam_dreambooth.utils.overlay import overlay_mask

__all__ = ["display_copy", "draw", "thumbnail"]

_POSITIVE, _NEGATIVE, _BOX = (40, 220, 60), (240, 40, 40), (255, 200, 0)


def draw(image: np.ndarray, mask: np.ndarray | None = None, points: Sequence[Sequence[float]] = (),
         box: Sequence[float] | None = None, alpha: float = 0.5, max_side: int = 1024,
         original_hw: tuple[int, int] | None = None) -> Image.Image:
    """``image (h, w, 3)`` uint8 with ``mask`` tinted and outlined, ``points`` ``[(x, y, label)]`` as dots and
    ``box`` ``[x0, y0, x1, y1]`` as a rectangle, scaled down to ``max_side`` (display only).

    ``points``, ``box`` and ``mask`` are in the photo's pixels: ``original_hw`` = ``(H, W)`` when ``image`` is already
    a smaller copy (the mask is resized to it, nearest neighbour), else the image's own size. Everything is scaled
    *before* drawing, so a 12-megapixel photo costs what its 1024-px copy costs.
    """
    height, width = original_hw or image.shape[:2]
    pil = Image.fromarray(image)
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if pil.size != size:
        pil = pil.resize(size, Image.BILINEAR)
    if mask is not None and mask.any():
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0  # (h, w)
        pil = Image.fromarray(overlay_mask(np.asarray(pil), m, alpha))  # tinted and outlined
    pen = ImageDraw.Draw(pil)
    radius = max(3, round(min(pil.size) / 60))
    sx, sy = size[0] / width, size[1] / height
    if box is not None:
        x0, y0, x1, y1 = box
        pen.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=_BOX, width=max(2, radius // 2))
    for x, y, label in points:
        cx, cy = x * sx, y * sy
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=_POSITIVE if label else _NEGATIVE,
                    outline=(255, 255, 255))
    return pil


def display_copy(path: str, max_side: int = 1024) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo decoded at most ``max_side`` px (JPEG draft mode decodes at 1/2, 1/4, 1/8 directly), EXIF
    orientation applied; returns ``(pixels (h, w, 3) uint8, (H, W) of the full photo)``."""
    from PIL import ImageOps

    with Image.open(path) as img:
        full_w, full_h = img.size
        if img.format == "JPEG":
            img.draft("RGB", (max(1, full_w * max_side // max(full_w, full_h)),
                              max(1, full_h * max_side // max(full_w, full_h))))
        img = ImageOps.exif_transpose(img).convert("RGB")
        orientation_swaps = img.size[0] != img.size[1] and (img.size[0] > img.size[1]) != (full_w > full_h)
        if orientation_swaps:
            full_w, full_h = full_h, full_w
        img.thumbnail((max_side, max_side), Image.BILINEAR)
        return np.asarray(img), (full_h, full_w)


def thumbnail(image: np.ndarray, mask: np.ndarray | None = None, side: int = 320) -> Image.Image:
    """A small :func:`draw` for galleries."""
    return draw(image, mask, max_side=side)
