"""``persam-dreambooth compare``: does masking help? Generate, score and report trained runs against the base model."""

from __future__ import annotations

import argparse
import logging

from persam_dreambooth.cli.generate import _flag, add_generation_flags

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare trained runs (masked vs vanilla) with DINO, CLIP and background metrics",
        description="Generate the DreamBooth prompt set with identical seeds for the base model and every run, "
        "score DINO, CLIP-I, CLIP-T, masked DINO and background leakage, and write metrics.json, metrics.md, "
        "side-by-side grids and report.html. With --train, first train a masked and a vanilla (mask_source none) "
        "run from one training config.",
    )
    parser.add_argument("--pretrained_model_name_or_path", "--pretrained-model-name-or-path",
                        dest="pretrained_model_name_or_path", default=None,
                        help="base model; every run must have been trained from it (default: the runs' own)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME=FOLDER",
                        help="training output folders, e.g. masked=out/masked vanilla=out/vanilla")
    parser.add_argument("--instance_data_dir", "--instance-data-dir", dest="instance_data_dir", required=True,
                        help="the subject's real photos (the ones the runs were trained on)")
    _flag(parser, "class_noun", required=True, help="class noun for the prompts, e.g. dog")
    _flag(parser, "identifier", default=None, help="rare-token identifier (default: from the runs' instance_prompt)")
    _flag(parser, "prompt_set", default="live",
          help="live (25 live-subject prompts), object (25 object prompts) or a template file: one template per "
          "line with {} for '<identifier> <class noun>', optionally 'group | template'")
    _flag(parser, "num_images_per_prompt", type=int, default=4, help="images per prompt and run (default: 4)")
    add_generation_flags(parser)
    _flag(parser, "dino_model", default="facebook/dino-vits16", help="DINO model id or local folder")
    _flag(parser, "clip_model", default="openai/clip-vit-base-patch32", help="CLIP model id or local folder")
    parser.add_argument("--background-metrics", dest="background_metrics",
                        action=argparse.BooleanOptionalAction, default=True,
                        help="masked DINO and background leakage (needs SAM; default: on)")
    # --sam-model as in `segment` and `eval-perseg`; --sam-model-type / --sam_model_type (the training config's
    # key) are accepted too.
    parser.add_argument("--sam-model", "--sam-model-type", "--sam_model_type", dest="sam_model_type", default=None,
                        metavar="TYPE",
                        help="SAM model type for PerSAM: vit_h, vit_l, vit_b (default: vit_h; with --train: the "
                        "training config's sam_model_type)")
    _flag(parser, "sam_checkpoint", default=None,
          help="SAM checkpoint file (default: the cached official one; with --train: the training config's)")
    _flag(parser, "reference_image", default=None, help="PerSAM reference image (default: first instance image)")
    _flag(parser, "reference_mask", default=None, help="its mask (default: that image's training mask)")
    _flag(parser, "instance_mask_dir", default=None, help="masks of the instance images (default: a run's masks/)")
    train = parser.add_argument_group("--train mode: train a masked and a vanilla run first")
    train.add_argument("--train", action="store_true",
                       help="train both runs (same config, seeds and steps; vanilla has mask_source none) first")
    _flag(train, "train_config", default=None, help="training config (YAML/TOML) for both runs")
    _flag(train, "max_train_steps", type=int, default=None, help="override the config's max_train_steps")
    _flag(parser, "output_dir", required=True, help="report folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.evaluation.compare import CompareConfig, compare, parse_runs

    settings = {
        k: getattr(args, k)
        for k in ("pretrained_model_name_or_path", "instance_data_dir", "class_noun", "identifier", "prompt_set",
                  "num_images_per_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width",
                  "lora_scale", "batch_size", "device", "dtype", "dino_model", "clip_model", "background_metrics",
                  "sam_model_type", "sam_checkpoint", "reference_image", "reference_mask", "instance_mask_dir",
                  "output_dir")
        if getattr(args, k) is not None or k not in ("sam_model_type", "sam_checkpoint")
    }
    if args.train:
        from persam_dreambooth.evaluation.train_compare import train_and_compare

        if args.runs:
            raise ValueError("`--runs` and `--train` exclude each other: --train makes the runs itself.")
        if not args.train_config:
            raise ValueError("`--train` needs `--train-config FILE` (the training config shared by both runs).")
        result = train_and_compare(args.train_config, settings, max_train_steps=args.max_train_steps)
    else:
        if args.train_config or args.max_train_steps is not None:
            raise ValueError("`--train-config` and `--max-train-steps` only apply with `--train`.")
        if not args.runs:
            raise ValueError("`--runs NAME=FOLDER ...` is required (or `--train` to make the runs).")
        result = compare(CompareConfig(runs=parse_runs(args.runs), **settings))
    logging.getLogger(__name__).info("Report: %s", result.output_dir / "report.html")
    return 0
