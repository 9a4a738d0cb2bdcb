"""Image grids with optional row and column labels (per-prompt grids, side-by-side comparisons)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid"]

_BG = (255, 255, 255)
_EMPTY = (235, 235, 235)
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, max_width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def image_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    *,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    tile_size: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """Paste images into a grid, row by row; ``None`` leaves a grey tile.

    Args:
        rows: ``rows[r][c]`` is the image at row ``r``, column ``c``; rows may have different lengths.
        col_labels: one label per column, drawn above the grid.
        row_labels: one label per row, drawn left of the grid.
        tile_size: side of each (square) tile in pixels; images are resized to fit it, keeping their aspect.
            Default: the largest image side.
        pad: pixels between tiles.

    Returns:
        An RGB image.
    """
    if not rows or not any(rows):
        raise ValueError("`rows` must hold at least one image, got an empty grid.")
    n_cols = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"`col_labels` must have {n_cols} entries (one per column), got {len(col_labels)}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"`row_labels` must have {len(rows)} entries (one per row), got {len(row_labels)}.")
    images = [im for r in rows for im in r if im is not None]
    tile = tile_size or max(max(im.size) for im in images)
    font_size = max(10, min(24, tile // 12))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = font_size + 2 * pad if col_labels else 0
    left = 0
    if row_labels:
        left = min(int(max(probe.textlength(t, font=font) for t in row_labels)) + 2 * pad, 2 * tile)
    width = left + n_cols * tile + (n_cols + 1) * pad
    height = top + len(rows) * tile + (len(rows) + 1) * pad
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    for c in range(n_cols):
        x0 = left + pad + c * (tile + pad)
        if col_labels:
            text = _fit_text(draw, col_labels[c], font, tile)
            draw.text((x0 + (tile - draw.textlength(text, font=font)) / 2, pad), text, fill=_TEXT, font=font)
    for r, row in enumerate(rows):
        y0 = top + pad + r * (tile + pad)
        if row_labels:
            text = _fit_text(draw, row_labels[r], font, left - 2 * pad)
            draw.text((pad, y0 + (tile - font_size) / 2), text, fill=_TEXT, font=font)
        for c in range(n_cols):
            x0 = left + pad + c * (tile + pad)
            im = row[c] if c < len(row) else None
            if im is None:
                draw.rectangle((x0, y0, x0 + tile - 1, y0 + tile - 1), fill=_EMPTY)
                continue
            im = im.convert("RGB")
            scale = tile / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            if size != im.size:
                im = im.resize(size, Image.Resampling.LANCZOS)
            canvas.paste(im, (x0 + (tile - size[0]) // 2, y0 + (tile - size[1]) // 2))
    return canvas
