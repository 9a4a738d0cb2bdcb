"""Image grids with optional row/column labels and per-tile captions.

One implementation for every picture sheet the package writes: per-prompt generation grids, side-by-side
comparisons, training validation grids and the masks overview (PIL only, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid", "tile_grid"]

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


def _wrap_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, max_width: int, max_lines: int
) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``max_width`` pixels (the last one shortened with
    an ellipsis if needed). Lines break after a space, ``_``, ``-``, ``.`` or ``/`` when one is near, else anywhere,
    so long run names such as ``masked_rank8_lr1e-4`` stay readable instead of all ending in the same "…"."""
    lines: list[str] = []
    rest = text
    while rest and len(lines) < max_lines - 1 and draw.textlength(rest, font=font) > max_width:
        cut = len(rest)
        while cut > 1 and draw.textlength(rest[:cut], font=font) > max_width:
            cut -= 1
        soft = max((rest.rfind(ch, 0, cut) for ch in " _-./"), default=-1)
        if soft >= cut // 2:  # a separator in the second half of the line: break after it
            cut = soft + 1
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        lines.append(_fit_text(draw, rest, font, max_width))
    return lines


def image_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    *,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    captions: Sequence[Sequence[str | None]] | None = None,
    tile_size: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """Paste images into a grid, row by row; ``None`` leaves a grey tile.

    Args:
        rows: ``rows[r][c]`` is the image at row ``r``, column ``c``; rows may have different lengths.
        col_labels: one label per column, drawn above the grid (wrapped onto up to 3 lines when too long).
        row_labels: one label per row, drawn left of the grid.
        captions: ``captions[r][c]``, a short text drawn under that tile (shortened with an ellipsis to fit).
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
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"`captions` must have {len(rows)} rows (one per grid row), got {len(captions)}.")
    images = [im for r in rows for im in r if im is not None]
    tile = tile_size or max(max(im.size) for im in images)
    font_size = max(10, min(24, tile // 12))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 2
    wrapped = [_wrap_text(probe, label, font, tile, max_lines=3) for label in col_labels] if col_labels else []
    top = max(len(w) for w in wrapped) * line_h + 2 * pad if wrapped else 0
    left = 0
    if row_labels:
        left = min(int(max(probe.textlength(t, font=font) for t in row_labels)) + 2 * pad, 2 * tile)
    cap_h = line_h if captions is not None and any(any(c for c in row) for row in captions) else 0
    cell_h = tile + cap_h
    width = left + n_cols * tile + (n_cols + 1) * pad
    height = top + len(rows) * cell_h + (len(rows) + 1) * pad
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    for c in range(n_cols):
        x0 = left + pad + c * (tile + pad)
        if wrapped:
            y = top - pad - len(wrapped[c]) * line_h  # labels sit on the grid; shorter ones are bottom-aligned
            for k, text in enumerate(wrapped[c]):
                draw.text((x0 + (tile - draw.textlength(text, font=font)) / 2, y + k * line_h), text, fill=_TEXT,
                          font=font)
    for r, row in enumerate(rows):
        y0 = top + pad + r * (cell_h + pad)
        if row_labels:
            text = _fit_text(draw, row_labels[r], font, left - 2 * pad)
            draw.text((pad, y0 + (tile - font_size) / 2), text, fill=_TEXT, font=font)
        for c in range(n_cols):
            x0 = left + pad + c * (tile + pad)
            caption = captions[r][c] if cap_h and c < len(captions[r]) else None
            if caption:
                text = _fit_text(draw, caption, font, tile)
                draw.text((x0 + (tile - draw.textlength(text, font=font)) / 2, y0 + tile + 1), text, fill=_TEXT,
                          font=font)
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


def tile_grid(
    images: Sequence[Image.Image],
    *,
    cols: int | None = None,
    captions: Sequence[str] | None = None,
    tile_size: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """A flat list of images in a near-square grid (``cols`` defaults to ``ceil(sqrt(n))``), optional captions."""
    if not images:
        raise ValueError("`images` is empty: a grid needs at least one image.")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"`captions` must have one entry per image ({len(images)}), got {len(captions)}.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    if cols < 1:
        raise ValueError(f"`cols` must be >= 1, got {cols}.")
    rows = [list(images[i:i + cols]) for i in range(0, len(images), cols)]
    caps = [list(captions[i:i + cols]) for i in range(0, len(captions), cols)] if captions is not None else None
    return image_grid(rows, captions=caps, tile_size=tile_size, pad=pad)
