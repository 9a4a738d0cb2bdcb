"""How numbers and names are written in every comparison output (``metrics.md``, ``report.html``, the chart).

Shared by :mod:`~persam_dreambooth.evaluation.report_markdown`, :mod:`~persam_dreambooth.evaluation.report_html` and
:mod:`~persam_dreambooth.evaluation.report_chart`, so the three say the same thing the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persam_dreambooth.evaluation.compare_config import compare_flag
from persam_dreambooth.evaluation.paired_stats import WIDE_HALF_WIDTH, Difference
from persam_dreambooth.evaluation.scoring import LOWER_IS_BETTER, METRIC_LABELS, METRICS

__all__ = [
    "format_delta", "format_value", "format_interval", "format_bounds", "format_half_width", "prompt_set_label",
    "plural", "arrow", "metric_header", "shown_metrics", "comparison_label", "differences", "difference_tables",
    "advice",
]


def format_delta(delta: float) -> str:
    """``+0.240`` / ``-0.013``; differences that round to zero are ``±0.000`` (never ``-0.000``)."""
    return "±0.000" if abs(delta) < 0.0005 else f"{delta:+.3f}"


def _bound(value: float) -> str:
    """An interval end with its true sign (``-0.000`` for -0.0002, so ``[-0.001, -0.000]`` visibly excludes 0)."""
    return "+0.000" if value == 0 else f"{value:+.3f}"


def format_value(value: float | None, base: float | None = None) -> str:
    """``0.652`` or, with a base value, ``0.652 (+0.240)``; ``n/a`` for missing values."""
    if value is None:
        return "n/a"
    if base is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({format_delta(value - base)})"


def format_interval(diff: Difference | None) -> str:
    """``+0.012 [+0.004, +0.020]``: the paired difference and its confidence interval; ``n/a`` without a pair."""
    if diff is None:
        return "n/a"
    return f"{format_delta(diff.difference)} {format_bounds(diff)}"


def format_bounds(diff: Difference) -> str:
    """``[+0.004, +0.020]``, or ``[too few images]`` without an interval."""
    if diff.low is None or diff.high is None:
        return "[too few images]"
    return f"[{_bound(diff.low)}, {_bound(diff.high)}]"


def format_half_width(diff: Difference | None) -> str:
    """``±0.008``: half the interval's width; ``n/a`` without an interval."""
    if diff is None or diff.half_width is None:
        return "n/a"
    return f"±{diff.half_width:.3f}"


def prompt_set_label(prompt_set: str) -> str:
    """``live`` / ``object`` as is; a template file by its name."""
    return prompt_set if prompt_set in ("live", "object") else Path(prompt_set).name


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def arrow(metric: str) -> str:
    """``↓`` for metrics where lower is better, else ``↑``."""
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def metric_header(metric: str) -> str:
    return f"{METRIC_LABELS[metric]} {arrow(metric)}"


def shown_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics with a value in at least one of ``rows`` (a metric nobody computed gets no column)."""
    return [m for m in METRICS if any(r.get(m) is not None for r in rows)]


def comparison_label(comparison: Mapping[str, Any]) -> str:
    """``masked − base``: the run minus the run it is compared against."""
    return f"{comparison['run']} − {comparison['against']}"


def differences(comparison: Mapping[str, Any], group: str | None = None) -> dict[str, Difference]:
    """A comparison's :class:`Difference` per metric, overall (``group=None``) or for one prompt group."""
    table = comparison["overall"] if group is None else comparison["groups"].get(group, {})
    return {m: Difference.from_dict(v) for m, v in table.items()}


def difference_tables(
    comparisons: Sequence[Mapping[str, Any]], group: str | None = None,
) -> tuple[list[tuple[str, dict[str, Difference]]], list[str]]:
    """Each comparison's :func:`comparison_label` and :func:`differences` (overall or for one prompt group), and
    the metrics at least one of them has (the columns of a differences table)."""
    tables = [(comparison_label(c), differences(c, group)) for c in comparisons]
    shown = shown_metrics([{m: d.difference for m, d in diffs.items()} for _, diffs in tables])
    return tables, shown


def advice(metrics: Mapping[str, Any]) -> list[str]:
    """One sentence per overall difference that is "no clear difference" with a wide interval: how many more images
    would narrow it to :data:`~persam_dreambooth.evaluation.paired_stats.WIDE_HALF_WIDTH`, and where to add them.

    The interval narrows with the square root of the number of images: ``k`` times the images for a ``sqrt(k)``
    narrower interval. When the prompts disagree more than the seeds of a prompt, more prompts help most; otherwise
    more images per prompt.
    """
    s = metrics["settings"]
    out = []
    for comp in metrics.get("comparisons", []):
        for m, diff in differences(comp).items():
            half = diff.half_width
            if diff.verdict != "no clear difference" or half is None or half <= WIDE_HALF_WIDTH:
                continue
            factor = math.ceil((half / WIDE_HALF_WIDTH) ** 2)
            if diff.spread == "seeds":
                where = (f"the seeds of a prompt disagree most: try `{compare_flag('num_images_per_prompt')} "
                         f"{s['num_images_per_prompt'] * factor}`")
            elif diff.spread == "prompts":
                where = f"the prompts disagree most: use about {factor}× as many prompts (a template file)"
            else:
                where = f"add prompts or `{compare_flag('num_images_per_prompt')}`"
            out.append(
                f"{comparison_label(comp)}, {METRIC_LABELS[m]}: no clear difference, and the interval is wide "
                f"({format_half_width(diff)}). About {factor}× as many images would narrow it to "
                f"±{WIDE_HALF_WIDTH:.3f}; {where}."
            )
    return out
