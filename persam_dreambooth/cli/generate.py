"""``persam-dreambooth generate``: images from a base model + trained LoRA (or a fine-tuned pipeline).

The flags are the fields of :class:`~persam_dreambooth.generation.config.GenerationConfig` (``--num-images``, with
``--num_images`` accepted too); ``--config FILE`` reads them from YAML/TOML, flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from persam_dreambooth.config import add_dataclass_arguments, flag_name
    from persam_dreambooth.generation.config import PROMPTS_FILE_FLAG, GenerationConfig

    parser = subparsers.add_parser(
        "generate",
        help="generate images with a trained LoRA / model",
        description="Generate num-images images per prompt (image i with seed + i), a grid per prompt and "
        "generation.jsonl. Resumable: existing images made with the same settings are kept.",
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML file of these settings")
    # --prompt is repeatable (--prompt a --prompt b); --lora and --model exclude each other.
    parser.add_argument(flag_name(GenerationConfig, "prompts"), dest="prompts", action="append", default=None,
                        metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument(PROMPTS_FILE_FLAG, "--prompts_file", dest="prompts_file", default=None, metavar="FILE",
                        help="text file, one prompt per line (# comments)")
    others = [f.name for f in dataclasses.fields(GenerationConfig) if f.name not in ("lora", "model")]
    add_dataclass_arguments(parser.add_mutually_exclusive_group(), GenerationConfig, skip=others, dashes=True)
    add_dataclass_arguments(parser, GenerationConfig, skip=("prompts", "lora", "model"), dashes=True,
                            underscore_aliases=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.generation import GenerationConfig, generate, read_prompts_file

    if args.prompts_file:
        args.prompts = [*(args.prompts or []), *read_prompts_file(args.prompts_file)]
    if args.prompts is None and args.config is None:
        args.prompts = []  # GenerationConfig then says how to give prompts
    result = generate(parse_config(GenerationConfig, args, args.config))
    logging.getLogger(__name__).info(
        "%d image(s) generated, %d reused, in %s", result.num_generated, result.num_reused, result.output_dir
    )
    return 0
