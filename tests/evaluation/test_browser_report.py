"""report.html in a real browser: headless Chromium (Debian's ``chromium``) loads it from disk, every image decodes
(``naturalWidth > 0``, checked by the page's own script), every interval plot of the differences renders (a box and a
drawn range line) next to its ``+0.012 [+0.004, +0.020]`` text, and a screenshot is taken.

Skipped when Chromium is missing, unless ``PERSAM_REQUIRE_BROWSER=1`` (CI installs it and sets that), then it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        if os.environ.get("PERSAM_REQUIRE_BROWSER") == "1":
            pytest.fail("PERSAM_REQUIRE_BROWSER=1 but no `chromium` executable was found (apt-get install chromium).")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return path


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _check_page(chromium: str, report: Path, tmp_path: Path, n_images: int, n_intervals: int,
                height: int | None = 2000) -> None:
    """Load ``report.html`` in Chromium: every image decodes, every interval plot of the differences renders and
    nothing sticks out sideways; then take a ``height``-pixel screenshot into ``tmp_path / "report.png"`` (none for
    ``None``)."""
    url = (report / "report.html").resolve().as_uri()
    assert (report / "report.html").read_text(encoding="utf-8").count("<img ") == n_images

    dom = _run(chromium, tmp_path / "profile-dom", "--window-size=1280,2000", "--virtual-time-budget=5000",
               "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(0)))
    assert "data-images-total" in attrs, f"the page's image check did not run: {body.group(0)}"
    assert int(attrs["data-images-total"]) == n_images
    assert int(attrs["data-images-broken"]) == 0  # every image has naturalWidth > 0
    assert attrs["data-page-overflow"] == "false"  # no table or grid wider than a 1280-px window
    # the differences' interval plots: as many as the tables have cells, each with a box and a drawn range line
    assert int(attrs["data-ci-total"]) == n_intervals
    assert int(attrs["data-ci-drawn"]) == n_intervals
    # ... and their text, "+0.012 [+0.004, +0.020]", as the browser laid it out
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    shown = re.findall(r"[+\-±]\d\.\d{3}\s+\[[+\-]\d\.\d{3}, [+\-]\d\.\d{3}\]", text)
    assert len(shown) >= n_intervals, shown[:5]
    if height is None:
        return

    shot = tmp_path / "report.png"
    result = _run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", f"--window-size=1280,{height}",
                  "--hide-scrollbars", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, height)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page: chart, tables and grids are drawn


def _interval_cells(report: Path) -> int:
    """How many differences with an interval metrics.json holds (overall and per group): one plot each."""
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    n = sum(len(c["overall"]) + sum(len(g) for g in c["groups"].values()) for c in metrics["comparisons"])
    assert n > 0
    return n


def test_report_renders_in_chromium(tmp_path_factory, tmp_path):
    chromium = _chromium()
    report = tiny.tiny_compare_report(tmp_path_factory.getbasetemp() / "shared-compare")
    # chart + 3 side-by-side grids + PerSAM reference + the masked run's training masks
    _check_page(chromium, report, tmp_path, n_images=6, n_intervals=_interval_cells(report))
    keep = os.environ.get("PERSAM_KEEP_SCREENSHOT")
    if keep:  # how docs/images/report_screenshot.png is refreshed
        shutil.copyfile(tmp_path / "report.png", keep)


def test_report_with_four_runs_and_a_long_run_name(tmp_path_factory, tmp_path):
    chromium = _chromium()
    report = tiny.tiny_compare_report_many_runs(tmp_path_factory.getbasetemp() / "shared-compare")
    html = (report / "report.html").read_text(encoding="utf-8").replace("<wbr>", "")
    # 3 metric tables + 3 per-prompt column groups + subtitle + config + masks; the grids show it as pixels
    assert html.count(tiny.LONG_RUN_NAME) >= 9
    keep = os.environ.get("PERSAM_KEEP_SCREENSHOT_MANY")  # a screenshot only on request: saves a Chromium start
    _check_page(chromium, report, tmp_path, n_images=6, n_intervals=_interval_cells(report),
                height=3000 if keep else None)
    if keep:
        shutil.copyfile(tmp_path / "report.png", keep)
