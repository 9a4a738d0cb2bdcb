"""``persam-dreambooth segment``: find one reference object in many photos with PerSAM.

    persam-dreambooth segment --ref-image R.jpg (--ref-mask M.png | --ref-box x0,y0,x1,y1 | --ref-point x,y)
        --images DIR_OR_FILES... --output OUT [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu]

Everything is validated before anything is written; see ``docs/segmentation.md``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``segment`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment a reference object in photos (PerSAM, training-free)",
        description="Segment the object shown in a reference image (given by a mask, a box or a click) in other "
        "photos with PerSAM. Writes <stem>.png (0/255 mask), <stem>_overlay.jpg and results.jsonl into --output.",
    )
    parser.add_argument("--ref-image", required=True, metavar="PATH", help="the reference photo")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ref-mask", metavar="PATH",
                        help="mask of the object in the reference photo (same size; nonzero/alpha = object)")
    prompt.add_argument("--ref-box", metavar="X0,Y0,X1,Y1",
                        help="box around the object in reference-photo pixels; SAM makes the reference mask")
    prompt.add_argument("--ref-point", metavar="X,Y",
                        help="one click on the object in reference-photo pixels; SAM makes the reference mask")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                        help="a folder of photos, or photo files")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--sam-model", default="vit_h", metavar="TYPE",
                        help="SAM model type: vit_h (default), vit_l, vit_b")
    parser.add_argument("--sam-checkpoint", default=None, metavar="PATH",
                        help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.set_defaults(func=run)
    return parser


def _parse_numbers(text: str, count: int, arg_name: str, form: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"`{arg_name}` must be {count} comma-separated numbers {form}, got {text!r}.")
    return values


def parse_box(text: str, width: int, height: int, arg_name: str = "--ref-box") -> tuple[float, float, float, float]:
    """Parse ``"x0,y0,x1,y1"`` (pixels) and check ``0 <= x0 < x1 <= W``, ``0 <= y0 < y1 <= H``."""
    x0, y0, x1, y1 = _parse_numbers(text, 4, arg_name, "x0,y0,x1,y1")
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"`{arg_name}` must lie inside the reference image (W x H = {width} x {height}) with x0 < x1 and y0 < y1, "
            f"i.e. 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}; got {text!r}."
        )
    return x0, y0, x1, y1


def parse_point(text: str, width: int, height: int, arg_name: str = "--ref-point") -> tuple[float, float]:
    """Parse ``"x,y"`` (pixels, x = column) and check ``0 <= x < W``, ``0 <= y < H``."""
    x, y = _parse_numbers(text, 2, arg_name, "x,y")
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(
            f"`{arg_name}` must lie inside the reference image (W x H = {width} x {height}), i.e. 0 <= x < {width} "
            f"and 0 <= y < {height}; got {text!r}."
        )
    return x, y


@dataclass
class _Plan:
    ref_image: Any  # (H, W, 3) uint8
    ref_mask: Any  # (H, W) bool or None
    box: tuple[float, float, float, float] | None
    point: tuple[float, float] | None
    images: list[Path]
    stems: list[str]
    output: Path


def _check_output(path: Path) -> None:
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            raise NotADirectoryError(
                f"`--output` must be a folder, but {str(candidate)!r} is an existing file"
                + ("" if candidate == path else f" (a parent of {str(path)!r})") + "; choose another path."
            )


def validate(args: argparse.Namespace) -> _Plan:
    """Check every argument and input file; nothing is written. Raises with a message naming the argument."""
    from persam_dreambooth.data.images import check_same_size, list_images, load_image, load_mask, open_image
    from persam_dreambooth.segmentation.album import REFERENCE_MASK_STEM, check_unique_stems
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, resolve_device

    if args.sam_model not in SAM_BUILDERS:
        raise ValueError(f"`--sam-model` must be one of {sorted(SAM_BUILDERS)}, got {args.sam_model!r}.")
    if args.sam_checkpoint is not None:
        ckpt = Path(args.sam_checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"`--sam-checkpoint` file {str(ckpt)!r} does not exist.")
        if not ckpt.is_file():
            raise ValueError(f"`--sam-checkpoint` must be a file, but {str(ckpt)!r} is a folder.")
    resolve_device(args.device, "--device")
    output = Path(args.output)
    _check_output(output)

    ref_image = load_image(args.ref_image, "--ref-image")
    height, width = ref_image.shape[:2]
    ref_mask = box = point = None
    if args.ref_mask is not None:
        ref_mask = load_mask(args.ref_mask, "--ref-mask")
        check_same_size(ref_image.shape, ref_mask.shape, "--ref-image", "--ref-mask")
        if not ref_mask.any():
            raise ValueError(f"`--ref-mask` {args.ref_mask!r} is empty: it has no foreground (nonzero) pixel.")
    elif args.ref_box is not None:
        box = parse_box(args.ref_box, width, height)
    else:
        point = parse_point(args.ref_point, width, height)

    images = list_images(args.images, "--images")
    reserved = () if ref_mask is not None else (REFERENCE_MASK_STEM,)
    stems = check_unique_stems(images, "--images", reserved=reserved)
    for path in images:  # decode every photo now, so a bad file stops the run before anything is written
        open_image(path, "--images").close()
    return _Plan(ref_image, ref_mask, box, point, images, stems, output)


def run(args: argparse.Namespace) -> int:
    """Validate, load SAM, make/set the reference, segment every image. Returns the exit code."""
    from persam_dreambooth.segmentation.album import REFERENCE_MASK_STEM, save_mask_png, segment_images
    from persam_dreambooth.segmentation.persam import PerSAM, mask_from_prompt
    from persam_dreambooth.segmentation.sam import load_sam
    from persam_dreambooth.segmentation.visualize import draw_overlay
    from persam_dreambooth.utils.io import atomic_save_image, ensure_output_dir

    plan = validate(args)
    sam = load_sam(args.sam_model, args.sam_checkpoint, args.device)
    persam = PerSAM(sam)
    embedding = persam.encode(plan.ref_image, "--ref-image")
    ref_mask = plan.ref_mask
    if ref_mask is None:
        ref_mask, score = mask_from_prompt(persam.predictor, embedding, box_xyxy=plan.box, point_xy=plan.point)
        which = "--ref-box" if plan.box is not None else "--ref-point"
        if not ref_mask.any():
            raise ValueError(
                f"`{which}`: SAM found no object at {args.ref_box or args.ref_point!r} in the reference image; "
                "try another box/point or give --ref-mask."
            )
        logger.info("reference mask from %s: %d pixels, predicted IoU %.3f", which, int(ref_mask.sum()), score)
    persam.set_reference_embedding(embedding, ref_mask)

    output = ensure_output_dir(plan.output, "--output")
    if plan.ref_mask is None:
        save_mask_png(ref_mask, output / f"{REFERENCE_MASK_STEM}.png")
        pts = None if plan.point is None else [[int(plan.point[0]), int(plan.point[1])]]
        overlay = draw_overlay(plan.ref_image, ref_mask, pts, None if pts is None else [1], box_xyxy=plan.box)
        atomic_save_image(overlay, output / f"{REFERENCE_MASK_STEM}_overlay.jpg", quality=90)
    records = segment_images(persam, plan.images, output, plan.stems)
    mean_score = sum(r["score"] for r in records) / max(1, len(records))
    logger.info("segmented %d image(s) into %s (mean predicted IoU %.3f)", len(records), output, mean_score)
    return 0
