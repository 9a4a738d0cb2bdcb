"""``persam-dreambooth eval-davis``: semi-supervised DAVIS-2017 J&F of PerSAM / PerSAM-F video tracking.

    persam-dreambooth eval-davis --data DAVIS_ROOT --method persam|persam-f --output DIR
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--overwrite] [--config FILE]

For every sequence of ``ImageSets/2017/val.txt``: track the objects of the frame-0 annotation through
``JPEGImages/480p/<seq>/`` and write ``predictions/<seq>/<frame>.png`` (palette label maps), then score them with
:func:`persam_dreambooth.evaluation.davis.evaluate_sequences` into ``metrics.json`` and ``metrics.md``. A rerun skips
sequences whose predictions are complete (same settings).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persam_dreambooth.cli.segment_video import SamOptions, add_video_command
from persam_dreambooth.config import field_help

__all__ = ["EvalDavisConfig", "eval_davis", "register", "run"]

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions"


@dataclass
class EvalDavisConfig(SamOptions):
    """Settings of ``eval-davis`` (flags = field names with dashes)."""

    data: str = field_help("", help="DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)")
    output: str = field_help("", help="output folder: predictions/, metrics.json, metrics.md, run.json")
    overwrite: bool = field_help(False, help="start again when --output holds predictions made with other settings")

    def __post_init__(self) -> None:
        self.require("data", "output")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval-davis`` sub-command."""
    return add_video_command(
        subparsers, "eval-davis", EvalDavisConfig, run,
        help="evaluate PerSAM / PerSAM-F video tracking on DAVIS-2017 (J&F)",
        description="Track every sequence of ImageSets/2017/val.txt from its first annotation and score the "
        "predictions with the DAVIS-2017 semi-supervised J and F. Writes predictions/, metrics.json, metrics.md "
        "and run.json into --output; a rerun skips finished sequences.",
    )


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.config import parse_config

    metrics = eval_davis(parse_config(EvalDavisConfig, args, args.config))
    logger.info("J&F-Mean %.3f  J-Mean %.3f  F-Mean %.3f", metrics["J&F-Mean"], metrics["J-Mean"], metrics["F-Mean"])
    return 0


def _first_labels(ann_dir: Path, first_frame: Path) -> np.ndarray:
    from persam_dreambooth.data.video import read_label_map
    from persam_dreambooth.evaluation.davis import VOID_LABEL

    path = ann_dir / f"{first_frame.stem}.png"
    if not path.is_file():
        raise FileNotFoundError(f"`--data`: the first frame {first_frame.name} has no annotation {str(path)!r}.")
    labels = read_label_map(path, "--data")
    return np.where(labels == VOID_LABEL, 0, labels).astype(np.uint8)


def eval_davis(cfg: EvalDavisConfig) -> dict[str, Any]:
    """Track, write and score every sequence (see the module docstring). Returns the metrics dict."""
    from tqdm.auto import tqdm

    from persam_dreambooth.data.images import list_images
    from persam_dreambooth.data.video import davis_sequence, save_label_png
    from persam_dreambooth.evaluation.davis import evaluate_sequences, metrics_markdown, read_sequence_list
    from persam_dreambooth.segmentation.persam_video import PerSAMVideo, check_first_labels
    from persam_dreambooth.utils.io import atomic_write_json, atomic_write_text, check_output_dir
    from persam_dreambooth.utils.locks import lock_output_dir

    cfg.check_sam()
    out = check_output_dir(cfg.output, "--output")
    data = Path(cfg.data)
    if not data.is_dir():
        raise FileNotFoundError(f"`--data` {cfg.data!r} is not a folder.")
    sequences = read_sequence_list(data, "--data")
    plans = []
    for seq in sequences:  # check every sequence before anything runs
        frames_dir, ann_dir = davis_sequence(data, seq, arg_name="--data")
        files = list_images(frames_dir, "--data")
        first = check_first_labels(_first_labels(ann_dir, files[0]), None, f"--data ({seq} frame 0 annotation)")
        plans.append((seq, files, first))
    settings = {"data": str(data.resolve()), "method": cfg.method, "sam_model": cfg.sam_model, "dtype": cfg.dtype,
                "sam_checkpoint": None if cfg.sam_checkpoint is None else str(Path(cfg.sam_checkpoint).resolve())}
    run_json = out / "run.json"
    clear = False
    if run_json.is_file():
        previous = json.loads(run_json.read_text(encoding="utf-8")).get("settings")
        if previous != settings and not cfg.overwrite:
            raise ValueError(f"`--output` {str(out)!r} holds predictions made with other settings; choose another "
                             "folder or add `--overwrite`.")
        clear = previous != settings
    with lock_output_dir(out, "eval-davis", "--output", tidy_on_error=True):  # one run per folder
        pred_root = out / PREDICTIONS
        if clear:  # --overwrite: only under the lock, never under another run's feet
            import shutil

            shutil.rmtree(pred_root, ignore_errors=True)
        todo = [p for p in plans if not all((pred_root / p[0] / f"{f.stem}.png").is_file() for f in p[1])]
        start = time.perf_counter()
        atomic_write_json(run_json, {"settings": settings, "status": "running"})
        if todo:
            tracker = PerSAMVideo(cfg.load(), cfg.tracker_method,
                                  encoder_dtype=cfg.dtype)
            for seq, files, first in tqdm(todo, desc="sequences", unit="seq"):
                seq_dir = pred_root / seq
                seq_dir.mkdir(parents=True, exist_ok=True)
                for frame in tracker.iter_track(files, first):
                    save_label_png(frame.labels, seq_dir / f"{files[frame.index].stem}.png")
        metrics = evaluate_sequences(pred_root, data)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_text(out / "metrics.md", metrics_markdown(metrics, f"DAVIS-2017 semi-supervised, {cfg.method}"))
        seconds = round(time.perf_counter() - start, 3)
        atomic_write_json(run_json, {"settings": settings, "status": "complete", "sequences": len(plans),
                                     "sequences_this_run": len(todo), "seconds": seconds})
        return metrics
