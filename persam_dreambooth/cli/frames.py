"""``persam-dreambooth frames``: pick sharp, diverse frames with the subject from a video, for review before training.

    persam-dreambooth frames --video FILE --output DIR (--ref-mask PNG | --ref-box x0,y0,x1,y1 | --ref-point x,y)
        [--ref-frame N] [--num-frames 12] [--method persam|persam-f] [--min-score 0.7] [--max-candidates 200]
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--config FILE]

Writes ``instance_frames/``, ``masks/`` (with ``masks.json``), ``masks_grid.jpg`` and ``frame_selection.json`` into
``--output``; edit them and train with ``--instance_data_dir DIR/instance_frames --mask_dir DIR/masks``. The rules
are :func:`persam_dreambooth.masks.video_frames.select_instance_frames`'s (docs/video.md).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from persam_dreambooth.cli.segment_video import SamOptions, add_video_command
from persam_dreambooth.config import field_help
from persam_dreambooth.masks.video_frames import DEFAULT_MAX_CANDIDATES, DEFAULT_MIN_SCORE, DEFAULT_NUM_FRAMES

__all__ = ["FramesConfig", "register", "run"]

logger = logging.getLogger(__name__)


@dataclass
class FramesConfig(SamOptions):
    """Settings of ``frames`` (flags = field names with dashes)."""

    video: str = field_help("", help="the video file (or a folder of frames)")
    output: str = field_help("", help="output folder (instance_frames/, masks/, masks_grid.jpg are replaced)")
    ref_frame: int = field_help(0, help="index of the frame the reference marks")
    ref_mask: str | None = field_help(None, help="mask of the subject on the reference frame")
    ref_box: str | None = field_help(None, help="x0,y0,x1,y1 of the subject on the reference frame")
    ref_point: str | None = field_help(None, help="x,y of a click on the subject on the reference frame")
    num_frames: int = field_help(DEFAULT_NUM_FRAMES, help="how many frames to pick")
    min_score: float = field_help(DEFAULT_MIN_SCORE, help="SAM predicted IoU needed to count the subject as present")
    max_candidates: int = field_help(DEFAULT_MAX_CANDIDATES, help="frames tracked and scored at most")

    def __post_init__(self) -> None:
        self.require("video", "output")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``frames`` sub-command."""
    return add_video_command(
        subparsers, "frames", FramesConfig, run,
        help="pick sharp, diverse frames with the subject from a video (instance images + masks)",
        description="Track the subject marked on --ref-frame, keep frames where it is present, drop blurry ones and "
        "pick --num-frames diverse frames. Writes instance_frames/, masks/, masks_grid.jpg into --output.",
    )


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.utils.io import check_output_dir
    from persam_dreambooth.utils.locks import lock_output_dir

    cfg = parse_config(FramesConfig, args, args.config)
    cfg.check_sam()
    names = {"video": "--video", "reference_frame": "--ref-frame", "reference_mask": "--ref-mask",
             "reference_box": "--ref-box", "reference_point": "--ref-point", "num_frames": "--num-frames",
             "max_candidates": "--max-candidates", "min_score": "--min-score", "output_dir": "--output"}
    check_output_dir(cfg.output, "--output")
    with lock_output_dir(cfg.output, "frames", "--output", tidy_on_error=True):  # one run per folder
        selection = _select(cfg, names)
    logger.info("picked %d of %d candidate frame(s) into %s (review %s)", len(selection.chosen),
                len(selection.candidates), selection.instance_dir, selection.grid_path)
    return 0


def _select(cfg: FramesConfig, names: dict[str, str]) -> Any:
    from persam_dreambooth.masks.video_frames import select_instance_frames

    return select_instance_frames(
        cfg.video, cfg.output, reference_frame=cfg.ref_frame, reference_mask=cfg.ref_mask, reference_box=cfg.ref_box,
        reference_point=cfg.ref_point, num_frames=cfg.num_frames,
        method=cfg.tracker_method, min_score=cfg.min_score,
        max_candidates=cfg.max_candidates, sam_model_type=cfg.sam_model, sam_checkpoint=cfg.sam_checkpoint,
        device=cfg.device, encoder_dtype=cfg.dtype, arg_names=names,
    )
