"""``persam-dreambooth train``: the masked DreamBooth trainer in this process (one GPU or the CPU).

Same flags as ``accelerate launch train_scripts/train_dreambooth.py`` (multi-GPU goes through that script).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from persam_dreambooth.training.args import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="masked DreamBooth (LoRA or full) with PerSAM masks",
        description="Masked DreamBooth training in this process. For several GPUs use "
        "`accelerate launch train_scripts/train_dreambooth.py` with the same flags.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.training import config_from_args, train

    config = config_from_args(args)
    output_dir = train(config)
    if config.masks_only:
        print(f"Masks: {output_dir / 'masks'} (table: {output_dir / 'masks_table.csv'})")  # noqa: T201 - CLI boundary
    else:
        print(f"Trained: {output_dir}")  # noqa: T201 - CLI boundary
    return 0
