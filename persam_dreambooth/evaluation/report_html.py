"""``report.html``: one self-contained page (every image embedded as a data URI) for a comparison.

Top to bottom: the bar chart, the metric tables (overall and per prompt group, deltas against the base model), each
followed by the paired differences with their 95% confidence intervals (text and a small interval plot per cell; bold
only where the interval excludes 0), how sure the differences are (interval widths, where more images would help),
the side-by-side grids (one per prompt: a row per seed, a column per run), the PerSAM reference and each run's
training masks, per-prompt numbers, each run's resolved config, and the metric definitions. A small script flags
images that fail to decode (``data-images-broken`` on ``<body>`` and a visible banner), a page wider than the window
(``data-page-overflow``) and interval plots that did not render (``data-ci-total`` / ``data-ci-drawn``); the browser
test reads them.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from persam_dreambooth.data.images import load_image, load_mask
from persam_dreambooth.evaluation.paired_stats import Difference
from persam_dreambooth.evaluation.prompts import PromptSpec
from persam_dreambooth.evaluation.report_format import (
    advice,
    difference_tables,
    format_bounds,
    format_delta,
    format_half_width,
    format_interval,
    format_value,
    metric_header,
    plural,
    prompt_set_label,
    shown_metrics,
)
from persam_dreambooth.evaluation.scoring import METRIC_LABELS
from persam_dreambooth.evaluation.side_by_side import side_by_side
from persam_dreambooth.utils.overlay import overlay_mask

__all__ = ["render_html", "data_uri"]

HTML_TILE = 160  # side of one image in the page's grids (the full-size grids are linked)

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212121;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 6px}h2{font-size:20px;margin:34px 0 10px;border-bottom:1px solid #e0e0e0;
padding-bottom:4px}h3{font-size:16px;margin:20px 0 8px}
.sub{color:#616161;margin:0 0 18px}.chart{width:100%;max-width:1100px;background:#fff;border:1px solid #e0e0e0}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #e0e0e0;padding:5px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;overflow-wrap:break-word;max-width:360px}
th{background:#f5f5f5;font-weight:600}th.run{white-space:normal;overflow-wrap:break-word;max-width:130px;
text-align:center;font-weight:500;font-size:13px}.tw{overflow-x:auto;max-width:100%}td.prompt{min-width:220px}
tr.base td{color:#616161;background:#fcfcfc}tr.real td{color:#616161;font-style:italic}
.delta{color:#757575;font-size:12px;margin-left:4px}td.diff{text-align:center;font-size:13px}
td.sig{font-weight:700}
td.sig.better{color:#1b5e20}td.sig.worse{color:#b71c1c}.verdict{display:block;font-size:11px;font-weight:400;
color:#616161}svg.ci{display:block;margin:2px auto 0}.tips li{margin:4px 0}
.grids{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0;background:#fff;border:1px solid #e0e0e0;padding:8px;max-width:100%}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:13px;color:#424242;margin-top:6px;
max-width:520px}.group{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;background:#e3f2fd;
color:#0d47a1;margin-right:6px}pre{background:#fff;border:1px solid #e0e0e0;padding:10px;overflow:auto;
font-size:12px;max-height:420px}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.masks img{max-width:100%;border:1px solid #e0e0e0}.note{color:#616161;font-size:13px}
#broken{display:none;background:#ffebee;color:#b71c1c;padding:8px 12px;border:1px solid #ef9a9a;margin:10px 0}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-broken', String(broken.length));
  // wider than the window means a sideways-scrolling page (wide tables scroll inside their own box instead)
  document.body.setAttribute('data-page-overflow', String(document.documentElement.scrollWidth > window.innerWidth));
  // every interval plot has a box on the page and a drawn range line
  var plots = Array.prototype.slice.call(document.querySelectorAll('svg.ci'));
  var drawn = plots.filter(function (svg) {
    var box = svg.getBoundingClientRect(), line = svg.querySelector('line.range');
    return box.width > 0 && box.height > 0 && line !== null && line.getBoundingClientRect().width > 0;
  });
  document.body.setAttribute('data-ci-total', String(plots.length));
  document.body.setAttribute('data-ci-drawn', String(drawn.length));
  if (broken.length) {
    var box = document.getElementById('broken');
    box.textContent = broken.length + ' image(s) failed to load.';
    box.style.display = 'block';
  }
});
"""


def data_uri(data: bytes | Image.Image, mime: str = "image/jpeg", quality: int = 85) -> str:
    """A ``data:`` URI of PNG/JPEG bytes, or of a PIL image (encoded as ``mime``)."""
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        if mime == "image/png":
            data.save(buf, format="PNG")
        else:
            data.convert("RGB").save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _name(run: str) -> str:
    """A run name, escaped, that may wrap after ``_ - . /`` (``masked_rank8_lr1e-4`` breaks at its parts, never
    in the middle of a word)."""
    return "<wbr>".join(_e(part) for part in re.split(r"(?<=[_\-./])", run))


def _table(rows: Sequence[tuple[str, Mapping[str, Any], str]], base: Mapping[str, Any] | None) -> str:
    """rows: (label, values, css class); trained runs show their delta to ``base`` (no bold: see the differences)."""
    shown = shown_metrics([vals for _, vals, _ in rows])
    head = "".join(f"<th>{_e(metric_header(m))}</th>" for m in shown)
    out = [f'<div class="tw"><table><thead><tr><th>run</th>{head}<th>subject found</th></tr></thead><tbody>']
    for label, vals, css in rows:
        cells = []
        for m in shown:
            v = vals.get(m)
            text = format_value(v)
            if base is not None and css == "" and v is not None and base.get(m) is not None:
                text += f'<span class="delta">({format_delta(v - base[m])})</span>'
            cells.append(f"<td>{text}</td>")
        rate = vals.get("subject_found_rate")
        cells.append(f"<td>{'n/a' if rate is None else f'{100 * rate:.0f}%'}</td>")
        out.append(f'<tr class="{css}"><td>{_name(label)}</td>{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


CI_WIDTH, CI_HEIGHT = 120, 14  # pixels of one interval plot


def _interval_svg(diff: Difference, scale: float) -> str:
    """A small forest plot: the interval as a line, the difference as a dot, 0 as a grey tick.

    ``scale`` is the largest absolute value on the table's common axis (so plots of one table compare)."""
    def x(v: float) -> float:
        return round(CI_WIDTH / 2 + v / scale * (CI_WIDTH / 2 - 4), 1)

    low = diff.low if diff.low is not None else diff.difference
    high = diff.high if diff.high is not None else diff.difference
    x1, x2 = x(low), x(high)
    if x2 - x1 < 2:  # a zero-width interval still shows as a short line
        x1, x2 = x1 - 1, x2 + 1
    color = {"better": "#2e7d32", "worse": "#c62828"}.get(diff.verdict, "#757575")
    mid = CI_HEIGHT / 2
    return (f'<svg class="ci" width="{CI_WIDTH}" height="{CI_HEIGHT}" viewBox="0 0 {CI_WIDTH} {CI_HEIGHT}" '
            f'role="img" aria-label="{_e(format_interval(diff))}">'
            f'<line x1="{x(0)}" y1="0" x2="{x(0)}" y2="{CI_HEIGHT}" stroke="#bdbdbd" stroke-width="1"/>'
            f'<line class="range" x1="{x1}" y1="{mid}" x2="{x2}" y2="{mid}" stroke="{color}" stroke-width="2"/>'
            f'<circle cx="{x(diff.difference)}" cy="{mid}" r="3" fill="{color}"/></svg>')


def _differences_table(comparisons: Sequence[Mapping[str, Any]], group: str | None) -> str:
    """Paired differences with intervals (text and plot); bold only where the interval excludes 0."""
    tables, shown = difference_tables(comparisons, group)
    if not shown:
        return ""
    ends = [abs(v) for _, diffs in tables for d in diffs.values() for v in (d.difference, d.low, d.high)
            if v is not None]
    scale = max([*ends, 0.005])
    head = "".join(f"<th>{_e(metric_header(m))}</th>" for m in shown)
    out = ['<p class="note">Paired differences with 95% confidence intervals:</p>',
           f'<div class="tw"><table class="differences"><thead><tr><th>difference</th>{head}</tr></thead><tbody>']
    for label, diffs in tables:
        cells = []
        for m in shown:
            diff = diffs.get(m)
            if diff is None:
                cells.append('<td class="diff">n/a</td>')
                continue
            css = f"diff sig {diff.verdict}" if diff.excludes_zero else "diff"
            # two lines (difference, then interval) keep six metric columns inside the page
            cells.append(f'<td class="{css}">{format_delta(diff.difference)}<br>{format_bounds(diff)}'
                         f'<span class="verdict">{_e(diff.verdict)}</span>{_interval_svg(diff, scale)}</td>')
        out.append(f"<tr><td>{_name(label)}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _how_sure(metrics: Mapping[str, Any]) -> str:
    comparisons = metrics.get("comparisons")
    if not comparisons:
        return ""
    stats = metrics["statistics"]
    tables, shown = difference_tables(comparisons)
    head = "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in shown)
    rows = "".join(f"<tr><td>{_name(label)}</td>"
                   + "".join(f"<td>{format_half_width(diffs.get(m))}</td>" for m in shown) + "</tr>"
                   for label, diffs in tables)
    parts = [
        "<h2>How sure are these differences?</h2>",
        f'<p class="note">Each difference is the mean over paired images (same prompt, same seed). Its interval is a '
        f"{100 * stats['confidence']:.0f}% confidence interval from a paired bootstrap: {stats['resamples']} "
        "resamples of the prompts and, within each prompt, its seeds (bootstrap seed "
        f"{stats['seed']}). Bold: the interval excludes 0, so the verdict is “better” or “worse”; otherwise “no "
        "clear difference”. Interval widths (± half the width, all prompts):</p>",
        f'<div class="tw"><table class="widths"><thead><tr><th>difference</th>{head}</tr></thead><tbody>{rows}'
        "</tbody></table></div>",
    ]
    tips = advice(metrics)
    if tips:
        parts.append('<ul class="tips">' + "".join(f"<li>{_e(t)}</li>" for t in tips) + "</ul>")
    return "".join(parts)


def _reference_figure(reference: Mapping[str, str]) -> str:
    image = load_image(reference["image"], "reference image")
    mask = load_mask(reference["mask"], "reference mask")
    thumb = Image.fromarray(overlay_mask(image, mask))
    scale = 320 / max(thumb.size)  # small images are enlarged too, so the mask stays visible
    thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                         Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
    return (f'<figure><img alt="PerSAM reference" src="{data_uri(thumb)}"><figcaption>PerSAM reference: '
            f"{_e(Path(reference['image']).name)} with mask {_e(Path(reference['mask']).name)} (red)"
            "</figcaption></figure>")


def render_html(
    out: Path,
    metrics: Mapping[str, Any],
    prompts: Sequence[PromptSpec],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    run_configs: Mapping[str, Mapping[str, Any]],
    run_paths: Mapping[str, Path],
    chart_png: bytes,
    grid_paths: Sequence[Path],
) -> str:
    """The whole page as a string (see the module docstring)."""
    s, runs = metrics["settings"], metrics["runs"]
    base = runs["base"]
    names = list(runs)
    title = f"DreamBooth comparison: {s['identifier']} {s['class_noun']}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Runs {", ".join(_e(n) for n in names)} · base model <code>'
        f"{_e(s['pretrained_model_name_or_path'])}</code> · {_e(prompt_set_label(s['prompt_set']))} prompt set "
        f"({plural(len(prompts), 'prompt')}) × "
        f"{s['num_images_per_prompt']} seeds · {s['num_inference_steps']} steps · guidance {s['guidance_scale']} · "
        f"{s['width']}×{s['height']} · DINO <code>{_e(metrics['models']['dino'])}</code>, CLIP <code>"
        f"{_e(metrics['models']['clip'])}</code></p>",
        '<div id="broken"></div>',
        f'<img class="chart" alt="bar chart of the metrics" src="{data_uri(chart_png, "image/png")}">',
        "<h2>Metrics</h2>",
        '<p class="note">Mean over all prompts and seeds; in parentheses, the difference to the base model (the '
        "floor). Below each table: the paired differences with their 95% confidence intervals, bold only where the "
        "interval excludes 0. Background leakage: lower is better.</p>",
    ]
    overall = [(n, runs[n]["overall"], "base" if n == "base" else "") for n in names]
    if metrics.get("real_images"):
        overall.append(("real images", {**metrics["real_images"], "subject_found_rate": None}, "real"))
    comparisons = metrics.get("comparisons", [])
    parts.append(_table(overall, base["overall"]))
    parts.append(_differences_table(comparisons, None))
    for group in base["groups"]:
        n_prompts = sum(1 for p in prompts if p.group == group)
        parts.append(f"<h3>{_e(group)} ({plural(n_prompts, 'prompt')})</h3>")
        parts.append(_table([(n, runs[n]["groups"][group], "base" if n == "base" else "") for n in names],
                            base["groups"][group]))
        parts.append(_differences_table(comparisons, group))
    parts.append(_how_sure(metrics))
    parts.append("<h2>Side by side</h2><p class=\"note\">Same prompt and seed in each row; columns are the runs. "
                 "Click a grid for full size.</p><div class=\"grids\">")
    for spec, path in zip(prompts, grid_paths, strict=True):
        small = side_by_side(out / "generations", names, records, spec.index, tile_size=HTML_TILE)
        rel = path.relative_to(out).as_posix()
        parts.append(
            f'<figure><a href="{_e(rel)}"><img alt="{_e(spec.prompt)}" src="{data_uri(small)}"></a><figcaption>'
            f'<span class="group">{_e(spec.group)}</span>p{spec.index:03d}: {_e(spec.prompt)}</figcaption></figure>'
        )
    parts.append("</div>")
    parts.append("<h2>Masks</h2>")
    if metrics.get("reference"):
        parts.append(f'<div class="grids">{_reference_figure(metrics["reference"])}</div>')
        parts.append(f'<p class="note">Instance masks for the metrics: {_e(metrics.get("instance_masks"))}</p>')
    for name, path in run_paths.items():
        grid = path / "masks" / "masks_grid.jpg"
        parts.append(f"<h3>Training masks of {_e(name)}</h3>")
        if grid.is_file():
            parts.append(f'<div class="masks"><img alt="training masks of {_e(name)}" '
                         f'src="{data_uri(grid.read_bytes())}"></div>')
        else:
            source = run_configs.get(name, {}).get("mask_source")
            parts.append(f'<p class="note">No masks/masks_grid.jpg in this run (mask_source: {_e(source)}).</p>')
    shown = [m for m in ("dino", "clip_t", "background_leakage", "background_clip_t")
             if any(runs[n]["overall"].get(m) is not None for n in names)]
    parts.append(f"<h2>Per prompt</h2><details><summary>{' / '.join(METRIC_LABELS[m] for m in shown)} per prompt"
                 "</summary>")
    parts.append(_per_prompt_table(metrics, names, shown))
    parts.append("</details><h2>Run configs</h2>")
    for name in names:
        if name == "base":
            continue
        text = yaml.safe_dump(dict(run_configs.get(name) or {}), sort_keys=False, allow_unicode=True) or "{}"
        parts.append(f"<details><summary>{_e(name)}: {_e(run_paths[name])}/config.resolved.yaml</summary>"
                     f"<pre>{_e(text)}</pre></details>")
    parts.append("<h2>Definitions</h2><ul>")
    parts += [f"<li><b>{_e(METRIC_LABELS.get(k, k.replace('_', ' ')))}</b>: {_e(v)}.</li>"
              for k, v in metrics["definitions"].items()]
    parts.append(f"</ul></main><script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _per_prompt_table(metrics: Mapping[str, Any], names: Sequence[str], shown: Sequence[str]) -> str:
    """Prompts as rows; a column group per metric in ``shown`` with one column per run (long run names wrap)."""
    top = "".join(f'<th colspan="{len(names)}" style="text-align:center">{_e(metric_header(m))}</th>'
                  for m in shown)
    sub = "".join(f'<th class="run">{_name(n)}</th>' for _ in shown for n in names)
    rows = [f'<div class="tw"><table><thead><tr><th rowspan="2">prompt</th>{top}</tr><tr>{sub}</tr></thead><tbody>']
    base_prompts = metrics["runs"]["base"]["prompts"]
    for k, p in enumerate(base_prompts):
        cells = "".join(f"<td>{format_value(metrics['runs'][n]['prompts'][k].get(m))}</td>"
                        for m in shown for n in names)
        rows.append(f"<tr><td class=\"prompt\">p{p['index']:03d} {_e(p['prompt'])}</td>{cells}</tr>")
    rows.append("</tbody></table></div>")
    return "".join(rows)
