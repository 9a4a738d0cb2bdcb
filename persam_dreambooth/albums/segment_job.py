"""The ``segment`` command's library side: its config, the checks before anything runs, and the run itself.

    config = SegmentConfig(ref_image=["ref.jpg"], ref_box=["30,20,100,80"], images=["photos/"], output="out")
    plan = check_segment_config(config)     # everything checked, nothing written, no model loaded
    summary = run_segment(config, plan)     # loads SAM, sets the reference, segments this process's share

Errors name the command-line flag of the offending field (:func:`persam_dreambooth.config.flag_name`), since the
config is what the flags and ``--config FILE`` fill. See ``docs/segmentation_album.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persam_dreambooth.config import ConfigError, field_help, flag_name

__all__ = ["SegmentConfig", "SegmentPlan", "check_segment_config", "run_segment"]

logger = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return flag_name(SegmentConfig, name, dashes=True)


@dataclass
class SegmentConfig:
    """Settings of one ``segment`` run (each field is a ``--field-name`` flag; see ``--help``).

    Counts may be given as text (from a flag) or numbers (from a config file); they are checked and converted in
    :func:`check_segment_config`, whose errors name the flag and the value as typed. Thresholds are floats, so ``nan``
    and ``inf`` are refused when the flags are parsed (:mod:`persam_dreambooth.config`); their ranges are checked
    in :func:`check_segment_config`.
    """

    ref_image: list[str] = field_help([], help="the reference photo(s); several = several shots of the same object")
    ref_mask: list[str] | None = field_help(
        None, help="mask of the object in each reference photo, in --ref-image order (same sizes)")
    ref_box: list[str] | None = field_help(
        None, help="one box X0,Y0,X1,Y1 per reference photo, in pixels (repeat the flag or list them); SAM makes the "
        "reference masks")
    ref_point: list[str] | None = field_help(
        None, help="one click X,Y per reference photo, in pixels; SAM makes the reference masks")
    images: list[str] = field_help([], help="a folder of photos, or photo files")
    output: str = field_help(
        "", help="output folder, required (created if missing; a rerun skips photos already done)")
    method: str = field_help(
        "persam", help="persam (training-free, default) or persam-f (fits 2 scale weights on the reference)")
    max_instances: int | str | None = field_help(
        None, help="find up to K instances per photo: <stem>_inst1.png... plus their union <stem>.png")
    similarity_threshold: float | None = field_help(
        None, help="stop when the next candidate's similarity is below T (in [-1, 1]; 0.65 when unset; needs "
        "--max-instances)")
    overlap_iou: float | None = field_help(
        None, help="drop a new mask whose IoU with an earlier one exceeds T and stop (in [0, 1]; 0.8 when unset; "
        "needs --max-instances)")
    batch_size: int | str = field_help(
        1, help="photos encoded (and decoded) together (1: the faithful one-at-a-time path)")
    dtype: str = field_help("float32", help="image-encoder autocast: float32 (exact), bfloat16 or float16")
    cache_dir: str | None = field_help(
        None, help="keep image embeddings here; photos seen before (same pixels, model, dtype) skip the encoder")
    overwrite: bool = field_help(
        False, help="redo every photo in --output, even if results made with other settings are there")
    sam_model: str = field_help("vit_h", help="SAM model type: vit_h, vit_l, vit_b")
    sam_checkpoint: str | None = field_help(
        None, help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    device: str | None = field_help(
        None, help="cuda, cuda:N or cpu (default: cuda if available; under accelerate launch, each process's own GPU)")


@dataclass
class SegmentPlan:
    """What :func:`check_segment_config` found: the reference (validated), the photos and the numbers converted."""

    method: str  # code spelling: "persam" or "persam_f"
    marked: list[Any]  # MarkedReference per shot
    images: list[Path]
    stems: list[str]
    output: Path
    batch_size: int
    max_instances: int | None
    similarity_threshold: float | None
    overlap_iou: float | None
    cache_dir: Path | None


def _int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` (text or number) as an int >= ``minimum``; the error names the field's flag and the value."""
    try:
        number = None if isinstance(value, (bool, float)) else int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"`{_flag(name)}` must be an integer >= {minimum}, got {str(value)!r}.")
    return number


def _unit(value: Any, name: str, low: float, high: float) -> float:
    """``value`` (text or number) as a finite float in ``[low, high]``; the error names the flag and the value."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not low <= number <= high:
        raise ConfigError(f"`{_flag(name)}` must be a number in [{low:g}, {high:g}], got {str(value)!r}.")
    return number


def check_segment_config(config: SegmentConfig) -> SegmentPlan:
    """Check every setting and the reference files; nothing is written and no model is loaded.

    The photos themselves are decoded later by :func:`~.run.prepare_album` (only those still to do, split between
    processes).

    Raises:
        ValueError (ConfigError), FileNotFoundError: with a message naming the flag, the value and the rule.
    """
    from persam_dreambooth.albums.batch_encoder import check_encoder_dtype
    from persam_dreambooth.albums.outputs import check_instance_stems, reference_mask_stems
    from persam_dreambooth.data.images import check_unique_stems, list_images
    from persam_dreambooth.segmentation.methods import canonical_method
    from persam_dreambooth.segmentation.multi_instance import DEFAULT_OVERLAP_IOU, DEFAULT_SIMILARITY_THRESHOLD
    from persam_dreambooth.segmentation.reference_prompt import ReferenceArgNames, read_marked_references
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS
    from persam_dreambooth.utils.devices import resolve_device
    from persam_dreambooth.utils.io import check_output_dir

    method = canonical_method(config.method, _flag("method"), cli=True)
    if config.sam_model not in SAM_BUILDERS:
        raise ValueError(f"`{_flag('sam_model')}` must be one of {sorted(SAM_BUILDERS)}, got {config.sam_model!r}.")
    if config.sam_checkpoint is not None:
        ckpt = Path(config.sam_checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"`{_flag('sam_checkpoint')}` file {str(ckpt)!r} does not exist.")
        if not ckpt.is_file():
            raise ValueError(f"`{_flag('sam_checkpoint')}` must be a file, but {str(ckpt)!r} is a folder.")
    elif SAM_BUILDERS[config.sam_model].checksum is None:
        raise ValueError(f"`{_flag('sam_checkpoint')}` is required for `{_flag('sam_model')}` {config.sam_model!r}: "
                         "it has no official checkpoint to download.")
    resolve_device(config.device, _flag("device"))
    check_encoder_dtype(config.dtype, _flag("dtype"))
    batch_size = _int(config.batch_size, "batch_size")
    max_instances = None if config.max_instances is None else _int(config.max_instances, "max_instances")
    for name in ("similarity_threshold", "overlap_iou"):
        value = getattr(config, name)
        if value is not None and max_instances is None:
            raise ConfigError(f"`{_flag(name)}` {str(value)!r} applies only to several instances; add "
                              f"`{_flag('max_instances')} K`.")
    threshold = overlap = None
    if max_instances is not None:  # the values used, defaults included, go into run.json
        threshold = (DEFAULT_SIMILARITY_THRESHOLD if config.similarity_threshold is None
                     else _unit(config.similarity_threshold, "similarity_threshold", -1.0, 1.0))
        overlap = (DEFAULT_OVERLAP_IOU if config.overlap_iou is None
                   else _unit(config.overlap_iou, "overlap_iou", 0.0, 1.0))
    if not config.output:
        raise ConfigError(f"`{_flag('output')}` is required: the output folder.")
    output = check_output_dir(config.output, _flag("output"))
    cache_dir = None if config.cache_dir is None else check_output_dir(config.cache_dir, _flag("cache_dir"))

    names = ReferenceArgNames(image=_flag("ref_image"), mask=_flag("ref_mask"), box=_flag("ref_box"),
                              point=_flag("ref_point"))
    marked = read_marked_references(config.ref_image, masks=config.ref_mask, boxes=config.ref_box,
                                    points=config.ref_point, names=names)
    if not config.images:
        raise ConfigError(f"`{_flag('images')}` is required: a folder of photos, or photo files.")
    images = list_images(config.images, _flag("images"))
    reserved = () if config.ref_mask is not None else reference_mask_stems(len(marked))
    stems = check_unique_stems(images, _flag("images"), reserved=reserved)
    if max_instances is not None:
        check_instance_stems(images, _flag("images"))
    return SegmentPlan(method, marked, images, stems, output, batch_size, max_instances, threshold, overlap,
                       cache_dir)


def _process_state(device_arg: str | None) -> tuple[Any, Any]:
    """``(accelerate.PartialState, torch.device)`` for this process (its own GPU under ``accelerate launch``)."""
    import torch
    from accelerate import PartialState

    from persam_dreambooth.utils.devices import resolve_device

    device = resolve_device(device_arg, _flag("device"))
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes == 1:
        return state, device
    if device.type == "cpu":
        return state, torch.device("cpu")
    if device_arg not in (None, "cuda"):
        raise ValueError(
            f"`{_flag('device')}` {device_arg!r} names one device, but {state.num_processes} processes were launched; "
            f"leave `{_flag('device')}` out (or give 'cuda') so that each process uses its own GPU."
        )
    return state, state.device


def _mask_sha256(mask: Any) -> str:
    import numpy as np

    digest = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    digest.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return digest.hexdigest()


def _settings(config: SegmentConfig, plan: SegmentPlan, weights: str) -> dict[str, Any]:
    """What decides the result (compared with an earlier ``run.json``; the method in its command spelling, so that
    folders written before keep resuming)."""
    from persam_dreambooth.albums.embedding_cache import pixels_sha256
    from persam_dreambooth.segmentation.methods import cli_method_name
    from persam_dreambooth.segmentation.persam_f import DEFAULT_LR, DEFAULT_STEPS

    references = [{
        "image_sha256": pixels_sha256(ref.image),
        "mask_sha256": None if ref.mask is None else _mask_sha256(ref.mask),
        "box": None if ref.box_xyxy is None else list(ref.box_xyxy),
        "point": None if ref.point_xy is None else list(ref.point_xy),
    } for ref in plan.marked]
    settings: dict[str, Any] = {
        "method": cli_method_name(plan.method), "sam_model": config.sam_model, "sam_weights_sha256": weights,
        "dtype": config.dtype, "references": references, "max_instances": plan.max_instances,
        "similarity_threshold": plan.similarity_threshold, "overlap_iou": plan.overlap_iou,
    }
    if plan.method == "persam_f":
        settings["persam_f"] = {"steps": DEFAULT_STEPS, "lr": DEFAULT_LR}
    return settings


def _save_reference_masks(output: Path, plan: SegmentPlan, shots: list[Any]) -> None:
    """``reference_mask.png`` (+ overlay) for each SAM-made reference mask."""
    from persam_dreambooth.albums.outputs import reference_mask_stems, save_mask_png
    from persam_dreambooth.utils.io import atomic_save_image
    from persam_dreambooth.utils.overlay import draw_overlay

    if plan.marked[0].mask is not None:
        return
    for stem, ref, shot in zip(reference_mask_stems(len(shots)), plan.marked, shots, strict=True):
        save_mask_png(shot.mask, output / f"{stem}.png")
        pts = None if ref.point_xy is None else [[int(ref.point_xy[0]), int(ref.point_xy[1])]]
        overlay = draw_overlay(ref.image, shot.mask, pts, None if pts is None else [1], box_xyxy=ref.box_xyxy)
        atomic_save_image(overlay, output / f"{stem}_overlay.jpg", quality=90)


def run_segment(config: SegmentConfig, plan: SegmentPlan | None = None) -> dict[str, Any]:
    """Plan the resume, load SAM, set the reference(s), segment this process's share of the photos.

    The output folder is locked for the whole run (:func:`~persam_dreambooth.utils.locks.lock_output_dir`): a second
    run into it is refused at once, with one line naming the holder's PID (``FolderLockedError``).

    Returns:
        A summary: ``photos`` (all), ``done_now`` (this run), ``encoder_calls``, ``mean_score`` (main process),
        ``output``.
    """
    plan = plan if plan is not None else check_segment_config(config)
    state, device = _process_state(config.device)
    with _output_lock(plan.output, state):
        return _run_segment(config, plan, state, device)


@contextlib.contextmanager
def _output_lock(output: Path, state: Any) -> Iterator[None]:
    """Hold ``output``'s run lock (the main process takes it; every process stops if it is refused). A run that fails
    before writing leaves neither the lock file nor a new, empty output folder behind."""
    from persam_dreambooth.utils.locks import FolderLockedError, lock_output_dir

    with contextlib.ExitStack() as stack:
        refused = None
        if state.is_main_process:
            try:
                stack.enter_context(lock_output_dir(output, "segment", _flag("output"), tidy_on_error=True))
            except FolderLockedError as exc:
                refused = str(exc)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            refused = next((r for r in gather_object([refused]) if r), None)
        if refused is not None:
            raise FolderLockedError(refused)
        yield


def _run_segment(config: SegmentConfig, plan: SegmentPlan, state: Any, device: Any) -> dict[str, Any]:
    """:func:`run_segment`'s work, with the output folder locked."""
    from persam_dreambooth import __version__
    from persam_dreambooth.albums.batch_encoder import BatchEncoder
    from persam_dreambooth.albums.embedding_cache import EmbeddingCache, EncoderIdentity, weights_sha256
    from persam_dreambooth.albums.run import AlbumJob, finish_complete_album, prepare_album, run_album
    from persam_dreambooth.albums.segment_photos import AlbumOptions
    from persam_dreambooth.segmentation import sam as sam_module
    from persam_dreambooth.segmentation.methods import make_segmenter
    from persam_dreambooth.segmentation.reference_prompt import set_marked_reference

    weights = weights_sha256(checkpoint=config.sam_checkpoint,
                             official_type=None if config.sam_checkpoint else config.sam_model)
    job = AlbumJob(
        images=plan.images, stems=plan.stems, output=plan.output, settings=_settings(config, plan, weights),
        max_instances=plan.max_instances, overwrite=bool(config.overwrite), output_arg=_flag("output"),
        overwrite_arg=_flag("overwrite"), images_arg=_flag("images"),
    )
    album = prepare_album(job, state)
    summary: dict[str, Any] = {"photos": len(job.images), "done_now": 0, "encoder_calls": 0, "mean_score": None,
                               "output": str(job.output)}
    if not album.todo:
        finish_complete_album(job, album, state)
        logger.info("all %d photo(s) in %s are already complete; nothing to do", len(job.images), job.output)
        return summary

    sam = sam_module.load_sam(config.sam_model, config.sam_checkpoint, device, arg_name=_flag("sam_checkpoint"))
    segmenter = make_segmenter(plan.method, sam)
    cache = None
    if plan.cache_dir is not None:
        identity = EncoderIdentity(model_type=config.sam_model, weights_sha256=weights,
                                   img_size=int(sam.image_encoder.img_size), encoder_dtype=config.dtype)
        cache = EmbeddingCache(plan.cache_dir, identity)
    encoder = BatchEncoder(segmenter.predictor, config.dtype, cache)

    def encode(images: list[Any]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(images), plan.batch_size):
            out += encoder.encode_images(images[start:start + plan.batch_size], _flag("ref_image"))
        return out

    shots = set_marked_reference(segmenter, plan.marked, encode, mask_name=_flag("ref_mask"))
    extra: dict[str, Any] = {}
    if plan.method == "persam_f":
        extra["scale_weights"] = [round(float(w), 6) for w in segmenter.scale_weights]
    job.info = {
        "package_version": __version__, "reference_images": [str(p) for p in config.ref_image],
        "batch_size": plan.batch_size, "device": str(device), "num_processes": state.num_processes,
        "cache_dir": config.cache_dir, **extra,
    }
    options = AlbumOptions(batch_size=plan.batch_size, max_instances=plan.max_instances,
                           similarity_threshold=plan.similarity_threshold, overlap_iou=plan.overlap_iou,
                           progress=state.is_main_process)
    rows = run_album(segmenter, job, album, encoder, options, state,
                     before_segmenting=lambda out: _save_reference_masks(out, plan, shots), extra_fields=extra)
    if cache is not None:
        logger.info("embedding cache %s: %d hit(s), %d miss(es), %d written, %d discarded", plan.cache_dir,
                    cache.hits, cache.misses, cache.writes, cache.discarded)
    summary.update(done_now=len(album.todo), encoder_calls=encoder.encoder_calls)
    if state.is_main_process:
        summary["mean_score"] = sum(r["score"] for r in rows) / max(1, len(rows))
    return summary
