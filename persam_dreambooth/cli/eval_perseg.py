"""``persam-dreambooth eval-perseg``: mIoU and bIoU of PerSAM / PerSAM-F on a PerSeg-layout folder.

    persam-dreambooth eval-perseg --data DIR --method persam|persam-f [--ref 00] --output OUT
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--dilation-ratio R] [--config FILE]

The flags are :class:`~persam_dreambooth.evaluation.perseg.EvalPersegConfig`'s fields.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from persam_dreambooth.config import add_dataclass_arguments, parse_config
from persam_dreambooth.evaluation.perseg import EvalPersegConfig

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval-perseg`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "eval-perseg",
        help="evaluate PerSAM / PerSAM-F on a PerSeg-layout dataset (mIoU, bIoU)",
        description="For every object folder (Images/<obj>/NN.jpg, Annotations/<obj>/NN.png) use the image with "
        "stem --ref as the reference and segment the others. Writes metrics.json, metrics.md, masks/ and "
        "overlays/.",
    )
    add_dataclass_arguments(parser, EvalPersegConfig, dashes=True)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/TOML file with any of the settings above (flags given here win)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.evaluation.perseg import run_eval_perseg

    config = parse_config(EvalPersegConfig, args, args.config)
    o = run_eval_perseg(config)["overall"]
    logger.info("mIoU %.2f  bIoU %.2f  mAcc %.2f  -> %s", o["mIoU"], o["bIoU"], o["mAcc"],
                Path(config.output) / "metrics.md")
    return 0
