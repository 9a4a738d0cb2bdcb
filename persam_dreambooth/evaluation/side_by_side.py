"""The side-by-side grid of one prompt: a row per seed, a column per run (base model first).

Each row shows the same prompt and starting noise across runs, so the eye compares what the weights changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from persam_dreambooth.utils.grids import image_grid

__all__ = ["MIN_TILE", "side_by_side"]

MIN_TILE = 128  # side-by-side tiles are at least this big, so labels stay readable for small images


def side_by_side(
    gen_root: Path, run_names: Sequence[str], records: Mapping[str, Sequence[Mapping[str, Any]]], prompt_index: int,
    tile_size: int | None = None,
) -> Image.Image:
    """One prompt's images: a row per seed, a column per run (labelled), from ``gen_root/<run>/<file>``."""
    per_run = {n: sorted((r for r in records[n] if r["prompt_index"] == prompt_index), key=lambda r: r["image_index"])
               for n in run_names}
    seeds = [r["seed"] for r in per_run[run_names[0]]]
    rows = []
    for k in range(len(seeds)):
        row = []
        for n in run_names:
            with Image.open(gen_root / n / per_run[n][k]["file"]) as im:
                row.append(im.convert("RGB"))
        rows.append(row)
    if tile_size is None:
        tile_size = max(MIN_TILE, max(max(im.size) for row in rows for im in row))
    return image_grid(rows, col_labels=list(run_names), row_labels=[f"seed {s}" for s in seeds],
                      tile_size=tile_size)
