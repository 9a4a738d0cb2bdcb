"""Command-line flags of the trainer: one ``--field`` per :class:`TrainConfig` field, plus ``--config FILE``.

Shared by ``train_scripts/train_dreambooth.py`` (``accelerate launch``) and ``persam-dreambooth train``, so both
accept exactly the same flags. Precedence: dataclass defaults < ``--config`` file (YAML/TOML) < flags.
"""

from __future__ import annotations

import argparse

from persam_dreambooth.config import add_dataclass_arguments, parse_config
from persam_dreambooth.training.config import TrainConfig

__all__ = ["add_train_arguments", "config_from_args"]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config`` and one flag per :class:`TrainConfig` field to ``parser``; return it."""
    parser.add_argument(
        "--config", default=None, metavar="FILE",
        help="YAML or TOML file with TrainConfig keys (unknown keys are errors); flags override it.",
    )
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated :class:`TrainConfig` of parsed arguments (raises ``ConfigError`` naming the key)."""
    return parse_config(TrainConfig, args, args.config)
