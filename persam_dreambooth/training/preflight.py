"""Checks that run before anything is written or loaded: bad input fails here, with a message naming the problem.

Checked: the output path is not a file; the base model exists and belongs to a supported model family
(``model_index.json``'s ``_class_name``), a replacement VAE matches it, and ``resolution`` is a multiple of its
latent x patch factor (and so are the sides of every ``aspect_ratio_buckets`` bucket); the LoRA target modules
exist in it; the instance folder holds images with distinct stems that decode completely (as does every class image
already in ``class_data_dir``); every image has a non-empty mask of its
size (``mask_dir``), or the reference image / mask / box / point are valid (PerSAM); each ``instance_video`` exists
and decodes, holds ``reference_frame``, and the reference mask / box / point fit its frames; the SAM checkpoint
exists; the
class folder is not a file; ``resume_from_checkpoint`` exists; bitsandbytes is installed for ``use_8bit_adam`` and
``bnb_quantization_config_path`` (a JSON object); the tracker package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from persam_dreambooth.data.images import check_same_size, check_unique_stems, list_images, load_image, load_mask
from persam_dreambooth.masks.store import MaskSet
from persam_dreambooth.training.checkpoint import resolve_resume
from persam_dreambooth.training.components import BaseModelInfo, check_lora_targets, inspect_base_model
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.utils.io import check_output_dir

logger = logging.getLogger(__name__)

__all__ = ["Preflight", "run_preflight"]


@dataclass
class Preflight:
    """What the checks found.

    Attributes:
        info: the base model's configuration.
        instance_images: the instance photos, sorted by name (empty for ``instance_video`` until the frames are
            picked: :func:`~persam_dreambooth.training.instance_video.select_video_frames`).
        mask_set: the user's mask folder (``mask_source: dir``), else None.
        resume: the checkpoint to resume from, or None.
        output_dir: the output folder (may not exist yet).
    """

    info: BaseModelInfo
    instance_images: list[Path]
    mask_set: MaskSet | None
    resume: Path | None
    output_dir: Path


def _check_reference(config: TrainConfig) -> None:
    assert config.reference_image is not None
    ref_hw = load_image(config.reference_image, "reference_image").shape[:2]
    if config.reference_mask is not None:
        mask = load_mask(config.reference_mask, "reference_mask")
        check_same_size(ref_hw, mask.shape, "reference_image", "reference_mask")
        if not mask.any():
            raise ValueError(f"`reference_mask` {config.reference_mask!r} is empty (no foreground pixel).")
    height, width = ref_hw
    if config.reference_box is not None:
        x0, y0, x1, y1 = config.reference_box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"`reference_box` {config.reference_box} must lie inside `reference_image` (W x H = {width} x "
                f"{height}): 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}."
            )
    if config.reference_point is not None:
        x, y = config.reference_point
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"`reference_point` {config.reference_point} must lie inside `reference_image` (W x H = {width} x "
                f"{height})."
            )
    _check_sam(config)


def _check_sam(config: TrainConfig) -> None:
    """The SAM checkpoint exists and the SAM type and the mask method are known."""
    if config.sam_checkpoint is not None and not Path(config.sam_checkpoint).is_file():
        raise FileNotFoundError(f"`sam_checkpoint` file {config.sam_checkpoint!r} does not exist.")
    from persam_dreambooth.masks.make import segmenter_class
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS

    if config.sam_model_type not in SAM_BUILDERS:
        raise ValueError(
            f"`sam_model_type` must be one of {sorted(SAM_BUILDERS)}, got {config.sam_model_type!r}."
        )
    segmenter_class(config.mask_method or "persam")  # an unknown method fails here, before anything is written


def _check_decodes(path: Path, arg_name: str) -> None:
    """Decode every pixel of the image file ``path`` (a truncated or corrupt file fails here, not at step 0)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"`{arg_name}`: {str(path)!r} cannot be decoded as an image ({exc}); replace or remove "
                         "it.") from exc


def read_quantization_config(path: str) -> dict[str, object]:
    """The ``BitsAndBytesConfig`` arguments in ``path`` (a JSON object); bitsandbytes must be installed.

    Raises:
        FileNotFoundError / ValueError: naming ``bnb_quantization_config_path``.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`bnb_quantization_config_path` file {path!r} does not exist.")
    try:
        kwargs = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"`bnb_quantization_config_path` {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict) or not (kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit")):
        raise ValueError(
            f"`bnb_quantization_config_path` {path!r} must hold a JSON object of BitsAndBytesConfig arguments with "
            '"load_in_4bit": true or "load_in_8bit": true, e.g. {"load_in_4bit": true, "bnb_4bit_quant_type": '
            '"nf4"}.'
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("`bnb_quantization_config_path` needs bitsandbytes: `pip install bitsandbytes`.")
    return kwargs


def run_preflight(config: TrainConfig) -> Preflight:
    """Run every check that needs no model weights; raise on the first problem. Writes nothing."""
    output_dir = check_output_dir(config.output_dir, "--output_dir")
    info = inspect_base_model(config)
    check_lora_targets(config, info)

    mask_set = None
    images: list[Path] = []
    if config.instance_video:  # the frames are picked after the checks (OUT/instance_frames), see .instance_video
        from persam_dreambooth.training.instance_video import check_instance_videos

        check_instance_videos(config)
        _check_sam(config)
    else:
        images = list_images(config.instance_data_dir, "instance_data_dir")
        check_unique_stems(images, "instance_data_dir")  # masks are matched to images by stem
        for path in images:
            _check_decodes(path, "--instance_data_dir")
        if config.mask_source == "dir":
            assert config.mask_dir is not None
            mask_set = MaskSet.read(config.mask_dir, "mask_dir")
            mask_set.check_images(images)
        elif config.mask_source in ("persam", "persam_f"):
            _check_reference(config)

    if config.with_prior_preservation:
        assert config.class_data_dir is not None
        class_dir = Path(config.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise NotADirectoryError(f"`class_data_dir` {config.class_data_dir!r} is a file; give a folder.")
        from persam_dreambooth.training.class_images import existing_class_images

        existing = existing_class_images(class_dir)
        if existing:
            logger.info("Checking the %d class images in %s", len(existing), class_dir)
        for path in existing:
            _check_decodes(path, "--class_data_dir")
    elif config.class_data_dir or config.class_prompt:
        logger.warning("`class_data_dir` / `class_prompt` are ignored without `with_prior_preservation`.")

    if config.bnb_quantization_config_path:
        read_quantization_config(config.bnb_quantization_config_path)
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes` (or drop the flag).")
    trackers = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}
    wanted = list(trackers) if config.report_to == "all" else [config.report_to]
    for name in wanted:
        if name in trackers and importlib.util.find_spec(trackers[name]) is None:
            if config.report_to == "all":
                continue
            raise ValueError(f"`report_to` {name!r} needs `pip install {trackers[name]}` (or `--report_to none`).")
    resume = resolve_resume(config.resume_from_checkpoint, output_dir)
    return Preflight(info=info, instance_images=images, mask_set=mask_set, resume=resume, output_dir=output_dir)
