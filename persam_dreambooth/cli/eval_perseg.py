"""``persam-dreambooth eval-perseg``: mIoU and bIoU of PerSAM / PerSAM-F on a PerSeg-layout folder.

    persam-dreambooth eval-perseg --data DIR --method persam|persam-f [--ref 00] --output OUT
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)

METHODS = ("persam", "persam-f")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval-perseg`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "eval-perseg",
        help="evaluate PerSAM / PerSAM-F on a PerSeg-layout dataset (mIoU, bIoU)",
        description="For every object folder (Images/<obj>/NN.jpg, Annotations/<obj>/NN.png) use the image with "
        "stem --ref as the reference and segment the others. Writes metrics.json, metrics.md, masks/ and "
        "overlays/.",
    )
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="PerSeg-layout root (holds Images/, Annotations/)")
    parser.add_argument("--method", choices=METHODS, default="persam", help="segmenter (default: persam)")
    parser.add_argument("--ref", default="00", metavar="STEM", help="file stem of the reference image (default: 00)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--sam-model", default="vit_h", metavar="TYPE", help="SAM model type (default: vit_h)")
    parser.add_argument("--sam-checkpoint", default=None, metavar="PATH",
                        help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    parser.add_argument("--device", default=None, metavar="DEVICE", help="cuda, cuda:N or cpu (default: cuda if "
                        "available)")
    parser.add_argument("--dilation-ratio", type=float, default=0.02, metavar="R",
                        help="Boundary IoU band width as a fraction of the image diagonal (default: 0.02)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.evaluation.perseg import evaluate_perseg
    from persam_dreambooth.segmentation.persam import PerSAM
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, load_sam, resolve_device
    from persam_dreambooth.segmentation.visualize import draw_overlay
    from persam_dreambooth.utils.io import check_output_dir

    # Validate everything before loading SAM or writing anything.
    if args.sam_model not in SAM_BUILDERS:
        raise ValueError(f"`--sam-model` must be one of {sorted(SAM_BUILDERS)}, got {args.sam_model!r}.")
    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).is_file():
        raise FileNotFoundError(f"`--sam-checkpoint` file {str(args.sam_checkpoint)!r} does not exist.")
    if not args.dilation_ratio > 0:
        raise ValueError(f"`--dilation-ratio` must be > 0, got {args.dilation_ratio}.")
    device = resolve_device(args.device, "--device")
    out = check_output_dir(args.output, "--output")

    def make() -> Any:  # called by evaluate_perseg once every data file is checked, before anything is written
        sam = load_sam(args.sam_model, checkpoint=args.sam_checkpoint, device=device)
        if args.method == "persam-f":
            from persam_dreambooth.segmentation.persam_f import PerSAMF

            return PerSAMF(sam)
        return PerSAM(sam)

    def overlay(image: Any, seg: Any) -> Any:
        return draw_overlay(image, seg.mask, seg.points_xy, seg.point_labels, seg.similarity,
                            getattr(seg, "box_xyxy", None))

    metrics = evaluate_perseg(
        args.data, out, make, method=args.method, sam_model=args.sam_model, ref=args.ref,
        dilation_ratio=args.dilation_ratio, draw_overlay=overlay,
        extra={"sam_checkpoint": args.sam_checkpoint, "device": str(device)},
    )
    o = metrics["overall"]
    logger.info("mIoU %.2f  bIoU %.2f  mAcc %.2f  -> %s", o["mIoU"], o["bIoU"], o["mAcc"], out / "metrics.md")
    return 0
