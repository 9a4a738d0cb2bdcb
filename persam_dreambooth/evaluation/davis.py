"""Semi-supervised DAVIS-2017 evaluation: region J and boundary F, as the standard toolkit defines them.

:func:`evaluate_sequences` scores a folder of predicted label maps against a DAVIS root (docs/design/persam_video.md
§6 and Decision 9):

* sequences: those of ``ImageSets/2017/val.txt``; frames: every annotated frame except the first and the last;
  objects: ``1..K``, ``K`` = the largest label of the frame-0 annotation (void 255 is reset to background);
* a prediction ``pred_dir/<seq>/<frame>.png`` is a label map (palette index = object); an object it never contains is
  an empty mask; nothing is written into ``pred_dir``;
* **J** (:func:`region_jaccard`) = ``|P & G| / |P | G|``, 1 when both are empty; **F** (:func:`boundary_f`) = the
  F-measure of one-pixel boundaries (:func:`boundary_map`) matched within ``ceil(0.008 * diagonal)`` pixels (a disk);
* per object over its scored frames: Mean, Recall (fraction > 0.5) and Decay (first quarter minus last quarter,
  :func:`decay`); globally each statistic is averaged over all objects of all sequences and
  ``J&F-Mean = (J-Mean + F-Mean) / 2``. Values are fractions in [0, 1], not percentages.

Paper figures (DAVIS-2017 val, SAM ViT-H, as read from the paper's Table 2): PerSAM J&F 60.3 (J 56.6, F 63.9),
PerSAM-F J&F 71.9 (J 69.9, F 73.8); reported as percentages there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "BOUNDARY_TOLERANCE",
    "boundary_f",
    "boundary_map",
    "decay",
    "evaluate_sequences",
    "metrics_markdown",
    "read_sequence_list",
    "region_jaccard",
    "statistics",
]

BOUNDARY_TOLERANCE = 0.008  #: boundary match tolerance as a fraction of the image diagonal (toolkit default)
VOID_LABEL = 255
_DECAY_BINS = 4


def region_jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """J of one frame: ``|P & G| / |P | G|``, 1 when the union is empty. Shapes: two ``(H, W)`` bool."""
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a bool ``(H, W)`` mask (the toolkit's ``seg2bmap`` at the mask's own size).

    A pixel is a boundary when it differs from its right, lower or lower-right neighbour; in the last row only the
    right neighbour counts, in the last column only the lower one, and the bottom-right pixel never is one.
    """
    seg = mask.astype(bool)
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    diagonal = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    diagonal[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ diagonal)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def _dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``(H, W)`` bool by the discrete disk ``x^2 + y^2 <= radius^2``."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()  # (2r+1, 2r+1)
    x = torch.from_numpy(mask.astype(np.float32))[None, None]  # (H, W) -> (1, 1, H, W)
    hits = F.conv2d(x, disk[None, None], padding=radius)  # counts of mask pixels under the disk: exact small ints
    return (hits[0, 0] > 0.5).numpy()


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F of one frame: boundary precision/recall within ``ceil(tolerance * diagonal)`` pixels (toolkit definition).

    No boundary in either -> 1; a predicted boundary only or a ground-truth boundary only -> 0.
    """
    radius = int(tolerance) if tolerance >= 1 else int(math.ceil(tolerance * math.hypot(*pred.shape)))
    pred_b = boundary_map(pred)
    gt_b = boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        precision = recall = 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(pred_b & _dilate_disk(gt_b, radius)) / n_pred
        recall = np.count_nonzero(gt_b & _dilate_disk(pred_b, radius)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def decay(values: np.ndarray) -> float:
    """Mean of the first quarter of ``values`` minus the mean of the last (the toolkit's 4 bins, NaN-ignoring)."""
    n = len(values)
    edges = (np.round(np.linspace(1, n, _DECAY_BINS + 1) + 1e-10) - 1).astype(int)
    bins = [values[edges[i]:edges[i + 1] + 1] for i in range(_DECAY_BINS)]
    return float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """``(Mean, Recall, Decay)`` of one object's per-frame J or F values (NaN-ignoring)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)), float(np.nanmean(values > 0.5)), decay(values)


def read_sequence_list(davis_root: str | os.PathLike[str], arg_name: str = "davis_root") -> list[str]:
    """The sequence names of ``ImageSets/2017/val.txt`` (blank lines skipped).

    Raises:
        FileNotFoundError: the file is missing. ValueError: it lists no sequence.
    """
    path = Path(davis_root) / "ImageSets" / "2017" / "val.txt"
    if not path.is_file():
        raise FileNotFoundError(f"`{arg_name}` {str(davis_root)!r} has no {str(path)!r} (the DAVIS-2017 layout "
                                "lists its sequences there).")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"`{arg_name}`: {str(path)!r} lists no sequence.")
    return names


def _read_indexed(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    with Image.open(path) as image:
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        return np.array(image.convert("L"), dtype=np.uint8)


def _score_sequence(pred_dir: Path, ann_dir: Path, sequence: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per object ``k``: ``(J per scored frame, F per scored frame)``."""
    frames = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".png")
    if len(frames) < 3:
        raise ValueError(f"sequence {sequence!r} has {len(frames)} annotated frame(s) in {str(ann_dir)!r}; at least "
                         "3 are needed (the first and the last are not scored).")
    first = _read_indexed(frames[0], "annotation")
    first = np.where(first == VOID_LABEL, 0, first)
    num_objects = int(first.max())
    scores: dict[int, tuple[list[float], list[float]]] = {k: ([], []) for k in range(1, num_objects + 1)}
    for frame in frames[1:-1]:
        gt = _read_indexed(frame, "annotation")
        gt = np.where(gt == VOID_LABEL, 0, gt)
        pred = _read_indexed(pred_dir / sequence / frame.name, f"prediction of sequence {sequence!r}:")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {str(pred_dir / sequence / frame.name)!r} has size {pred.shape}, the "
                             f"annotation {gt.shape}.")
        for k, (j_values, f_values) in scores.items():
            p, g = pred == k, gt == k
            j_values.append(region_jaccard(p, g))
            f_values.append(boundary_f(p, g))
    return {k: (np.asarray(j), np.asarray(f)) for k, (j, f) in scores.items()}


def evaluate_sequences(pred_dir: str | os.PathLike[str], davis_root: str | os.PathLike[str]) -> dict[str, Any]:
    """Score the predictions of every sequence of ``val.txt`` (module docstring). Nothing is written.

    Returns:
        ``{"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay": float (fractions),
        "per_object": {"<seq>_<k>": {"J", "F", "J-Recall", "J-Decay", "F-Recall", "F-Decay"}},
        "per_sequence": {"<seq>": {"J&F-Mean", "J-Mean", "F-Mean"}}}``.

    Raises:
        FileNotFoundError: ``val.txt``, an annotation folder or a prediction file is missing.
        ValueError: a sequence has fewer than 3 annotated frames, a prediction has another size, no object at all.
    """
    pred_dir = Path(pred_dir)
    davis_root = Path(davis_root)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"`pred_dir` {str(pred_dir)!r} is not a folder.")
    per_object: dict[str, dict[str, float]] = {}
    per_sequence: dict[str, dict[str, float]] = {}
    for sequence in read_sequence_list(davis_root):
        ann_dir = davis_root / "Annotations" / "480p" / sequence
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"`davis_root` {str(davis_root)!r} has no annotations for {sequence!r} "
                                    f"({str(ann_dir)!r}).")
        seq_j, seq_f = [], []
        for k, (j_values, f_values) in _score_sequence(pred_dir, ann_dir, sequence).items():
            j_mean, j_recall, j_decay = statistics(j_values)
            f_mean, f_recall, f_decay = statistics(f_values)
            per_object[f"{sequence}_{k}"] = {"J": j_mean, "F": f_mean, "J-Recall": j_recall, "J-Decay": j_decay,
                                             "F-Recall": f_recall, "F-Decay": f_decay}
            seq_j.append(j_mean)
            seq_f.append(f_mean)
        if seq_j:
            per_sequence[sequence] = {"J&F-Mean": (float(np.mean(seq_j)) + float(np.mean(seq_f))) / 2,
                                      "J-Mean": float(np.mean(seq_j)), "F-Mean": float(np.mean(seq_f))}
    if not per_object:
        raise ValueError(f"`davis_root` {str(davis_root)!r}: no sequence has an object in its first annotation.")
    objs = list(per_object.values())
    result: dict[str, Any] = {}
    for metric in ("J", "F"):
        result[f"{metric}-Mean"] = float(np.mean([o[metric] for o in objs]))
        result[f"{metric}-Recall"] = float(np.mean([o[f"{metric}-Recall"] for o in objs]))
        result[f"{metric}-Decay"] = float(np.mean([o[f"{metric}-Decay"] for o in objs]))
    result = {"J&F-Mean": (result["J-Mean"] + result["F-Mean"]) / 2, **result}
    result["per_object"] = per_object
    result["per_sequence"] = per_sequence
    return result


def metrics_markdown(metrics: dict[str, Any], title: str = "DAVIS-2017 semi-supervised") -> str:
    """A Markdown report of :func:`evaluate_sequences`' result (percentages, 1 decimal, as papers print them)."""
    keys = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
    lines = [f"# {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
             "| " + " | ".join(f"{100 * metrics[k]:.1f}" for k in keys) + " |", "",
             "| sequence | J&F-Mean | J-Mean | F-Mean |", "|---|---|---|---|"]
    for seq, vals in metrics.get("per_sequence", {}).items():
        lines.append(f"| {seq} | {100 * vals['J&F-Mean']:.1f} | {100 * vals['J-Mean']:.1f} | "
                     f"{100 * vals['F-Mean']:.1f} |")
    lines += ["", "| object | J | F |", "|---|---|---|"]
    for name, vals in metrics.get("per_object", {}).items():
        lines.append(f"| {name} | {100 * vals['J']:.1f} | {100 * vals['F']:.1f} |")
    lines += ["", "Paper (SAM ViT-H, DAVIS-2017 val): PerSAM 60.3 J&F, PerSAM-F 71.9 J&F.", ""]
    return "\n".join(lines)
