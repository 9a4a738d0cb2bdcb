"""image_grid: layout, labels, and long column labels wrapped instead of all cut to the same prefix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from persam_dreambooth.utils.grids import _font, _wrap_text, image_grid, tile_grid


def _tile(value: int, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_layout_and_empty_cells():
    grid = image_grid([[_tile(10), _tile(20)], [_tile(30)]], tile_size=40, pad=4)
    assert grid.size == (2 * 40 + 3 * 4, 2 * 40 + 3 * 4)
    pixels = np.asarray(grid)
    assert (pixels[4 + 20, 4 + 20] == 10).all()  # row 0 col 0, image centred in its tile
    assert (pixels[48 + 20, 48 + 20] == 235).all()  # row 1 col 1: missing -> grey tile
    with pytest.raises(ValueError, match=r"`col_labels` must have 2 entries"):
        image_grid([[_tile(1), _tile(2)]], col_labels=["a"])


def test_long_column_labels_wrap_and_stay_distinguishable():
    font = _font(12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = ["masked_rank8_lr1e-4_persam_f", "masked_rank8_lr1e-4_persam"]
    wrapped = [_wrap_text(draw, n, font, 96, max_lines=3) for n in names]
    for name, lines in zip(names, wrapped, strict=True):
        assert len(lines) > 1 and all(draw.textlength(line, font=font) <= 96 for line in lines)
        assert "".join(lines) == name  # nothing lost: the two names still differ on the page
        assert lines[0].endswith(("_", "-"))  # broken after a separator, not inside a word
    assert _wrap_text(draw, "base", font, 96, max_lines=3) == ["base"]
    too_long = _wrap_text(draw, "x" * 200, font, 96, max_lines=3)
    assert len(too_long) == 3 and too_long[-1].endswith("…")
    short = image_grid([[_tile(1), _tile(2)]], col_labels=["base", "masked"], tile_size=96)
    long = image_grid([[_tile(1), _tile(2)]], col_labels=["base", names[0]], tile_size=96)
    assert long.height > short.height and long.width == short.width  # more label lines, same columns


def test_tile_grid_near_square_with_captions_under_each_tile():
    images = [_tile(v) for v in (10, 60, 110, 160, 210)]
    grid = tile_grid(images, captions=["a", "b", "c", "d", "e"], tile_size=40, pad=4)
    # 5 images -> 3 columns, 2 rows; each row is a 40-px tile plus a 12-px caption line (font 10)
    assert grid.size == (3 * 40 + 4 * 4, 2 * (40 + 12) + 3 * 4)
    pixels = np.asarray(grid)
    caption_band = pixels[4 + 40: 4 + 52, 4: 4 + 40]
    assert (caption_band < 128).any(), "caption text drawn under the first tile"
    assert (pixels[4 + 52 + 4 + 20, 4 + 20] == 160).all()  # image 3 starts the second row
    plain = tile_grid(images, tile_size=40, pad=4)
    assert plain.size == (3 * 40 + 4 * 4, 2 * 40 + 3 * 4)
    with pytest.raises(ValueError, match="`captions` must have one entry per image"):
        tile_grid(images, captions=["a"])
    with pytest.raises(ValueError, match="`images` is empty"):
        tile_grid([])
