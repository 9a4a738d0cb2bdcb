"""Album helpers (stem checks, mask PNGs, results.jsonl) and the overlay drawing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import PerSAM
from persam_dreambooth import testing as tiny
from persam_dreambooth.albums.outputs import check_instance_stems, save_mask_png
from persam_dreambooth.albums.segment_photos import segment_images
from persam_dreambooth.albums.sharding import RESULTS_FILE
from persam_dreambooth.utils.overlay import draw_overlay


def test_check_instance_stems():
    check_instance_stems(["x/a.jpg", "x/b_inst2.jpg", "x/a_inst0.jpg"])  # no photo "b"; "_inst0" is no instance
    with pytest.raises(ValueError, match=r"'x/A_inst2.png' would overwrite instance mask 2 of 'y/a.jpg'"):
        check_instance_stems(["y/a.jpg", "x/A_inst2.png"], "--images")


def test_save_mask_png_is_L_0_255(tmp_path):
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    old = os.umask(0o022)
    try:
        save_mask_png(mask, tmp_path / "m.png")
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "L" and img.size == (7, 5)
    arr = np.asarray(img)
    assert set(np.unique(arr)) == {0, 255}
    assert np.array_equal(arr > 0, mask)


def test_draw_overlay_sizes_and_marks():
    image, mask = tiny.synthetic_subject()
    sim = np.linspace(-1, 1, mask.size, dtype=np.float32).reshape(mask.shape)
    out = draw_overlay(image, mask, np.array([[10, 20], [100, 80]]), np.array([1, 0]), sim)
    assert out.mode == "RGB" and out.size == (128, 96)
    arr = np.asarray(out).astype(int)
    assert arr[20, 10, 1] > 150 and arr[20, 10, 0] < 100  # green positive point at (x=10, y=20)
    assert arr[80, 100, 0] > 150 and arr[80, 100, 1] < 100  # red negative point at (x=100, y=80)
    big = draw_overlay(np.zeros((3000, 1000, 3), np.uint8), np.zeros((3000, 1000), bool), max_side=600)
    assert big.size == (200, 600)
    flat = draw_overlay(image, mask, similarity=np.zeros(mask.shape, np.float32))  # constant map: no NaN
    assert np.isfinite(np.asarray(flat)).all()


def test_segment_images_writes_outputs_and_results(tmp_path):
    sam = tiny.tiny_sam()
    persam = PerSAM(sam)
    persam.set_reference(*tiny.synthetic_subject())
    folder = tmp_path / "imgs"
    tiny.write_instance_dir(folder, n=2)
    paths = sorted(folder.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    records = segment_images(persam, paths, out, progress=False)
    assert [r["stem"] for r in records] == ["00", "01"]
    lines = (out / RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    for r in records:
        mask = np.asarray(Image.open(out / f"{r['stem']}.png"))
        assert mask.shape == (48, 64)
        assert r["mask_area"] == int((mask > 0).sum())
        assert {"score", "points_xy", "point_labels", "seconds", "mask_area"} <= set(r)
        assert Image.open(out / f"{r['stem']}_overlay.jpg").size == (64, 48)
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "00_overlay.jpg", "01.png", "01_overlay.jpg",
                                                     RESULTS_FILE]
