"""Masks drawn over photos: the one place that tints a mask (one colour, :data:`MASK_TINT`, everywhere).

* :func:`overlay_mask`: the photo with its mask tinted and outlined, same size (contact sheets, report thumbnails).
* :func:`masks_grid`: a contact sheet of such overlays (``masks/masks_grid.jpg``), laid out by :mod:`.grids`.
* :func:`draw_overlay`: the PerSAM picture: the similarity heat-map, the tinted mask, the point prompts and the box,
  downscaled so its long side is at most ``max_side`` (``<stem>_overlay.jpg`` of ``segment``, ``eval-perseg``).

Pure PIL/numpy (no matplotlib figure is created, so nothing accumulates over long runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw, ImageFilter

from persam_dreambooth.utils.grids import tile_grid

__all__ = ["MASK_ALPHA", "MASK_TINT", "OVERLAY_MAX_SIDE", "draw_overlay", "masks_grid", "overlay_mask", "tint_mask"]

OVERLAY_MAX_SIDE = 2048  # overlays of larger photos are downscaled to this long side

MASK_TINT = (255, 40, 40)  #: the RGB colour every mask is tinted with (red)
MASK_ALPHA = 0.45  #: the tint's opacity: pixel = (1 - alpha) * photo + alpha * tint
_TINT = np.array(MASK_TINT, dtype=np.float32)
_OUTLINE_RGB = (255, 255, 255)
_POSITIVE_RGB = (0, 220, 0)
_NEGATIVE_RGB = (230, 0, 0)


def tint_mask(canvas: np.ndarray, mask: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """Blend :data:`MASK_TINT` into ``canvas`` where ``mask`` is set, in place; returns ``canvas``.

    Shapes:
        ``canvas (H, W, 3) float32``, ``mask (H, W) bool``.
    """
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * _TINT
    return canvas


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """Tint the mask over the image and outline it in the tint colour.

    Shapes:
        ``image (H, W, 3) uint8``, ``mask (H, W) bool`` -> ``(H, W, 3) uint8``.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"`mask` must have shape (H, W) == image {image.shape[:2]}, got {mask.shape}.")
    out = tint_mask(image.astype(np.float32), mask, alpha)
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


def _heat_lut() -> np.ndarray:
    """A 256-entry blue -> cyan -> yellow -> red colour table, ``(256, 3)`` uint8."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
    pos = np.linspace(0, len(stops) - 1, 256)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[:, None]
    return np.round(stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


_LUT = _heat_lut()


def _fit(size_wh: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size_wh
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    points_xy: ArrayLike | None = None,
    point_labels: ArrayLike | None = None,
    similarity: np.ndarray | None = None,
    box_xyxy: ArrayLike | None = None,
    max_side: int = OVERLAY_MAX_SIDE,
    heat_alpha: float = 0.35,
    mask_alpha: float = MASK_ALPHA,
) -> Image.Image:
    """Draw the overlay picture.

    Args:
        image: ``(H, W, 3)`` uint8 RGB photo.
        mask: ``(H, W)`` bool mask, tinted (:data:`MASK_TINT`) and outlined in white.
        points_xy: ``(N, 2)`` points ``(x, y)`` in original pixels; point_labels ``(N,)`` 1 (green disc) / 0 (red X).
        similarity: ``(H, W)`` float map, min-max scaled and drawn as a heat-map under the mask.
        box_xyxy: ``(4,)`` box ``[x0, y0, x1, y1]`` in original pixels, drawn as a yellow rectangle.
        max_side: long side of the result at most this many pixels.

    Returns:
        An RGB PIL image of size ``(W, H)`` scaled down so its long side is at most ``max_side``.
    """
    height, width = mask.shape
    size = _fit((width, height), max_side)
    photo = Image.fromarray(image)
    if photo.size != size:
        photo = photo.resize(size, Image.Resampling.BILINEAR)
    canvas = np.asarray(photo, dtype=np.float32)  # (h, w, 3) at overlay size
    del photo
    if similarity is not None:
        lo, hi = float(np.min(similarity)), float(np.max(similarity))
        sim_small = Image.fromarray(np.asarray(similarity, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
        norm = (np.asarray(sim_small) - lo) / (hi - lo) if hi > lo else np.zeros(size[::-1], np.float32)
        heat = _LUT[np.clip(np.round(norm * 255), 0, 255).astype(np.uint8)].astype(np.float32)  # (h, w, 3)
        canvas = canvas * (1 - heat_alpha) + heat * heat_alpha
    mask_img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    if mask_img.size != size:
        mask_img = mask_img.resize(size, Image.Resampling.NEAREST)
    small_mask = np.asarray(mask_img) > 0
    tint_mask(canvas, small_mask, mask_alpha)
    out = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    # outline: mask minus its erosion
    dilated = np.asarray(mask_img.filter(ImageFilter.MaxFilter(3)))
    edge = dilated > np.asarray(mask_img.filter(ImageFilter.MinFilter(3)))
    out_arr = np.array(out)
    out_arr[edge] = _OUTLINE_RGB
    out = Image.fromarray(out_arr)
    sx, sy = size[0] / width, size[1] / height
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box_xyxy).reshape(4))
        ImageDraw.Draw(out).rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=(255, 220, 0),
                                      width=max(1, round(max(size) / 400)))
    points = np.asarray(points_xy if points_xy is not None else np.zeros((0, 2))).reshape(-1, 2)  # (N, 2)
    if len(points):
        labels = np.ones(len(points), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
        draw = ImageDraw.Draw(out)
        radius = max(3, round(max(size) / 100))
        for (x, y), label in zip(points, labels, strict=True):
            cx, cy = (x + 0.5) * sx, (y + 0.5) * sy
            box = [cx - radius, cy - radius, cx + radius, cy + radius]
            if label == 1:
                draw.ellipse(box, fill=_POSITIVE_RGB, outline=(0, 0, 0), width=max(1, radius // 4))
            else:
                w = max(2, radius // 2)
                draw.line([box[0], box[1], box[2], box[3]], fill=_NEGATIVE_RGB, width=w)
                draw.line([box[0], box[3], box[2], box[1]], fill=_NEGATIVE_RGB, width=w)
    return out
