"""Write a comparison's outputs: ``metrics.json``, ``metrics.md``, the bar chart, side-by-side grids, ``report.html``.

Every file is written atomically. What each file shows is decided in its own module:
:mod:`~persam_dreambooth.evaluation.report_markdown`, :mod:`~persam_dreambooth.evaluation.report_chart`,
:mod:`~persam_dreambooth.evaluation.side_by_side` and :mod:`~persam_dreambooth.evaluation.report_html`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persam_dreambooth.evaluation.prompts import PromptSpec
from persam_dreambooth.evaluation.report_chart import bar_chart_png
from persam_dreambooth.evaluation.report_html import render_html
from persam_dreambooth.evaluation.report_markdown import metrics_markdown
from persam_dreambooth.evaluation.side_by_side import side_by_side
from persam_dreambooth.utils.io import atomic_save_image, atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_reports"]

logger = logging.getLogger(__name__)


def write_reports(
    out: Path,
    metrics: dict[str, Any],
    prompts: Sequence[PromptSpec],
    run_configs: Mapping[str, Mapping[str, Any]],
    run_paths: Mapping[str, Path],
) -> dict[str, Path]:
    """Write every output file of a comparison into ``out``; return them by role."""
    run_names = list(metrics["runs"])
    records = {n: metrics["runs"][n]["images"] for n in run_names}
    files: dict[str, Path] = {}
    files["metrics_json"] = out / "metrics.json"
    atomic_write_json(files["metrics_json"], metrics)
    files["metrics_md"] = out / "metrics.md"
    atomic_write_text(files["metrics_md"], metrics_markdown(metrics))
    chart = bar_chart_png(metrics)
    files["chart"] = out / "metrics.png"
    with atomic_write(files["chart"], "wb") as handle:
        handle.write(chart)
    grids = []
    for spec in prompts:
        grid = side_by_side(out / "generations", run_names, records, spec.index)
        path = out / "grids" / f"p{spec.index:03d}.jpg"
        atomic_save_image(grid, path, quality=90)
        grids.append(path)
        files[f"grid_p{spec.index:03d}"] = path
    files["html"] = out / "report.html"
    html = render_html(out, metrics, prompts, records, run_configs, run_paths, chart, grids)
    atomic_write_text(files["html"], html)
    logger.info("Report written to %s", files["html"])
    return files
