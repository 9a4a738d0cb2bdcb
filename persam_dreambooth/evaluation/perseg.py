"""PerSeg-layout evaluation: one reference per object, segment the rest, pooled mIoU and bIoU.

Layout (``docs/design/persam_method.md`` §6.1)::

    DATA/Images/<object>/<stem>.jpg
    DATA/Annotations/<object>/<stem>.png

For every object folder the reference is the image whose **stem** equals ``ref`` (default ``"00"``) and the tests are
all the other images, paired with their annotation **by stem** (the published script matched the reference by a
substring of the whole path and paired files by sorted position; both are fixed here, Decision 7).

Outputs under ``output``: ``masks/<object>/<stem>.png`` (L, 0/255), ``overlays/<object>/<stem>.jpg``,
``metrics.json`` (per class, per image and overall) and ``metrics.md`` (a Markdown table).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from persam_dreambooth.config import ConfigError, field_help, flag_name
from persam_dreambooth.data.images import (
    check_same_size,
    find_mask_for,
    list_images,
    load_image,
    load_mask,
    open_image,
)
from persam_dreambooth.evaluation.segmentation_metrics import (
    DEFAULT_DILATION_RATIO,
    PooledIoU,
    mean_over_classes,
)
from persam_dreambooth.utils.io import atomic_save_image, atomic_write_json, atomic_write_text, check_output_dir
from persam_dreambooth.utils.locks import lock_output_dir

__all__ = [
    "EvalPersegConfig", "PerSegObject", "check_perseg_files", "discover_perseg", "evaluate_perseg", "format_markdown",
    "run_eval_perseg",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PerSegObject:
    """One object folder: its reference pair and its test pairs, matched by stem."""

    name: str
    reference_image: Path
    reference_mask: Path
    tests: tuple[tuple[str, Path, Path], ...]  # (stem, image, annotation)


def discover_perseg(data: str | Path, ref: str = "00") -> list[PerSegObject]:
    """Read the PerSeg layout under ``data`` and check it completely before any work.

    Raises:
        FileNotFoundError: ``data``, ``Images/`` or ``Annotations/`` is missing, or an object lacks annotations.
        ValueError: an object has no image with stem ``ref``, no test image, or an image without an annotation.
    """
    data = Path(data)
    images_root, annotations_root = data / "Images", data / "Annotations"
    if not data.is_dir():
        raise FileNotFoundError(f"`--data` folder {str(data)!r} does not exist.")
    for root in (images_root, annotations_root):
        if not root.is_dir():
            raise FileNotFoundError(
                f"`--data` {str(data)!r} is not in the PerSeg layout: {str(root)!r} is missing "
                "(expected Images/<object>/NN.jpg and Annotations/<object>/NN.png)."
            )
    names = sorted(p.name for p in images_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(f"`--data`: {str(images_root)!r} holds no object folder.")
    objects = []
    for name in names:
        ann_dir = annotations_root / name
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"`--data`: object {name!r} has no annotation folder {str(ann_dir)!r}.")
        images = list_images(images_root / name, arg_name=f"--data Images/{name}")
        stems = [p.stem for p in images]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise ValueError(f"`--data`: object {name!r} has several images with the stem(s) {duplicates}.")
        pairs = []
        for img in images:
            ann = find_mask_for(img, ann_dir)
            if ann is None:
                raise ValueError(f"`--data`: image {str(img)!r} has no annotation with stem {img.stem!r} in "
                                 f"{str(ann_dir)!r}.")
            pairs.append((img.stem, img, ann))
        refs = [p for p in pairs if p[0] == ref]
        if not refs:
            raise ValueError(f"`--ref` {ref!r}: object {name!r} has no image with that stem (stems: {stems}).")
        tests = tuple(p for p in pairs if p[0] != ref)
        if not tests:
            raise ValueError(f"`--data`: object {name!r} has only the reference image; nothing to evaluate.")
        objects.append(PerSegObject(name, refs[0][1], refs[0][2], tests))
    return objects


def check_perseg_files(objects: list[PerSegObject]) -> None:
    """Decode every image and annotation of ``objects`` and check them, before any work. Writes nothing.

    Raises:
        FileNotFoundError, ValueError: an unreadable file, an annotation whose size differs from its image's (both
            sizes named), or an empty reference annotation (nothing to look for).
    """
    for obj in objects:
        pairs = [(obj.reference_image, obj.reference_mask)] + [(img, ann) for _, img, ann in obj.tests]
        for index, (img_path, ann_path) in enumerate(pairs):
            with open_image(img_path, f"--data {obj.name}/{img_path.name}") as img:
                image_hw = (img.height, img.width)
            mask = load_mask(ann_path, f"--data annotation {obj.name}/{ann_path.name}")
            check_same_size(image_hw, mask.shape, str(img_path), str(ann_path))
            if index == 0 and not mask.any():
                raise ValueError(f"`--data`: the reference annotation {str(ann_path)!r} of object {obj.name!r} is "
                                 "empty (no foreground pixel), so there is nothing to look for.")


def format_markdown(metrics: dict[str, Any]) -> str:
    """A Markdown table: one row per class (IoU, bIoU, accuracy in %, image count) and the overall means."""
    lines = [
        f"# PerSeg evaluation: {metrics['method']} (SAM {metrics['sam_model']}, reference `{metrics['ref']}`)",
        "",
        "| object | images | IoU | bIoU | Acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in metrics["classes"].items():
        lines.append(f"| {name} | {c['images']} | {c['iou']:.2f} | {c['biou']:.2f} | {c['acc']:.2f} |")
    o = metrics["overall"]
    lines.append(f"| **mean** | {sum(c['images'] for c in metrics['classes'].values())} | **{o['mIoU']:.2f}** | "
                 f"**{o['bIoU']:.2f}** | **{o['mAcc']:.2f}** |")
    lines += ["", f"IoU and bIoU are pooled over each object's test images (bIoU dilation ratio "
                  f"{metrics['dilation_ratio']}), then averaged over objects.", ""]
    return "\n".join(lines)


def evaluate_perseg(
    data: str | Path,
    output: str | Path,
    make_segmenter: Callable[[], Any],
    *,
    method: str = "persam",
    sam_model: str = "vit_h",
    ref: str = "00",
    dilation_ratio: float = DEFAULT_DILATION_RATIO,
    draw_overlay: Callable[[np.ndarray, Any], Image.Image] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a PerSAM-like segmenter on a PerSeg-layout folder; returns the ``metrics.json`` content.

    Args:
        make_segmenter: returns an object with ``set_reference(image, mask)`` and ``segment(image) -> Segmentation``
            (``PerSAM`` or ``PerSAMF``); called once, after every file was checked (:func:`check_perseg_files`) and
            before anything is written, the reference is reset per object.
        output: the output folder; locked for the run (:func:`~persam_dreambooth.utils.locks.lock_output_dir`), so a
            second run into it is refused with the holder's PID.
        draw_overlay: ``(image (H, W, 3) uint8, segmentation) -> PIL image``; no overlays when ``None``.
        extra: recorded under ``"settings"`` in ``metrics.json`` (e.g. PerSAM-F's weights per object).
    """
    objects = discover_perseg(data, ref)
    check_perseg_files(objects)
    output = check_output_dir(output, "--output")
    # One run per folder; a failure before anything is written (e.g. loading the model) leaves nothing behind.
    with lock_output_dir(output, "eval-perseg", "--output", tidy_on_error=True):
        return _evaluate(objects, data, output, make_segmenter(), method=method, sam_model=sam_model, ref=ref,
                         dilation_ratio=dilation_ratio, draw_overlay=draw_overlay, extra=extra)


def _evaluate(
    objects: list[PerSegObject], data: str | Path, output: Path, segmenter: Any, *, method: str, sam_model: str,
    ref: str, dilation_ratio: float, draw_overlay: Callable[[np.ndarray, Any], Image.Image] | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """:func:`evaluate_perseg`'s work, with the files checked, the segmenter made and the output folder locked."""
    per_class: dict[str, PooledIoU] = {}
    per_object_info: dict[str, dict[str, Any]] = {}
    total = sum(len(o.tests) for o in objects)
    with tqdm(total=total, desc=f"eval-perseg {method}", unit="img") as bar:
        for number, obj in enumerate(objects, start=1):
            bar.set_description(f"eval-perseg {method} {obj.name}")
            logger.info("object %d/%d %r: setting the reference, then %d test image(s)", number, len(objects),
                        obj.name, len(obj.tests))
            ref_image = load_image(obj.reference_image, "reference image")
            ref_mask = load_mask(obj.reference_mask, "reference annotation")
            check_same_size(ref_image.shape, ref_mask.shape, str(obj.reference_image), str(obj.reference_mask))
            segmenter.set_reference(ref_image, ref_mask)
            info: dict[str, Any] = {}
            weights = getattr(segmenter, "scale_weights", None)
            if weights is not None:
                info["scale_weights"] = [float(w) for w in np.asarray(weights, dtype=np.float64).ravel()]
            acc = PooledIoU(dilation_ratio=dilation_ratio)
            for stem, img_path, ann_path in obj.tests:
                image = load_image(img_path, f"{obj.name}/{img_path.name}")
                gt = load_mask(ann_path, f"{obj.name}/{ann_path.name}")
                check_same_size(image.shape, gt.shape, str(img_path), str(ann_path))
                start = time.perf_counter()
                seg = segmenter.segment(image)
                seconds = time.perf_counter() - start
                record = acc.add(seg.mask, gt, name=stem)
                record["seconds"] = seconds
                record["score"] = float(seg.score)
                atomic_save_image(Image.fromarray(seg.mask.astype(np.uint8) * 255, mode="L"),
                                  output / "masks" / obj.name / f"{stem}.png")
                if draw_overlay is not None:
                    atomic_save_image(draw_overlay(image, seg).convert("RGB"),
                                      output / "overlays" / obj.name / f"{stem}.jpg", quality=90)
                bar.update(1)
            per_class[obj.name] = acc
            per_object_info[obj.name] = info
    overall = mean_over_classes(per_class)
    metrics: dict[str, Any] = {
        "method": method,
        "sam_model": sam_model,
        "ref": ref,
        "dilation_ratio": dilation_ratio,
        "data": str(Path(data)),
        "overall": overall,
        "classes": {
            name: {
                "iou": 100.0 * c.iou,
                "biou": 100.0 * c.biou,
                "acc": 100.0 * c.accuracy,
                "images": c.count,
                "per_image": c.per_image,
                **per_object_info[name],
            }
            for name, c in per_class.items()
        },
        "settings": dict(extra or {}),
    }
    atomic_write_json(output / "metrics.json", metrics)
    atomic_write_text(output / "metrics.md", format_markdown(metrics))
    logger.info("PerSeg %s: mIoU %.2f, bIoU %.2f over %d objects", method, overall["mIoU"], overall["bIoU"],
                len(per_class))
    return metrics


@dataclass
class EvalPersegConfig:
    """Settings of ``eval-perseg`` (each field is a ``--field-name`` flag; a ``--config`` file may hold them)."""

    data: str = field_help("", help="PerSeg-layout root (holds Images/, Annotations/)")
    method: str = field_help("persam", help="persam or persam-f")
    ref: str = field_help("00", help="file stem of the reference image")
    output: str = field_help("", help="output folder (created if missing)")
    sam_model: str = field_help("vit_h", help="SAM model type")
    sam_checkpoint: str | None = field_help(
        None, help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    device: str | None = field_help(None, help="cuda, cuda:N or cpu (default: cuda if available)")
    dilation_ratio: float = field_help(
        DEFAULT_DILATION_RATIO, help="Boundary IoU band width as a fraction of the image diagonal")


def run_eval_perseg(config: EvalPersegConfig) -> dict[str, Any]:
    """Check the settings, then :func:`evaluate_perseg` with PerSAM / PerSAM-F and the PerSAM overlays.

    Errors name the flag of the offending field. Returns the metrics (as written to ``metrics.json``).
    """
    from persam_dreambooth.segmentation.methods import canonical_method, cli_method_name, make_segmenter
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, load_sam
    from persam_dreambooth.utils.devices import resolve_device
    from persam_dreambooth.utils.overlay import draw_overlay

    def flag(name: str) -> str:
        return flag_name(EvalPersegConfig, name, dashes=True)

    # Validate everything before loading SAM or writing anything.
    for name in ("data", "output"):
        if not getattr(config, name):
            raise ConfigError(f"`{flag(name)}` is required.")
    method = canonical_method(config.method, flag("method"), cli=True)
    if config.sam_model not in SAM_BUILDERS:
        raise ValueError(f"`{flag('sam_model')}` must be one of {sorted(SAM_BUILDERS)}, got {config.sam_model!r}.")
    if config.sam_checkpoint is not None and not Path(config.sam_checkpoint).is_file():
        raise FileNotFoundError(f"`{flag('sam_checkpoint')}` file {str(config.sam_checkpoint)!r} does not exist.")
    if not config.dilation_ratio > 0:
        raise ConfigError(f"`{flag('dilation_ratio')}` must be > 0, got {config.dilation_ratio}.")
    device = resolve_device(config.device, flag("device"))
    out = check_output_dir(config.output, flag("output"))

    def make() -> Any:  # called by evaluate_perseg once every data file is checked, before anything is written
        sam = load_sam(config.sam_model, checkpoint=config.sam_checkpoint, device=device,
                       arg_name=flag("sam_checkpoint"))
        return make_segmenter(method, sam)

    def overlay(image: Any, seg: Any) -> Any:
        return draw_overlay(image, seg.mask, seg.points_xy, seg.point_labels, seg.similarity,
                            getattr(seg, "box_xyxy", None))

    return evaluate_perseg(
        config.data, out, make, method=cli_method_name(method), sam_model=config.sam_model, ref=config.ref,
        dilation_ratio=config.dilation_ratio, draw_overlay=overlay,
        extra={"sam_checkpoint": config.sam_checkpoint, "device": str(device)},
    )
