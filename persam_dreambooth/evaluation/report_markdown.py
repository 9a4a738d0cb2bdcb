"""``metrics.md``: the comparison as GitHub-renderable tables, built from ``metrics.json`` alone.

Per section (all prompts, then each prompt group): the values of every run with the difference to the base model in
parentheses, then the paired differences with their 95% confidence intervals (``+0.012 [+0.004, +0.020]``, bold when
the interval excludes 0, with the verdict). Then how sure the differences are (interval widths, and where more images
would help), one table per run, and the definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persam_dreambooth.evaluation.report_format import (
    advice,
    difference_tables,
    format_half_width,
    format_interval,
    format_value,
    metric_header,
    plural,
    prompt_set_label,
    shown_metrics,
)
from persam_dreambooth.evaluation.scoring import METRIC_LABELS

__all__ = ["metrics_markdown"]


def _table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], base: Mapping[str, Any] | None, first: str,
    no_delta: Sequence[str] = ("base", "real images"),
) -> list[str]:
    shown = shown_metrics([vals for _, vals in rows])
    head = [first, *(metric_header(m) for m in shown), "subject found"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, vals in rows:
        use_base = base if base is not None and label not in no_delta else None
        cells = [format_value(vals.get(m), None if use_base is None else use_base.get(m)) for m in shown]
        rate = vals.get("subject_found_rate")
        cells.append("n/a" if rate is None else f"{100 * rate:.0f}%")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def _differences_table(comparisons: Sequence[Mapping[str, Any]], group: str | None) -> list[str]:
    """Paired differences with intervals; bold only where the interval excludes 0."""
    tables, shown = difference_tables(comparisons, group)
    if not shown:
        return []
    lines = ["", "Paired differences, 95% confidence intervals:", "",
             "| difference | " + " | ".join(metric_header(m) for m in shown) + " |", "|" + "---|" * (len(shown) + 1)]
    for label, diffs in tables:
        cells = []
        for m in shown:
            diff = diffs.get(m)
            if diff is None:
                cells.append("n/a")
                continue
            text = format_interval(diff)
            cells.append(f"**{text}** {diff.verdict}" if diff.excludes_zero else f"{text} {diff.verdict}")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def _how_sure(metrics: Mapping[str, Any]) -> list[str]:
    comparisons = metrics.get("comparisons")
    if not comparisons:
        return []
    stats = metrics["statistics"]
    lines = [
        "", "## How sure are these differences?", "",
        "Each difference is the mean over paired images (same prompt, same seed). Its interval is a "
        f"{100 * stats['confidence']:.0f}% confidence interval from a paired bootstrap: {stats['resamples']} "
        f"resamples of the prompts and, within each prompt, its seeds (bootstrap seed {stats['seed']}). "
        "**Bold**: the interval excludes 0, so the verdict is \"better\" or \"worse\"; otherwise \"no clear "
        "difference\".", "",
        "Interval widths (± half the width, all prompts):", "",
    ]
    tables, shown = difference_tables(comparisons)
    lines += ["| difference | " + " | ".join(METRIC_LABELS[m] for m in shown) + " |",
              "|" + "---|" * (len(shown) + 1)]
    lines += ["| " + " | ".join([label, *(format_half_width(diffs.get(m)) for m in shown)]) + " |"
              for label, diffs in tables]
    tips = advice(metrics)
    if tips:
        lines += ["", *(f"- {t}" for t in tips)]
    return lines


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """``metrics.md``: an overall table, one table per prompt group and one per run; deltas are against the base,
    and the paired differences come with their confidence intervals."""
    s = metrics["settings"]
    runs = metrics["runs"]
    base = runs["base"]
    comparisons = metrics.get("comparisons", [])
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
    lines += _differences_table(comparisons, None)
    for group in base["groups"]:
        n = sum(1 for p in base["prompts"] if p["group"] == group)
        lines += ["", f"## {group} ({plural(n, 'prompt')})", ""]
        lines += _table([(name, r["groups"][group]) for name, r in runs.items()], base["groups"][group], "run")
        lines += _differences_table(comparisons, group)
    lines += _how_sure(metrics)
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
