"""Write a comparison's outputs: ``metrics.json``, ``metrics.md``, the bar chart, side-by-side grids, ``report.html``.

Every file is written atomically. The side-by-side grid of a prompt has one row per seed and one column per run
(base model first), so each row shows the same prompt and starting noise across runs.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from persam_dreambooth.evaluation.prompts import PromptSpec
from persam_dreambooth.evaluation.scoring import LOWER_IS_BETTER, METRIC_LABELS, METRICS
from persam_dreambooth.utils.grids import image_grid
from persam_dreambooth.utils.io import atomic_save_image, atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_reports", "metrics_markdown", "bar_chart_png", "side_by_side", "format_value"]

logger = logging.getLogger(__name__)

BASE_COLOR = "#9e9e9e"
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MIN_TILE = 128  # side-by-side tiles are at least this big, so labels stay readable for small images


def format_delta(delta: float) -> str:
    """``+0.240`` / ``-0.013``; differences that round to zero are ``±0.000`` (never ``-0.000``)."""
    return "±0.000" if abs(delta) < 0.0005 else f"{delta:+.3f}"


def format_value(value: float | None, base: float | None = None) -> str:
    """``0.652`` or, with a base value, ``0.652 (+0.240)``; ``n/a`` for missing values."""
    if value is None:
        return "n/a"
    if base is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({format_delta(value - base)})"


def prompt_set_label(prompt_set: str) -> str:
    """``live`` / ``object`` as is; a template file by its name."""
    return prompt_set if prompt_set in ("live", "object") else Path(prompt_set).name


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _arrow(metric: str) -> str:
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def _table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], base: Mapping[str, Any] | None, first: str,
    no_delta: Sequence[str] = ("base", "real images"),
) -> list[str]:
    head = [first, *(f"{METRIC_LABELS[m]} {_arrow(m)}" for m in METRICS), "subject found"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, vals in rows:
        use_base = base if base is not None and label not in no_delta else None
        cells = [format_value(vals.get(m), None if use_base is None else use_base.get(m)) for m in METRICS]
        rate = vals.get("subject_found_rate")
        cells.append("n/a" if rate is None else f"{100 * rate:.0f}%")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """``metrics.md``: an overall table, one table per prompt group and one per run; deltas are against the base."""
    s = metrics["settings"]
    runs = metrics["runs"]
    base = runs["base"]
    lines = [
        f"# DreamBooth comparison: {s['identifier']} {s['class_noun']} ({prompt_set_label(s['prompt_set'])} prompts)",
        "",
        f"Base model `{s['pretrained_model_name_or_path']}`; {plural(len(base['prompts']), 'prompt')} x "
        f"{s['num_images_per_prompt']} images, seeds {s['seed']}..{s['seed'] + s['num_images_per_prompt'] - 1} "
        f"(identical for every run), {s['num_inference_steps']} steps, guidance {s['guidance_scale']}, "
        f"{s['width']}x{s['height']}.",
        f"Metric models: DINO `{metrics['models']['dino']}`, CLIP `{metrics['models']['clip']}`"
        + (f", SAM `{metrics['models']['sam']['model_type']}` (PerSAM)." if metrics["models"]["sam"] else "."),
        "Values in parentheses are the difference to the base model. ↑ higher is better, ↓ lower is better.",
        "",
        "## All prompts",
        "",
    ]
    real = metrics.get("real_images")
    overall = [(name, r["overall"]) for name, r in runs.items()]
    if real:
        overall.append(("real images", {**real, "subject_found_rate": None}))
    lines += _table(overall, base["overall"], "run")
    for group in base["groups"]:
        n = sum(1 for p in base["prompts"] if p["group"] == group)
        lines += ["", f"## {group} ({plural(n, 'prompt')})", ""]
        lines += _table([(name, r["groups"][group]) for name, r in runs.items()], base["groups"][group], "run")
    for name, r in runs.items():
        if name == "base":
            continue
        mask = f", mask_source: {r['mask_source']}" if r.get("mask_source") else ""
        lines += ["", f"## Run {name} (`{r['path']}`{mask})", ""]
        rows = [("all", r["overall"]), *((g, v) for g, v in r["groups"].items())]
        lines += _table(rows, None, "prompt group")
    flagged = {n: r.get("nsfw_flagged", 0) for n, r in runs.items() if r.get("nsfw_flagged")}
    if flagged:
        lines += ["", "**Safety checker**: " + ", ".join(f"{n}: {k} image(s) blacked out" for n, k in flagged.items())
                  + " (they count in the means)."]
    lines += ["", "## Definitions", ""]
    lines += [f"- **{METRIC_LABELS.get(k, k.replace('_', ' '))}**: {v}." for k, v in metrics["definitions"].items()]
    return "\n".join(lines) + "\n"


def _run_color(k: int, name: str) -> str:
    """The base model is grey; trained runs take :data:`RUN_COLORS` in order (``k`` = position among all runs)."""
    return BASE_COLOR if name == "base" else RUN_COLORS[(k - 1) % len(RUN_COLORS)]


def bar_chart_png(metrics: Mapping[str, Any]) -> bytes:
    """The overall metrics as PNG bytes: a grouped bar chart (one group per metric, one bar per run) above a second
    one with each trained run's difference to the base model, where masked-vs-vanilla differences are visible even
    when every run scores around 0.7."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = metrics["runs"]
    names = list(runs)
    trained = [n for n in names if n != "base"]
    shown = [m for m in METRICS if any(runs[n]["overall"].get(m) is not None for n in names)]
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
    # Differences to the base model, one bar per trained run.
    base = runs["base"]["overall"]
    dwidth = 0.8 / max(1, len(trained))
    deltas = []
    for k, name in enumerate(trained):
        vals = [None if runs[name]["overall"].get(m) is None or base.get(m) is None
                else runs[name]["overall"][m] - base[m] for m in shown]
        deltas += [v for v in vals if v is not None]
        xs = [i + (k - (len(trained) - 1) / 2) * dwidth for i in range(len(shown))]
        bars = dax.bar(xs, [v or 0.0 for v in vals], dwidth * 0.92, color=_run_color(names.index(name), name),
                       edgecolor="white")
        for bar, v in zip(bars, vals, strict=True):
            up = v is None or v >= 0
            dax.annotate("n/a" if v is None else format_delta(v), (bar.get_x() + bar.get_width() / 2, v or 0.0),
                         xytext=(0, 2 if up else -2), textcoords="offset points", ha="center",
                         va="bottom" if up else "top", **label)
    span = max([abs(v) for v in deltas] + [0.005]) * (1.9 if crowded else 1.35)
    dax.set_ylim(-span, span)  # symmetric, with room for the labels
    dax.axhline(0, color="#424242", linewidth=0.8)
    dax.set_ylabel("run − base")
    dax.set_title("Difference to the base model (background leakage: lower is better)", fontsize=10)
    dax.set_xticks(range(len(shown)))
    dax.set_xticklabels([f"{METRIC_LABELS[m]} {_arrow(m)}" for m in shown])
    for axis in (ax, dax):
        axis.spines[["top", "right"]].set_visible(False)
    legend_rows = math.ceil(len(names) / 5)
    fig.legend(*ax.get_legend_handles_labels(), ncols=math.ceil(len(names) / legend_rows), loc="lower center",
               frameon=False)
    fig.tight_layout(rect=(0, 0.045 * legend_rows, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


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


def write_reports(
    out: Path,
    metrics: dict[str, Any],
    prompts: Sequence[PromptSpec],
    run_configs: Mapping[str, Mapping[str, Any]],
    run_paths: Mapping[str, Path],
) -> dict[str, Path]:
    """Write every output file of a comparison into ``out``; return them by role."""
    from persam_dreambooth.evaluation.report_html import render_html

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
