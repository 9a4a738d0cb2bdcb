"""``persam-dreambooth generate``: images from a base model + trained LoRA (or a fine-tuned pipeline)."""

from __future__ import annotations

import argparse
import logging

__all__ = ["register", "run"]


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--name-with-dashes`` with ``--name_with_underscores`` as an alias."""
    dashed, underscored = f"--{name.replace('_', '-')}", f"--{name}"
    flags = [dashed] if dashed == underscored else [dashed, underscored]
    parser.add_argument(*flags, dest=name, **kwargs)


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Sampling flags shared by ``generate`` and ``compare``."""
    _flag(parser, "seed", type=int, default=0, help="seed of image 0 of every prompt; image i uses seed + i")
    _flag(parser, "num_inference_steps", type=int, default=30, help="denoising steps (default: 30)")
    _flag(parser, "guidance_scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    _flag(parser, "height", type=int, default=None, help="image height, a multiple of 8 and of the VAE scale factor")
    _flag(parser, "width", type=int, default=None, help="image width, a multiple of 8 and of the VAE scale factor")
    _flag(parser, "lora_scale", type=float, default=1.0, help="LoRA strength (default: 1.0)")
    _flag(parser, "batch_size", type=int, default=4,
          help="images per pipeline call; does not change the starting noise")
    _flag(parser, "device", default=None, help="cuda, cpu, mps, ... (default: best available)")
    _flag(parser, "dtype", default="float32", choices=("float32", "float16", "bfloat16"),
          help="weights and compute dtype (default: float32)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with a trained LoRA / model",
        description="Generate num-images images per prompt (image i with seed + i), a grid per prompt and "
        "generation.jsonl. Resumable: existing images made with the same settings are kept.",
    )
    parser.add_argument("--pretrained_model_name_or_path", "--pretrained-model-name-or-path",
                        dest="pretrained_model_name_or_path", default=None,
                        help="base model (Hub id or folder); default: the --lora folder's config.resolved.yaml")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--lora", default=None, help="training output folder with pytorch_lora_weights.safetensors")
    weights.add_argument("--model", default=None, help="fully fine-tuned pipeline folder (model_index.json)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    _flag(parser, "prompts_file", default=None, help="text file, one prompt per line (# comments)")
    _flag(parser, "negative_prompt", default=None, help="negative prompt for every image")
    _flag(parser, "num_images", type=int, default=4, help="images per prompt (default: 4)")
    add_generation_flags(parser)
    _flag(parser, "output_dir", required=True, help="folder for images/, grids/ and generation.jsonl")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.generation import generate, read_prompts_file

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise ValueError("Give at least one `--prompt` or a `--prompts-file`.")
    result = generate(
        prompts=prompts, output_dir=args.output_dir, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        lora=args.lora, model=args.model, lora_scale=args.lora_scale, num_images=args.num_images, seed=args.seed,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype,
    )
    logging.getLogger(__name__).info(
        "%d image(s) generated, %d reused, in %s", result.num_generated, result.num_reused, result.output_dir
    )
    return 0
