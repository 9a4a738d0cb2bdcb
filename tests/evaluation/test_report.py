"""metrics.md, the bar chart and report.html: content, and every image the page references decodes."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.evaluation.report_chart import bar_chart_png
from persam_dreambooth.evaluation.report_format import format_value
from persam_dreambooth.evaluation.report_markdown import metrics_markdown


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.headings, self.text = [], [], [], []
        self._in_heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag in ("h1", "h2", "h3"):
            self._in_heading = tag
            self.headings.append([tag, ""])

    def handle_endtag(self, tag):
        if tag == self._in_heading:
            self._in_heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in_heading:
            self.headings[-1][1] += data


def _decode(src: str, root: Path) -> Image.Image:
    if src.startswith("data:"):
        header, payload = src.split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
        im = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    else:
        im = Image.open(root / src)
    im.load()
    return im


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return tiny.tiny_compare_report(tmp_path_factory.getbasetemp() / "shared-compare")


def test_html_parses_and_every_image_decodes(report):
    page = _Collector()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    page.close()
    # chart + 3 side-by-side grids + PerSAM reference + the masked run's training masks
    assert len(page.imgs) == 6
    for img in page.imgs:
        im = _decode(img["src"], report)
        assert im.width > 0 and im.height > 0 and img.get("alt")
    assert page.imgs[0]["alt"] == "bar chart of the metrics"  # the chart comes first
    assert _decode(page.imgs[0]["src"], report).size == (1100, 640)  # absolute values above, deltas below
    for href in page.links:  # full-size grids, relative to the report
        assert not href.startswith(("http:", "https:", "/")), href
        _decode(href, report)
    titles = [t for _, t in page.headings]
    assert titles[:3] == ["DreamBooth comparison: sks dog", "Metrics", "recontextualization (2 prompts)"]
    assert {"Side by side", "Masks", "Training masks of masked", "Training masks of vanilla", "Run configs",
            "Definitions"} <= set(titles)
    text = " ".join(page.text)
    assert "mask_source: persam" in text and "mask_source: none" in text  # each run's resolved config
    assert "No masks/masks_grid.jpg in this run (mask_source: none)" in text
    assert "p000: a sks dog on the beach" in text


def test_html_is_self_contained(report):
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html


def _metrics(**base_over):
    overall = {"dino": 0.5, "clip_i": 0.7, "clip_t": 0.25, "masked_dino": 0.6, "background_leakage": 0.4,
               "subject_found_rate": 1.0}
    run = lambda **o: {"overall": {**overall, **o}, "groups": {"property": {**overall, **o}},  # noqa: E731
                       "prompts": [{"index": 0, "prompt": "a red sks dog", "group": "property"}], "path": "out/m",
                       "mask_source": "persam"}
    return {
        "settings": {"identifier": "sks", "class_noun": "dog", "prompt_set": "/x/my_prompts.txt",
                     "pretrained_model_name_or_path": "sd", "num_images_per_prompt": 4, "seed": 10,
                     "num_inference_steps": 30, "guidance_scale": 7.5, "width": 512, "height": 512},
        "models": {"dino": "facebook/dino-vits16", "clip": "openai/clip-vit-base-patch32", "sam": None},
        "definitions": {"dino": "mean cosine", "real_images": "among the real images"},
        "real_images": {"dino": 0.8, "clip_i": 0.9, "clip_t": None, "masked_dino": None, "background_leakage": 0.3},
        "runs": {"base": run(**base_over), "masked": run(dino=0.6523, background_leakage=0.4001, masked_dino=None)},
    }


def test_markdown_tables_and_deltas():
    md = metrics_markdown(_metrics())
    assert md.startswith("# DreamBooth comparison: sks dog (my_prompts.txt prompts)")
    assert "1 prompt x 4 images, seeds 10..13 (identical for every run)" in md
    assert "| base | 0.500 | 0.700 | 0.250 | 0.600 | 0.400 | 100% |" in md
    assert "| masked | 0.652 (+0.152) | 0.700 (±0.000) | 0.250 (±0.000) | n/a | 0.400 (±0.000) | 100% |" in md
    assert "| real images | 0.800 | 0.900 | n/a | n/a | 0.300 | n/a |" in md  # no deltas on the real row
    assert "## property (1 prompt)" in md and "## Run masked (`out/m`, mask_source: persam)" in md
    assert "- **real images**: among the real images." in md


def test_format_interval_keeps_the_sign_of_ends_that_round_to_zero():
    from persam_dreambooth.evaluation.paired_stats import Difference
    from persam_dreambooth.evaluation.report_format import format_interval

    assert format_interval(Difference(0.012, 0.004, 0.020, "better", 25, 100)) == "+0.012 [+0.004, +0.020]"
    assert format_interval(Difference(-0.001, -0.0012, -0.0002, "worse", 25, 100)) == "-0.001 [-0.001, -0.000]"
    assert format_interval(Difference(0.0, 0.0, 0.0, "no clear difference", 25, 100)) == "±0.000 [+0.000, +0.000]"
    assert format_interval(Difference(0.2, None, None, "no clear difference", 1, 1)) == "+0.200 [too few images]"
    assert format_interval(None) == "n/a"


def test_format_value():
    assert format_value(None) == "n/a" and format_value(0.12345) == "0.123"
    assert format_value(0.5, 0.25) == "0.500 (+0.250)" and format_value(0.25, 0.5) == "0.250 (-0.250)"
    assert format_value(0.5, 0.50004) == "0.500 (±0.000)"


def test_bar_chart_skips_missing_metrics():
    m = _metrics()
    for run in m["runs"].values():
        run["overall"]["masked_dino"] = None
    im = Image.open(io.BytesIO(bar_chart_png(m)))
    im.load()
    assert im.format == "PNG" and im.size == (1100, 640)


def test_metrics_json_matches_markdown(report):
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics_markdown(metrics) == (report / "metrics.md").read_text(encoding="utf-8")


def _comparison(run, against, **cells):
    """A comparison as metrics.json records it: ``cells`` = metric -> (difference, low, high, verdict)."""
    table = {m: {"difference": d, "ci": [lo, hi], "width": hi - lo, "verdict": v, "n_prompts": 25, "n_pairs": 100,
                 "spread": "prompts"} for m, (d, lo, hi, v) in cells.items()}
    return {"run": run, "against": against, "overall": table, "groups": {"property": table}}


def _metrics_with_intervals():
    m = _metrics()
    m["statistics"] = {"confidence": 0.95, "resamples": 2000, "seed": 0, "wide_half_width": 0.01}
    m["comparisons"] = [_comparison("masked", "base", dino=(0.1523, 0.13, 0.17, "better"),
                                    background_leakage=(0.0001, -0.03, 0.03, "no clear difference"),
                                    clip_t=(0.012, 0.004, 0.020, "better"))]
    return m


def test_html_bolds_only_differences_whose_interval_excludes_zero():
    """No "best run" in bold any more (it invited over-reading noise): only differences that exclude 0."""
    from persam_dreambooth.evaluation.report_html import _differences_table, _table

    m = _metrics_with_intervals()
    base = m["runs"]["base"]["overall"]
    rows = [("base", base, "base"), ("a", {**base, "dino": 0.65231}, ""), ("b", {**base, "dino": 0.7}, "")]
    assert "best" not in _table(rows, base) and "<b>" not in _table(rows, base)
    html = _differences_table(m["comparisons"], None)
    assert html.count('class="diff sig better"') == 2  # DINO and CLIP-T; leakage straddles 0
    assert '<td class="diff sig better">+0.012<br>[+0.004, +0.020]<span class="verdict">better</span>' in html
    assert '<td class="diff">±0.000<br>[-0.030, +0.030]<span class="verdict">no clear difference</span>' in html
    assert 'aria-label="+0.012 [+0.004, +0.020]"' in html
    assert html.count('<svg class="ci"') == 3 and html.count('<line class="range"') == 3
    assert html.startswith('<p class="note">') and '<div class="tw">' in html  # wide tables scroll in their box


def test_markdown_differences_with_intervals_widths_and_advice():
    m = _metrics_with_intervals()
    md = metrics_markdown(m)
    assert "| difference | DINO ↑ | CLIP-T ↑ | background leakage ↓ |" in md
    assert ("| masked − base | **+0.152 [+0.130, +0.170]** better | **+0.012 [+0.004, +0.020]** better | "
            "±0.000 [-0.030, +0.030] no clear difference |") in md
    assert md.count("Paired differences, 95% confidence intervals:") == 2  # all prompts and the one group
    assert "## How sure are these differences?" in md and "2000 resamples of the prompts" in md
    assert "| masked − base | ±0.020 | ±0.008 | ±0.030 |" in md  # the interval widths
    # leakage: no clear difference with ±0.03 -> 9x the images for ±0.01; the prompts disagree most
    assert ("- masked − base, background leakage: no clear difference, and the interval is wide (±0.030). About 9× "
            "as many images would narrow it to ±0.010; the prompts disagree most") in md
    assert "masked − base, CLIP-T: no clear" not in md  # a clear verdict needs no advice


def test_chart_draws_error_bars_from_the_intervals():
    from persam_dreambooth.evaluation.report_chart import chart_figure

    fig = chart_figure(_metrics_with_intervals())
    try:
        _, dax = fig.axes[:2]
        bars = [c for c in dax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert len(bars) == 1  # one series (masked − base), error bars where an interval exists
        segments = bars[0].lines[2][0].get_segments()
        ends = sorted((round(float(s[0][1]), 3), round(float(s[1][1]), 3)) for s in segments)
        assert ends == [(-0.03, 0.03), (0.004, 0.02), (0.13, 0.17)]
        assert "95% confidence intervals" in dax.get_title()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_per_prompt_table_groups_runs_under_each_metric():
    from persam_dreambooth.evaluation.report_html import _per_prompt_table

    m = _metrics()
    long = "masked_rank8_lr1e-4_persam_f_with_a_long_name"
    m["runs"][long] = m["runs"]["masked"]
    for run in m["runs"].values():
        run["prompts"][0].update(dino=0.5, clip_t=0.2, background_leakage=0.4)
    html = _per_prompt_table(m, list(m["runs"]), ["dino", "clip_t"])
    assert html.count('colspan="3"') == 2 and "background leakage" not in html
    # long names may wrap at their parts, never inside a word
    assert html.count('<th class="run">masked_<wbr>rank8_<wbr>lr1e-<wbr>4_<wbr>persam_<wbr>f_<wbr>with_<wbr>') == 2
    assert html.count('<th class="run">masked</th>') == 2
    assert '<td class="prompt">p000 a red sks dog</td>' in html
