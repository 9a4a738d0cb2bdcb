"""``persam-dreambooth compare``: does masking help? Generate, score and report trained runs against the base model.

The flags are the fields of :class:`~persam_dreambooth.evaluation.compare_config.CompareCommandConfig`
(``--class-noun``, with ``--class_noun`` accepted too); ``--config FILE`` reads them from YAML/TOML, flags win.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from persam_dreambooth.config import add_dataclass_arguments
    from persam_dreambooth.evaluation.compare_config import CompareCommandConfig, compare_flag

    parser = subparsers.add_parser(
        "compare",
        help="compare trained runs (masked vs vanilla) with DINO, CLIP and background metrics",
        description="Generate the DreamBooth prompt set with identical seeds for the base model and every run, "
        "score DINO, CLIP-I, CLIP-T, masked DINO, background leakage and background CLIP-T, and write "
        "metrics.json, metrics.md, side-by-side grids and report.html, with paired 95% confidence intervals for "
        "every difference. With --train, first train a masked and a vanilla (mask_source none) run from one "
        "training config.",
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML file of these settings")
    parser.add_argument(compare_flag("runs"), nargs="+", default=None, metavar="NAME=FOLDER",
                        help="training output folders, e.g. masked=out/masked vanilla=out/vanilla")
    add_dataclass_arguments(parser, CompareCommandConfig, skip=("runs",), dashes=True, underscore_aliases=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.evaluation.compare_config import CompareCommandConfig
    from persam_dreambooth.evaluation.train_compare import run_compare_command

    result = run_compare_command(parse_config(CompareCommandConfig, args, args.config))
    logging.getLogger(__name__).info("Report: %s", result.output_dir / "report.html")
    return 0
