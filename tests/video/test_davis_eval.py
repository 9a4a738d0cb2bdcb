"""DAVIS-2017 J and F against hand-computed values, and evaluate_sequences on a small synthetic layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from persam_dreambooth.data.video import save_label_png
from persam_dreambooth.evaluation.davis import (
    boundary_f,
    boundary_map,
    decay,
    evaluate_sequences,
    region_jaccard,
    statistics,
)

SAMPLE = Path("/work/shared/data/davis_sample")


def _square(rows: slice, cols: slice, size: int = 10) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


def test_boundary_map_of_a_square_by_hand():
    # 4x4 square, rows 2..5, cols 2..5: the boundary is the outer row/column above and left (row 1 cols 1..5,
    # col 1 rows 2..5) and the square's own last row and column (row 5 cols 2..5, col 5 rows 2..4): 16 pixels
    expected = np.zeros((10, 10), bool)
    expected[1, 1:6] = True
    expected[2:6, 1] = True
    expected[5, 2:6] = True
    expected[2:5, 5] = True
    np.testing.assert_array_equal(boundary_map(_square(slice(2, 6), slice(2, 6))), expected)


def test_j_and_f_by_hand():
    gt = _square(slice(2, 6), slice(2, 6))
    # shifted by 2 columns: overlap 8 px, union 24 -> J = 1/3. Tolerance ceil(0.008 * sqrt(200)) = 1 px (a plus-
    # shaped disk). Counting boundary pixels within 1 px of the other boundary: 10 of the 16 predicted ones
    # (row 1: cols 3-6; col 3: rows 2, 4, 5; row 5: cols 4-6) and 10 of the 16 true ones -> P = R = F = 0.625.
    shifted = _square(slice(2, 6), slice(4, 8))
    assert region_jaccard(shifted, gt) == pytest.approx(1 / 3)
    assert boundary_f(shifted, gt) == pytest.approx(0.625)
    # one column wider: J = 16/20; every boundary pixel is within 1 px of the other boundary -> F = 1
    wider = _square(slice(2, 6), slice(2, 7))
    assert region_jaccard(wider, gt) == pytest.approx(0.8)
    assert boundary_f(wider, gt) == pytest.approx(1.0)
    empty = np.zeros_like(gt)
    assert region_jaccard(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert region_jaccard(empty, gt) == 0.0 and boundary_f(empty, gt) == 0.0
    assert boundary_f(gt, empty) == 0.0
    near, far = _square(slice(2, 6), slice(2, 6), 20), _square(slice(2, 6), slice(12, 16), 20)  # 6 columns apart
    assert region_jaccard(far, near) == 0.0 and boundary_f(far, near) == 0.0


def test_mean_recall_decay_by_hand():
    values = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    # bins of 6 values: edges round(linspace(1, 6, 5)) - 1 = 0, 1, 3, 4, 5 -> first bin [1, .8], last [.2, 0]
    assert decay(values) == pytest.approx(0.9 - 0.1)
    assert statistics(values) == pytest.approx((0.5, 0.5, 0.8))


def _layout(root: Path, gts: list[np.ndarray], preds: list[np.ndarray]) -> tuple[Path, Path]:
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("toy\n\n", encoding="utf-8")
    ann = root / "Annotations/480p/toy"
    ann.mkdir(parents=True)
    pred_dir = root / "pred"
    (pred_dir / "toy").mkdir(parents=True)
    for i, (g, p) in enumerate(zip(gts, preds, strict=True)):
        save_label_png(g, ann / f"{i:05d}.png")
        save_label_png(p, pred_dir / "toy" / f"{i:05d}.png")
    return root, pred_dir


def test_evaluate_sequences_scores_the_middle_frames(tmp_path):
    gt = np.zeros((10, 10), np.uint8)
    gt[_square(slice(2, 6), slice(2, 6))] = 1
    gt[8:10, 8:10] = 2
    shifted = np.zeros_like(gt)
    shifted[_square(slice(2, 6), slice(4, 8))] = 1  # object 1 shifted, object 2 missing (an empty mask)
    garbage = np.full_like(gt, 1)  # frames 0 and 3 (first and last) are not scored
    root, pred_dir = _layout(tmp_path, [gt, gt, gt, gt], [garbage, gt, shifted, garbage])
    before = sorted(os.listdir(pred_dir / "toy"))
    metrics = evaluate_sequences(pred_dir, root)
    assert sorted(os.listdir(pred_dir / "toy")) == before  # nothing written into pred_dir
    j1, f1 = (1 + 1 / 3) / 2, (1 + 0.625) / 2
    j2, f2 = (1 + 0) / 2, (1 + 0) / 2
    assert metrics["per_object"]["toy_1"]["J"] == pytest.approx(j1)
    assert metrics["per_object"]["toy_1"]["F"] == pytest.approx(f1)
    assert metrics["per_object"]["toy_2"]["J"] == pytest.approx(j2)
    assert metrics["J-Mean"] == pytest.approx((j1 + j2) / 2)
    assert metrics["F-Mean"] == pytest.approx((f1 + f2) / 2)
    assert metrics["J&F-Mean"] == pytest.approx(((j1 + j2) / 2 + (f1 + f2) / 2) / 2)
    assert metrics["J-Recall"] == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["J-Decay"] == pytest.approx(((1 - 1 / 3) + (1 - 0)) / 2)  # n = 2: first bin frame 1, last 2
    assert set(metrics) >= {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
                            "per_object"}


def test_missing_prediction_is_an_error(tmp_path):
    gt = np.zeros((10, 10), np.uint8)
    gt[2:5, 2:5] = 1
    root, pred_dir = _layout(tmp_path, [gt] * 3, [gt] * 3)
    (pred_dir / "toy" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="00001.png"):
        evaluate_sequences(pred_dir, root)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared DAVIS sample not available")
def test_ground_truth_scores_one_on_the_shared_sample(tmp_path):
    pred = tmp_path / "pred"
    for seq in ("synth-occlude", "synth-exit"):
        shutil.copytree(SAMPLE / "Annotations/480p" / seq, pred / seq)
    metrics = evaluate_sequences(pred, SAMPLE)
    assert metrics["J&F-Mean"] == pytest.approx(1.0) and metrics["J-Decay"] == pytest.approx(0.0)
    assert sorted(metrics["per_object"]) == ["synth-exit_1", "synth-exit_2", "synth-occlude_1", "synth-occlude_2"]
