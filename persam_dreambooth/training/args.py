"""Command-line flags of the trainer: one ``--field`` per :class:`TrainConfig` field, plus ``--config FILE``.

Shared by ``train_scripts/train_dreambooth.py`` (``accelerate launch``) and ``persam-dreambooth train``, so both
accept exactly the same flags. Precedence: dataclass defaults < ``--config`` file (YAML/TOML) < flags.

``--reference_box`` and ``--reference_point`` take their numbers comma-separated, as ``persam-dreambooth segment
--ref-box`` does (``--reference_box 60,40,420,470``), or space-separated (``--reference_box 60 40 420 470``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

from persam_dreambooth.config import add_dataclass_arguments, parse_config
from persam_dreambooth.training.config import TrainConfig

__all__ = ["add_train_arguments", "config_from_args", "parse_numbers"]

#: Fields given as pixel coordinates, and their form in messages.
_COORDINATES = {"reference_box": "x0,y0,x1,y1", "reference_point": "x,y"}


def parse_numbers(text: str, arg_name: str, form: str) -> list[float]:
    """The finite numbers of ``text``, separated by commas and/or spaces (``"60,40,420,470"``, ``"60 40"``).

    Raises:
        ValueError: a part is not a finite number.
    """
    parts = [part for part in re.split(r"[\s,]+", text.strip()) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"`{arg_name}` must be numbers {form} (comma- or space-separated), got {text!r}.")
    return values


def _coordinate_type(name: str, form: str):
    def parse(text: str) -> list[float]:
        try:
            return parse_numbers(text, f"--{name}", form)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = form
    return parse


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config`` and one flag per :class:`TrainConfig` field to ``parser``; return it."""
    parser.add_argument(
        "--config", default=None, metavar="FILE",
        help="YAML or TOML file with TrainConfig keys (unknown keys are errors); flags override it.",
    )
    add_dataclass_arguments(parser, TrainConfig, skip=(*_COORDINATES, "instance_video"))
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}
    parser.add_argument("--instance_video", action="append", default=None, metavar="FILE",
                        help=f"{helps['instance_video']} (default: None)")
    for name, form in _COORDINATES.items():
        parser.add_argument(
            f"--{name}", nargs="+", type=_coordinate_type(name, form), default=None, metavar=form.upper(),
            help=f"{helps[name]} Comma-separated ({form}) or space-separated. (default: None)",
        )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated :class:`TrainConfig` of parsed arguments (raises ``ConfigError`` naming the key)."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays as parsed
    for name in _COORDINATES:
        groups = getattr(args, name, None)
        if groups is not None:  # ["60,40", "420,470"] -> [[60, 40], [420, 470]] -> [60, 40, 420, 470]
            setattr(args, name, [value for group in groups for value in group])
    return parse_config(TrainConfig, args, args.config)
