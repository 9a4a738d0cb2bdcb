"""A look at the run's masks before any GPU time is spent: a per-photo table and warnings for implausible masks.

Each mask of ``OUT/masks/`` (its ``masks.json`` record) is judged by these thresholds:

* coverage (the mask's share of the photo) below :data:`MIN_COVERAGE` (0.02): the subject was hardly found, or a
  speck was segmented; above :data:`MAX_COVERAGE` (0.95): the mask is (nearly) the whole photo, i.e. background;
* SAM's predicted IoU (``score``, PerSAM masks only) below :data:`MIN_SCORE` (0.5): SAM itself doubts the mask.

The table ``OUT/masks_table.csv`` lists, per photo: the score, the coverage, the subject-presence confidence (the
peak of PerSAM's location confidence, the cosine similarity of the reference's feature with the photo's best
location, when the mask set records it) and the problems found. The photos of implausible masks are named in a
warning. When more than half of the masks the trainer made (PerSAM) are implausible, training stops (``ValueError``)
unless ``accept_masks``. Masks given with ``mask_dir`` are the user's own decision (an all-ones mask is a deliberate
vanilla control): they are judged and warned about, on their coverage only (they have no score), but never stop the
run; so an edited mask is checked again when it comes back through ``mask_dir``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from persam_dreambooth.masks.store import MaskSet
from persam_dreambooth.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["MIN_COVERAGE", "MAX_COVERAGE", "MIN_SCORE", "TABLE_NAME", "MaskRow", "review_masks"]

MIN_COVERAGE = 0.02
MAX_COVERAGE = 0.95
MIN_SCORE = 0.5
TABLE_NAME = "masks_table.csv"


@dataclass(frozen=True)
class MaskRow:
    """One photo's mask: ``score`` (None for ``mask_dir`` masks), ``coverage`` in [0, 1], ``presence`` (None when not
    recorded) and the ``problems`` found (empty = plausible)."""

    photo: str
    score: float | None
    coverage: float
    presence: float | None
    problems: tuple[str, ...]


def _problems(score: float | None, coverage: float) -> tuple[str, ...]:
    found = []
    if coverage < MIN_COVERAGE:
        found.append(f"coverage {coverage:.3f} < {MIN_COVERAGE}")
    if coverage > MAX_COVERAGE:
        found.append(f"coverage {coverage:.3f} > {MAX_COVERAGE}")
    if score is not None and score < MIN_SCORE:
        found.append(f"score {score:.3f} < {MIN_SCORE}")
    return tuple(found)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def mask_rows(mask_folder: Path, images: Sequence[Path]) -> list[MaskRow]:
    """The rows of the photos ``images`` from ``mask_folder/masks.json`` (the coverage is measured when missing)."""
    mask_set = MaskSet.read(mask_folder)
    entries = mask_set.record.get("images") or {}
    rows = []
    for image in images:
        entry = entries.get(image.stem) or {}
        coverage = _number(entry.get("coverage"))
        if coverage is None:
            coverage = float(mask_set.load_for(image).mean())
        score = _number(entry.get("score")) if mask_set.record.get("source") != "dir" else None
        presence = _number(entry.get("presence"))
        rows.append(MaskRow(image.name, score, coverage, presence, _problems(score, coverage)))
    return rows


def _table(rows: Sequence[MaskRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["photo", "score", "coverage", "presence", "problems"])
    for row in rows:
        writer.writerow([row.photo, "" if row.score is None else f"{row.score:.4f}", f"{row.coverage:.4f}",
                         "" if row.presence is None else f"{row.presence:.4f}", "; ".join(row.problems)])
    return out.getvalue()


def review_masks(output_dir: Path, images: Sequence[Path], *, accept: bool, can_stop: bool = True,
                 write: bool = True) -> list[MaskRow]:
    """Judge the masks in ``output_dir/masks``; write ``output_dir/masks_table.csv`` and warn (when ``write``).

    Every process may call it (it only reads); only the one with ``write`` writes the table and logs.
    ``can_stop``: whether most masks being implausible stops the run (True for masks the trainer made).

    Raises:
        ValueError: ``can_stop``, more than half of the masks are implausible and ``accept`` is False (naming
            ``--accept_masks``).
    """
    rows = mask_rows(output_dir / "masks", images)
    bad = [row for row in rows if row.problems]
    if write:
        atomic_write_text(output_dir / TABLE_NAME, _table(rows))
        logger.info("Mask table: %s (%d photos, %d implausible)", output_dir / TABLE_NAME, len(rows), len(bad))
        if bad:
            logger.warning(
                "Implausible masks (thresholds: coverage %s..%s, SAM score >= %s): %s. Look at %s; to fix one, edit "
                "its PNG and rerun with `--mask_dir` (docs/training.md, 'Checking the masks').",
                MIN_COVERAGE, MAX_COVERAGE, MIN_SCORE,
                "; ".join(f"{row.photo} ({', '.join(row.problems)})" for row in bad),
                output_dir / "masks" / "masks_grid.jpg",
            )
    if can_stop and 2 * len(bad) > len(rows) and not accept:
        raise ValueError(
            f"{len(bad)} of {len(rows)} masks look implausible ({', '.join(row.photo for row in bad)}; see "
            f"{output_dir / TABLE_NAME} and {output_dir / 'masks' / 'masks_grid.jpg'}): fix them and rerun with "
            "`--mask_dir`, or pass `--accept_masks` to train with them anyway."
        )
    return rows
