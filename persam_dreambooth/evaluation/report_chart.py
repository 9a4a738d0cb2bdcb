"""``metrics.png``: the overall metrics of every run, and the paired differences with their 95% intervals.

Two bar charts, one above the other, sharing the metric axis:

* top: each run's overall value per metric (base model grey and hatched);
* bottom: each trained run minus the base model and, with exactly two trained runs, the first minus the second
  (masked − vanilla), with the bootstrap confidence interval as an error bar. A difference of 0.01 is visible here
  even when every run scores about 0.7 above.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping
from typing import Any

from persam_dreambooth.evaluation.paired_stats import Difference
from persam_dreambooth.evaluation.report_format import (
    comparison_label,
    differences,
    format_delta,
    metric_header,
    shown_metrics,
)
from persam_dreambooth.evaluation.scoring import METRICS

__all__ = ["BASE_COLOR", "RUN_COLORS", "PAIR_COLOR", "bar_chart_png", "chart_figure"]

BASE_COLOR = "#9e9e9e"
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
PAIR_COLOR = "#455a64"  # trained run − trained run


def _run_color(k: int, name: str) -> str:
    """The base model is grey; trained runs take :data:`RUN_COLORS` in order (``k`` = position among all runs)."""
    return BASE_COLOR if name == "base" else RUN_COLORS[(k - 1) % len(RUN_COLORS)]


def _chart_differences(metrics: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Difference]]]:
    """``(label, colour, {metric: Difference})`` for the lower chart. Without recorded comparisons (a metrics.json
    from before the intervals), each run minus the base, without intervals."""
    runs = metrics["runs"]
    names = list(runs)
    trained = [n for n in names if n != "base"]
    out = []
    comparisons = metrics.get("comparisons")
    if comparisons is None:
        base = runs["base"]["overall"]
        for name in trained:
            run = runs[name]["overall"]
            diffs = {m: Difference(run[m] - base[m], None, None, "no clear difference", 0, 0)
                     for m in METRICS if run.get(m) is not None and base.get(m) is not None}
            out.append((f"{name} − base", _run_color(names.index(name), name), diffs))
        return out
    for comp in comparisons:
        if comp["against"] == "base":
            out.append((comparison_label(comp), _run_color(names.index(comp["run"]), comp["run"]), differences(comp)))
        elif len(trained) == 2:
            out.append((comparison_label(comp), PAIR_COLOR, differences(comp)))
    return out


def chart_figure(metrics: Mapping[str, Any]) -> Any:
    """The matplotlib figure of :func:`bar_chart_png` (1100 × 640 px); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = metrics["runs"]
    names = list(runs)
    shown = shown_metrics([runs[n]["overall"] for n in names])
    fig, (ax, dax) = plt.subplots(2, 1, figsize=(11, 6.4), dpi=100, height_ratios=(3, 2), sharex=True)
    width = 0.8 / len(names)
    # Value labels: upright while they fit beside each other, vertical once the bars get narrow (4+ runs).
    crowded = len(names) > 3
    label = {"fontsize": 7 if crowded else 8, "rotation": 90 if crowded else 0}
    for k, name in enumerate(names):
        vals = [runs[name]["overall"].get(m) for m in shown]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(shown))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width * 0.92, label=name, color=_run_color(k, name),
                      hatch="//" if name == "base" else None, edgecolor="white" if name != "base" else "#616161")
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate("n/a" if v is None else f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", **label)
    values = [runs[n]["overall"].get(m) or 0.0 for n in names for m in shown]
    ax.set_ylim(min(0.0, *values), max([*values, 0.1]) * (1.3 if crowded else 1.15))
    ax.axhline(0, color="#424242", linewidth=0.6)
    ax.set_ylabel("cosine similarity")
    ax.set_title("Overall metrics (mean over all prompts and seeds)")

    # Paired differences with their confidence intervals.
    series = _chart_differences(metrics)
    dwidth = 0.8 / max(1, len(series))
    extent = [0.005]
    dlabel = {**label, "fontsize": 7 if len(series) > 3 else 8}
    for k, (text, color, diffs) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * dwidth for i in range(len(shown))]
        vals = [diffs[m].difference if m in diffs else None for m in shown]
        low = [diffs[m].low if m in diffs else None for m in shown]
        high = [diffs[m].high if m in diffs else None for m in shown]
        bars = dax.bar(xs, [v or 0.0 for v in vals], dwidth * 0.92, color=color, edgecolor="white", label=text,
                       hatch="xx" if color == PAIR_COLOR else None)
        with_ci = [i for i, (v, lo, hi) in enumerate(zip(vals, low, high, strict=True))
                   if v is not None and lo is not None and hi is not None]
        if with_ci:
            dax.errorbar([xs[i] for i in with_ci], [vals[i] for i in with_ci],
                         yerr=[[vals[i] - low[i] for i in with_ci], [high[i] - vals[i] for i in with_ci]],
                         fmt="none", ecolor="#212121", elinewidth=1.2, capsize=3, zorder=3)
        for i, (bar, v) in enumerate(zip(bars, vals, strict=True)):
            if v is None:
                dax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 2),
                             textcoords="offset points", ha="center", va="bottom", **dlabel)
                continue
            top = high[i] if v >= 0 and high[i] is not None else v
            bottom = low[i] if v < 0 and low[i] is not None else v
            up = v >= 0
            dax.annotate(format_delta(v), (bar.get_x() + bar.get_width() / 2, top if up else bottom),
                         xytext=(0, 2 if up else -2), textcoords="offset points", ha="center",
                         va="bottom" if up else "top", **dlabel)
            extent += [abs(x) for x in (v, low[i], high[i]) if x is not None]
    span = max(extent) * (1.9 if crowded else 1.45)
    dax.set_ylim(-span, span)  # symmetric, with room for the labels
    dax.axhline(0, color="#424242", linewidth=0.8)
    dax.set_ylabel("difference")
    dax.set_title("Paired differences with 95% confidence intervals (background leakage: lower is better)",
                  fontsize=10)
    if series:
        dax.legend(loc="upper left", fontsize=7, frameon=False, ncols=min(len(series), 4))
    dax.set_xticks(range(len(shown)))
    dax.set_xticklabels([textwrap.fill(metric_header(m), 16) for m in shown])  # long names on two lines
    for axis in (ax, dax):
        axis.spines[["top", "right"]].set_visible(False)
    legend_rows = math.ceil(len(names) / 5)
    fig.legend(*ax.get_legend_handles_labels(), ncols=math.ceil(len(names) / legend_rows), loc="lower center",
               frameon=False)
    fig.tight_layout(rect=(0, 0.045 * legend_rows, 1, 1))
    return fig


def bar_chart_png(metrics: Mapping[str, Any]) -> bytes:
    """:func:`chart_figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = chart_figure(metrics)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
