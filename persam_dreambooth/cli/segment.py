"""``persam-dreambooth segment``: find one reference object in many photos with PerSAM or PerSAM-F.

    persam-dreambooth segment --ref-image R.jpg [R2.jpg ...] (--ref-mask M.png [M2.png ...] | --ref-box x0,y0,x1,y1 ...
        | --ref-point x,y ...) --images DIR_OR_FILES... --output OUT [--method persam|persam-f] [--max-instances K]
        [--batch-size N] [--dtype float32|bfloat16|float16] [--cache-dir DIR] [--overwrite]
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--config FILE]

The flags are :class:`~persam_dreambooth.albums.segment_job.SegmentConfig`'s fields (a YAML/TOML ``--config`` file
may hold any of them; flags win). Several GPUs / machines: ``accelerate launch -m persam_dreambooth segment ...``
(photos are split between the processes). Everything is validated before anything is written; see
``docs/segmentation.md`` and ``docs/segmentation_album.md``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from persam_dreambooth.albums.segment_job import SegmentConfig
from persam_dreambooth.config import add_dataclass_arguments, flag_name, parse_config

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)

_REFERENCE = ("ref_image", "ref_mask", "ref_box", "ref_point", "images")  # declared below: nargs, groups
_PROMPTS = ("ref_mask", "ref_box", "ref_point")


def _reference_flag(group: Any, name: str, metavar: str) -> None:
    field = SegmentConfig.__dataclass_fields__[name]
    group.add_argument(flag_name(SegmentConfig, name, dashes=True), dest=name, nargs="+", action="extend",
                       default=None, metavar=metavar, help=field.metadata["help"])


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``segment`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment a reference object in photos (PerSAM / PerSAM-F)",
        description="Segment the object shown in reference images (given by masks, boxes or clicks) in other "
        "photos with PerSAM (training-free) or PerSAM-F (2 fitted weights). Writes <stem>.png (0/255 mask), "
        "<stem>_overlay.jpg, results.jsonl and run.json into --output; a rerun resumes.",
    )
    ref = parser.add_argument_group("reference (one kind of marking, one per reference photo)")
    _reference_flag(ref, "ref_image", "PATH")
    prompt = ref.add_mutually_exclusive_group()
    _reference_flag(prompt, "ref_mask", "PATH")
    _reference_flag(prompt, "ref_box", "X0,Y0,X1,Y1")
    _reference_flag(prompt, "ref_point", "X,Y")
    _reference_flag(parser, "images", "DIR_OR_FILE")
    add_dataclass_arguments(parser, SegmentConfig, skip=_REFERENCE, dashes=True)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/TOML file with any of the settings above (flags given here win)")
    parser.set_defaults(func=run, _parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Parse the config, check it, run it (:func:`~persam_dreambooth.albums.segment_job.run_segment`). Exit code."""
    from persam_dreambooth.albums.segment_job import check_segment_config, run_segment

    config = parse_config(SegmentConfig, args, args.config)
    if not config.ref_image:
        args._parser.error(f"the following arguments are required: {flag_name(SegmentConfig, 'ref_image', True)}")
    if sum(getattr(config, name) is not None for name in _PROMPTS) != 1:
        flags = " ".join(flag_name(SegmentConfig, name, True) for name in _PROMPTS)
        args._parser.error(f"exactly one of the arguments {flags} is required")
    plan = check_segment_config(config)
    summary = run_segment(config, plan)
    if summary["mean_score"] is not None:
        logger.info("segmented %d photo(s) (%d this run, %d image-encoder call(s)) into %s (mean predicted IoU %.3f)",
                    summary["photos"], summary["done_now"], summary["encoder_calls"], summary["output"],
                    summary["mean_score"])
    return 0


