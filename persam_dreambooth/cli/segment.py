"""``persam-dreambooth segment``: find one reference object in many photos with PerSAM or PerSAM-F.

    persam-dreambooth segment --ref-image R.jpg [R2.jpg ...] (--ref-mask M.png [M2.png ...] | --ref-box x0,y0,x1,y1 ...
        | --ref-point x,y ...) --images DIR_OR_FILES... --output OUT [--method persam|persam-f] [--max-instances K]
        [--batch-size N] [--dtype float32|bfloat16|float16] [--cache-dir DIR] [--overwrite]
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu]

Several GPUs / machines: ``accelerate launch -m persam_dreambooth segment ...`` (photos are split between the
processes). Everything is validated before anything is written; see ``docs/segmentation.md`` and
``docs/segmentation_album.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "validate"]

logger = logging.getLogger(__name__)

METHODS = ("persam", "persam-f")
PERSAM_F_STEPS, PERSAM_F_LR = 1000, 1e-3  # the paper's fit (persam_method.md §4.4)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``segment`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment a reference object in photos (PerSAM / PerSAM-F)",
        description="Segment the object shown in reference images (given by masks, boxes or clicks) in other "
        "photos with PerSAM (training-free) or PerSAM-F (2 fitted weights). Writes <stem>.png (0/255 mask), "
        "<stem>_overlay.jpg, results.jsonl and run.json into --output; a rerun resumes.",
    )
    ref = parser.add_argument_group("reference")
    ref.add_argument("--ref-image", required=True, nargs="+", action="extend", metavar="PATH",
                     help="the reference photo(s); several = several shots of the same object")
    prompt = ref.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ref-mask", nargs="+", action="extend", metavar="PATH",
                        help="mask of the object in each reference photo, in --ref-image order (same sizes)")
    prompt.add_argument("--ref-box", nargs="+", action="extend", metavar="X0,Y0,X1,Y1",
                        help="one box per reference photo, in pixels (repeat the flag or list them); SAM makes "
                        "the reference masks")
    prompt.add_argument("--ref-point", nargs="+", action="extend", metavar="X,Y",
                        help="one click per reference photo, in pixels; SAM makes the reference masks")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                        help="a folder of photos, or photo files")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="output folder (created if missing; a rerun skips photos already done)")
    parser.add_argument("--method", default="persam", metavar="NAME",
                        help="persam (training-free, default) or persam-f (fits 2 scale weights on the reference)")
    inst = parser.add_argument_group("several instances per photo")
    inst.add_argument("--max-instances", default=None, metavar="K",
                      help="find up to K instances per photo: <stem>_inst1.png... plus their union <stem>.png")
    inst.add_argument("--similarity-threshold", default=None, metavar="T",
                      help="stop when the next candidate's similarity is below T (in [-1, 1]; default 0.65; needs "
                      "--max-instances)")
    inst.add_argument("--overlap-iou", default=None, metavar="T",
                      help="drop a new mask whose IoU with an earlier one exceeds T and stop (in [0, 1]; default "
                      "0.8; needs --max-instances)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", default="1", metavar="N",
                       help="photos encoded (and decoded) together (default 1: the faithful one-at-a-time path)")
    speed.add_argument("--dtype", default="float32", metavar="DTYPE",
                       help="image-encoder autocast: float32 (default, exact), bfloat16 or float16")
    speed.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="keep image embeddings here; photos seen before (same pixels, model, dtype) skip the "
                       "encoder")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every photo in --output, even if results made with other settings are there")
    model = parser.add_argument_group("model")
    model.add_argument("--sam-model", default="vit_h", metavar="TYPE",
                       help="SAM model type: vit_h (default), vit_l, vit_b")
    model.add_argument("--sam-checkpoint", default=None, metavar="PATH",
                       help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    model.add_argument("--device", default=None, metavar="DEVICE",
                       help="cuda, cuda:N or cpu (default: cuda if available; under accelerate launch, each "
                       "process's own GPU)")
    parser.set_defaults(func=run)
    return parser


# ------------------------------------------------------------------------------------------------ parsing
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
        swapped = " (the corners look swapped: give the top-left corner x0,y0 first)" if x0 > x1 or y0 > y1 else ""
        raise ValueError(
            f"`{arg_name}` must lie inside the reference image (W x H = {width} x {height}) with x0 < x1 and y0 < y1, "
            f"i.e. 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}; got {text!r}{swapped}."
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


def parse_int(text: Any, arg_name: str, minimum: int = 1) -> int:
    """``text`` as an int >= ``minimum``, else ``ValueError`` naming the flag and the value."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"`{arg_name}` must be an integer >= {minimum}, got {text!r}.")
    return value


def parse_unit(text: Any, arg_name: str, low: float, high: float) -> float:
    """``text`` as a finite float in ``[low, high]``, else ``ValueError`` naming the flag and the value."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ValueError(f"`{arg_name}` must be a number in [{low:g}, {high:g}], got {text!r}.")
    return value


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class _Plan:
    ref_paths: list[str]
    ref_images: list[Any]  # (H, W, 3) uint8 each
    ref_masks: list[Any] | None  # (H, W) bool each, or None (boxes/points)
    boxes: list[tuple[float, float, float, float]] | None
    points: list[tuple[float, float]] | None
    images: list[Path]
    stems: list[str]
    output: Path
    batch_size: int
    max_instances: int | None
    similarity_threshold: float | None
    overlap_iou: float | None
    cache_dir: Path | None


def _nth(arg_name: str, index: int, total: int) -> str:
    return arg_name if total == 1 else f"{arg_name} #{index + 1}"


def _references(args: argparse.Namespace) -> tuple[list, list | None, list | None, list | None]:
    from persam_dreambooth.data.images import check_same_size, load_image, load_mask

    count = len(args.ref_image)
    flag, given = next((f, v) for f, v in (("--ref-mask", args.ref_mask), ("--ref-box", args.ref_box),
                                           ("--ref-point", args.ref_point)) if v is not None)
    if len(given) != count:
        raise ValueError(
            f"`{flag}` gives {len(given)} value(s) but `--ref-image` gives {count} image(s); give exactly one per "
            "reference image, in the same order."
        )
    images = [load_image(p, _nth("--ref-image", i, count)) for i, p in enumerate(args.ref_image)]
    masks = boxes = points = None
    if args.ref_mask is not None:
        masks = []
        for i, (image, path) in enumerate(zip(images, args.ref_mask, strict=True)):
            mask = load_mask(path, _nth("--ref-mask", i, count))
            check_same_size(image.shape, mask.shape, _nth("--ref-image", i, count), _nth("--ref-mask", i, count))
            if not mask.any():
                raise ValueError(f"`{_nth('--ref-mask', i, count)}` {path!r} is empty: it has no foreground "
                                 "(nonzero) pixel.")
            masks.append(mask)
    elif args.ref_box is not None:
        boxes = [parse_box(t, img.shape[1], img.shape[0], _nth("--ref-box", i, count))
                 for i, (img, t) in enumerate(zip(images, args.ref_box, strict=True))]
    else:
        points = [parse_point(t, img.shape[1], img.shape[0], _nth("--ref-point", i, count))
                  for i, (img, t) in enumerate(zip(images, args.ref_point, strict=True))]
    return images, masks, boxes, points


def reference_mask_stems(count: int) -> list[str]:
    """Output names of SAM-made reference masks: ``reference_mask`` for one reference, else ``reference_mask_<i>``."""
    from persam_dreambooth.segmentation.album import REFERENCE_MASK_STEM

    return [REFERENCE_MASK_STEM] if count == 1 else [f"{REFERENCE_MASK_STEM}_{i}" for i in range(1, count + 1)]


def validate(args: argparse.Namespace) -> _Plan:
    """Check every argument and the reference files; nothing is written. Raises with a message naming the flag.

    The photos themselves are decoded later by ``prepare_album`` (only those still to do, split between processes).
    """
    from persam_dreambooth.data.images import check_unique_stems, list_images
    from persam_dreambooth.segmentation.album import check_instance_stems
    from persam_dreambooth.segmentation.encoding import check_encoder_dtype
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, resolve_device
    from persam_dreambooth.utils.io import check_output_dir

    if args.method not in METHODS:
        raise ValueError(f"`--method` must be one of {list(METHODS)}, got {args.method!r}.")
    if args.sam_model not in SAM_BUILDERS:
        raise ValueError(f"`--sam-model` must be one of {sorted(SAM_BUILDERS)}, got {args.sam_model!r}.")
    if args.sam_checkpoint is not None:
        ckpt = Path(args.sam_checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"`--sam-checkpoint` file {str(ckpt)!r} does not exist.")
        if not ckpt.is_file():
            raise ValueError(f"`--sam-checkpoint` must be a file, but {str(ckpt)!r} is a folder.")
    elif SAM_BUILDERS[args.sam_model].checksum is None:
        raise ValueError(f"`--sam-checkpoint` is required for `--sam-model` {args.sam_model!r}: it has no official "
                         "checkpoint to download.")
    resolve_device(args.device, "--device")
    check_encoder_dtype(args.dtype, "--dtype")
    batch_size = parse_int(args.batch_size, "--batch-size")
    max_instances = None if args.max_instances is None else parse_int(args.max_instances, "--max-instances")
    for flag, value in (("--similarity-threshold", args.similarity_threshold), ("--overlap-iou", args.overlap_iou)):
        if value is not None and max_instances is None:
            raise ValueError(f"`{flag}` {value!r} applies only to several instances; add `--max-instances K`.")
    threshold = (None if args.similarity_threshold is None
                 else parse_unit(args.similarity_threshold, "--similarity-threshold", -1.0, 1.0))
    overlap = None if args.overlap_iou is None else parse_unit(args.overlap_iou, "--overlap-iou", 0.0, 1.0)
    if max_instances is not None:  # the values used, defaults included, go into run.json
        from persam_dreambooth.segmentation.multi_instance import DEFAULT_OVERLAP_IOU, DEFAULT_SIMILARITY_THRESHOLD

        threshold = DEFAULT_SIMILARITY_THRESHOLD if threshold is None else threshold
        overlap = DEFAULT_OVERLAP_IOU if overlap is None else overlap
    output = check_output_dir(args.output, "--output")
    cache_dir = None if args.cache_dir is None else check_output_dir(args.cache_dir, "--cache-dir")

    ref_images, ref_masks, boxes, points = _references(args)
    images = list_images(args.images, "--images")
    reserved = () if ref_masks is not None else reference_mask_stems(len(ref_images))
    stems = check_unique_stems(images, "--images", reserved=reserved)
    if max_instances is not None:
        check_instance_stems(images, "--images")
    return _Plan(list(args.ref_image), ref_images, ref_masks, boxes, points, images, stems, output, batch_size,
                 max_instances, threshold, overlap, cache_dir)


# ------------------------------------------------------------------------------------------------ running
def _process_state(device_arg: str | None) -> tuple[Any, Any]:
    """``(accelerate.PartialState, torch.device)`` for this process (its own GPU under ``accelerate launch``)."""
    import torch
    from accelerate import PartialState

    from persam_dreambooth.segmentation.sam import resolve_device

    device = resolve_device(device_arg, "--device")
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes == 1:
        return state, device
    if device.type == "cpu":
        return state, torch.device("cpu")
    if device_arg not in (None, "cuda"):
        raise ValueError(
            f"`--device` {device_arg!r} names one device, but {state.num_processes} processes were launched; leave "
            "`--device` out (or give 'cuda') so that each process uses its own GPU."
        )
    return state, state.device


def _mask_sha256(mask: Any) -> str:
    import numpy as np

    digest = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    digest.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return digest.hexdigest()


def _settings(args: argparse.Namespace, plan: _Plan, weights: str) -> dict[str, Any]:
    from persam_dreambooth.segmentation.embedding_cache import pixels_sha256

    references = []
    for i, image in enumerate(plan.ref_images):
        references.append({
            "image_sha256": pixels_sha256(image),
            "mask_sha256": None if plan.ref_masks is None else _mask_sha256(plan.ref_masks[i]),
            "box": None if plan.boxes is None else list(plan.boxes[i]),
            "point": None if plan.points is None else list(plan.points[i]),
        })
    settings: dict[str, Any] = {
        "method": args.method, "sam_model": args.sam_model, "sam_weights_sha256": weights, "dtype": args.dtype,
        "references": references, "max_instances": plan.max_instances,
        "similarity_threshold": plan.similarity_threshold, "overlap_iou": plan.overlap_iou,
    }
    if args.method == "persam-f":
        settings["persam_f"] = {"steps": PERSAM_F_STEPS, "lr": PERSAM_F_LR}
    return settings


def _reference_masks(segmenter: Any, plan: _Plan, embeddings: list) -> list:
    from persam_dreambooth.segmentation.persam import mask_from_prompt

    if plan.ref_masks is not None:
        return plan.ref_masks
    masks = []
    count = len(embeddings)
    for i, embedding in enumerate(embeddings):
        box = None if plan.boxes is None else plan.boxes[i]
        point = None if plan.points is None else plan.points[i]
        mask, score = mask_from_prompt(segmenter.predictor, embedding, box_xyxy=box, point_xy=point)
        flag = _nth("--ref-box" if box is not None else "--ref-point", i, count)
        if not mask.any():
            raise ValueError(f"`{flag}`: SAM found no object at {box or point} in the reference image; try another "
                             "box/point or give --ref-mask.")
        logger.info("reference mask from %s: %d pixels, predicted IoU %.3f", flag, int(mask.sum()), score)
        masks.append(mask)
    return masks


def _save_reference_masks(output: Path, plan: _Plan, masks: list) -> None:
    from persam_dreambooth.segmentation.album import save_mask_png
    from persam_dreambooth.segmentation.visualize import draw_overlay
    from persam_dreambooth.utils.io import atomic_save_image

    if plan.ref_masks is not None:
        return
    for i, (stem, image, mask) in enumerate(zip(reference_mask_stems(len(masks)), plan.ref_images, masks,
                                                strict=True)):
        save_mask_png(mask, output / f"{stem}.png")
        point = None if plan.points is None else plan.points[i]
        pts = None if point is None else [[int(point[0]), int(point[1])]]
        box = None if plan.boxes is None else plan.boxes[i]
        overlay = draw_overlay(image, mask, pts, None if pts is None else [1], box_xyxy=box)
        atomic_save_image(overlay, output / f"{stem}_overlay.jpg", quality=90)


def run(args: argparse.Namespace) -> int:
    """Validate, plan the resume, load SAM, set the reference(s), segment (this process's share). Exit code."""
    from persam_dreambooth import __version__
    from persam_dreambooth.segmentation.album import AlbumOptions
    from persam_dreambooth.segmentation.album_run import AlbumJob, finish_complete_album, prepare_album, run_album
    from persam_dreambooth.segmentation.embedding_cache import EmbeddingCache, EncoderIdentity, weights_sha256
    from persam_dreambooth.segmentation.encoding import BatchEncoder
    from persam_dreambooth.segmentation.sam import load_sam

    plan = validate(args)
    state, device = _process_state(args.device)
    weights = weights_sha256(checkpoint=args.sam_checkpoint,
                             official_type=None if args.sam_checkpoint else args.sam_model)
    job = AlbumJob(
        images=plan.images, stems=plan.stems, output=plan.output, settings=_settings(args, plan, weights),
        max_instances=plan.max_instances, overwrite=bool(args.overwrite), output_arg="--output",
        overwrite_arg="--overwrite", images_arg="--images",
    )
    album = prepare_album(job, state)
    if not album.todo:
        finish_complete_album(job, album, state)
        logger.info("all %d photo(s) in %s are already complete; nothing to do", len(job.images), job.output)
        return 0

    sam = load_sam(args.sam_model, args.sam_checkpoint, device)
    if args.method == "persam-f":
        from persam_dreambooth.segmentation.persam_f import PerSAMF

        segmenter = PerSAMF(sam, steps=PERSAM_F_STEPS, lr=PERSAM_F_LR)
    else:
        from persam_dreambooth.segmentation.persam import PerSAM

        segmenter = PerSAM(sam)
    cache = None
    if plan.cache_dir is not None:
        identity = EncoderIdentity(model_type=args.sam_model, weights_sha256=weights,
                                   img_size=int(sam.image_encoder.img_size), encoder_dtype=args.dtype)
        cache = EmbeddingCache(plan.cache_dir, identity)
    encoder = BatchEncoder(segmenter.predictor, args.dtype, cache)
    ref_embeddings: list = []
    for start in range(0, len(plan.ref_images), plan.batch_size):
        ref_embeddings += encoder.encode_images(plan.ref_images[start:start + plan.batch_size], "--ref-image")
    ref_masks = _reference_masks(segmenter, plan, ref_embeddings)
    if len(ref_embeddings) == 1:  # one shot: exactly the paper's reference (PerSAM-F fits its weights here)
        segmenter.set_reference_embedding(ref_embeddings[0], ref_masks[0])
    else:  # several shots: the target is pooled over all of them (and PerSAM-F fits on all jointly)
        segmenter.set_reference_embedding(ref_embeddings, ref_masks)

    extra: dict[str, Any] = {}
    if args.method == "persam-f":
        extra["scale_weights"] = [round(float(w), 6) for w in segmenter.scale_weights]
    job.info = {
        "package_version": __version__, "reference_images": plan.ref_paths, "batch_size": plan.batch_size,
        "device": str(device), "num_processes": state.num_processes, "cache_dir": args.cache_dir, **extra,
    }
    options = AlbumOptions(batch_size=plan.batch_size, max_instances=plan.max_instances,
                           similarity_threshold=plan.similarity_threshold, overlap_iou=plan.overlap_iou,
                           progress=state.is_main_process)
    rows = run_album(segmenter, job, album, encoder, options, state,
                     before_segmenting=lambda out: _save_reference_masks(out, plan, ref_masks), extra_fields=extra)
    if cache is not None:
        logger.info("embedding cache %s: %d hit(s), %d miss(es), %d written, %d discarded", plan.cache_dir,
                    cache.hits, cache.misses, cache.writes, cache.discarded)
    if state.is_main_process:
        mean_score = sum(r["score"] for r in rows) / max(1, len(rows))
        logger.info("segmented %d photo(s) (%d this run, %d image-encoder call(s)) into %s (mean predicted IoU %.3f)",
                    len(rows), len(album.todo), encoder.encoder_calls, job.output, mean_score)
    return 0
