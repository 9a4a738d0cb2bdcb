"""``persam-dreambooth``: one command line, one sub-command per job.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (``args -> exit code``). Heavy imports (torch, diffusers) happen inside ``func`` so ``--help`` is
fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from persam_dreambooth.utils.log import warnings_as_log_lines

__all__ = ["main", "build_parser"]

# module name -> sub-command(s) it registers; order = order in --help
COMMAND_MODULES = (
    "segment", "eval_perseg", "train", "generate", "compare", "ui", "segment_video", "eval_davis", "frames",
)


def build_parser() -> argparse.ArgumentParser:
    from persam_dreambooth import __version__

    parser = argparse.ArgumentParser(
        prog="persam-dreambooth",
        description="PerSAM / PerSAM-F personalised segmentation and masked-loss DreamBooth.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"persam_dreambooth.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warnings_as_log_lines()
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, TypeError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"persam-dreambooth {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201 - CLI boundary
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
