"""report.html in a real browser: headless Chromium (Debian's ``chromium``) loads it from disk, every image decodes
(``naturalWidth > 0``, checked by the page's own script) and a screenshot is taken.

Skipped when Chromium is missing, unless ``PERSAM_REQUIRE_BROWSER=1`` (CI installs it and sets that), then it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tiny
from PIL import Image


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with tiny.torch_threads(1):
        yield

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


def test_report_renders_in_chromium(tmp_path_factory, tmp_path):
    chromium = _chromium()
    report = tiny.tiny_compare_report(tmp_path_factory.getbasetemp() / "shared-compare")
    url = (report / "report.html").resolve().as_uri()
    n_imgs = (report / "report.html").read_text(encoding="utf-8").count("<img ")

    dom = _run(chromium, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    broken = re.search(r'data-images-broken="(\d+)"', body.group(0))
    assert total is not None and broken is not None, f"the page's image check did not run: {body.group(0)}"
    assert int(total.group(1)) == n_imgs == 6
    assert int(broken.group(1)) == 0

    shot = tmp_path / "report.png"
    result = _run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                  "--hide-scrollbars", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page: chart, tables and grids are drawn
    keep = os.environ.get("PERSAM_KEEP_SCREENSHOT")
    if keep:  # how docs/images/report_screenshot.png is refreshed
        shutil.copyfile(shot, keep)
