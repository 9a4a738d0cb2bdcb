"""DreamBooth from phone videos: check ``instance_video`` up front, then pick the run's instance frames and masks.

``--instance_video FILE`` (repeatable) replaces ``--instance_data_dir``: the two are mutually exclusive. The subject
is marked once, with ``--reference_box`` / ``--reference_point`` / ``--reference_mask`` on frame
``--reference_frame N``, and that reference applies to every video (same frame index, same pixels), so several
videos must be clips in which the subject sits at the marked place on frame ``N`` (e.g. parts of one recording).

``--num_instance_frames K`` is the total over all videos: video ``i`` of ``n`` gets ``K // n`` frames, the first
``K % n`` videos one more (so ``K >= n``). Each video's frames are chosen by
:func:`persam_dreambooth.masks.video_frames.select_instance_frames` (sharp, diverse, subject present with SAM's
predicted IoU >= ``frame_min_score``; docs/video.md). With one video the run folder receives its
``instance_frames/``, ``masks/``, ``masks_grid.jpg`` and ``frame_selection.json`` directly; with several, each video
is selected into ``OUT/videos/<i>_<stem>/`` and the frames are merged into ``OUT/instance_frames/`` and
``OUT/masks/`` as ``<i>_<stem>_frame_<index>`` (one grid of all of them in ``OUT/masks_grid.jpg``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from persam_dreambooth.data.images import list_images
from persam_dreambooth.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["ARG_NAMES", "VIDEOS_SUBDIR", "check_instance_videos", "frames_per_video", "select_video_frames"]

VIDEOS_SUBDIR = "videos"
#: How the library's errors name the trainer's flags.
ARG_NAMES = {"video": "--instance_video", "reference_frame": "--reference_frame", "reference_mask": "--reference_mask",
             "reference_box": "--reference_box", "reference_point": "--reference_point",
             "num_frames": "--num_instance_frames", "min_score": "--frame_min_score", "output_dir": "--output_dir"}


def frames_per_video(total: int, num_videos: int) -> list[int]:
    """``total`` frames split over ``num_videos``: ``total // n`` each, the first ``total % n`` one more."""
    return [total // num_videos + (i < total % num_videos) for i in range(num_videos)]


def check_instance_videos(config: TrainConfig) -> None:
    """Each video exists and decodes, the reference frame is in range, the reference fits the frame. Writes nothing.

    Raises:
        FileNotFoundError / ValueError: naming ``--instance_video``, ``--reference_frame`` or the reference flag.
    """
    from persam_dreambooth.data.video import open_video
    from persam_dreambooth.segmentation.reference_prompt import ReferenceArgNames, check_box, check_point
    from persam_dreambooth.segmentation.video_reference import reference_labels

    assert config.instance_video
    names = ReferenceArgNames(mask="--reference_mask", box="--reference_box", point="--reference_point")
    for video in config.instance_video:
        source = open_video(video, "--instance_video")  # missing, not a video, zero decodable frames
        frame = next(source.frames(start=config.reference_frame, max_frames=1), None)
        if frame is None or frame.index != config.reference_frame:
            raise ValueError(f"`--reference_frame` {config.reference_frame} is out of range: `--instance_video` "
                             f"{video!r} has fewer frames.")
        height, width = source.size
        if config.reference_mask is not None:  # the frame's size, not empty (needs no SAM)
            reference_labels(frame.image, mask=config.reference_mask, names=names)
        if config.reference_box is not None:
            check_box(config.reference_box, width, height, names.box)
        if config.reference_point is not None:
            check_point(config.reference_point, width, height, names.point)


def _merge(output_dir: Path, selections: list) -> None:
    """Merge per-video selections into ``OUT/instance_frames``, ``OUT/masks`` and ``OUT/masks_grid.jpg``."""
    import shutil

    from persam_dreambooth.masks.store import MaskSet
    from persam_dreambooth.masks.video_frames import GRID_NAME, INSTANCE_DIR, MASK_DIR
    from persam_dreambooth.utils.overlay import masks_grid

    instance_dir = output_dir / INSTANCE_DIR
    if instance_dir.is_dir():
        shutil.rmtree(instance_dir)
    instance_dir.mkdir()
    masks: dict[str, np.ndarray] = {}
    images: dict[str, dict] = {}
    thumbs = []
    for selection in selections:
        prefix = selection.output_dir.name
        record = MaskSet.read(selection.mask_dir).record
        for chosen in selection.chosen:
            stem = f"{prefix}_{chosen.name}"
            shutil.copy2(selection.instance_dir / f"{chosen.name}.jpg", instance_dir / f"{stem}.jpg")
            mask = np.asarray(Image.open(selection.mask_dir / f"{chosen.name}.png")) > 127  # (H, W) bool
            masks[stem] = mask
            images[stem] = {**record["images"][chosen.name], "video": record["settings"]["video"]}
            small = Image.open(instance_dir / f"{stem}.jpg").convert("RGB")
            small.thumbnail((256, 256))
            thumbs.append((stem, np.asarray(small), np.asarray(Image.fromarray(mask).resize(small.size))))
    first = MaskSet.read(selections[0].mask_dir).record
    MaskSet.write(output_dir / MASK_DIR, masks, {"source": "video", "method": first["method"],
                                                 "videos": [s.output_dir.name for s in selections], "images": images})
    grid = masks_grid([t[1] for t in thumbs], [t[2] for t in thumbs], [t[0] for t in thumbs])
    grid.save(output_dir / GRID_NAME, quality=90)


def select_video_frames(config: TrainConfig, output_dir: Path, accelerator: Accelerator,
                        reuse: bool = False) -> list[Path]:
    """Pick the instance frames and masks of ``instance_video`` (main process) and return the frame files, sorted.

    With ``reuse`` (a resumed run) an existing complete selection (``masks_grid.jpg`` present) is kept.
    """
    from persam_dreambooth.masks.video_frames import GRID_NAME, INSTANCE_DIR, select_instance_frames

    assert config.instance_video
    if accelerator.is_main_process and not (reuse and (output_dir / GRID_NAME).is_file()):
        from persam_dreambooth.segmentation.sam import load_sam

        sam = load_sam(config.sam_model_type, checkpoint=config.sam_checkpoint, device=str(accelerator.device))
        counts = frames_per_video(config.num_instance_frames, len(config.instance_video))
        kwargs = {"reference_frame": config.reference_frame, "reference_mask": config.reference_mask,
                  "reference_box": config.reference_box, "reference_point": config.reference_point,
                  "method": config.mask_method or "persam", "min_score": config.frame_min_score, "sam": sam,
                  "arg_names": ARG_NAMES}
        if len(config.instance_video) == 1:
            select_instance_frames(config.instance_video[0], output_dir, num_frames=counts[0], **kwargs)
        else:
            selections = [
                select_instance_frames(video, output_dir / VIDEOS_SUBDIR / f"{i:02d}_{Path(video).stem}",
                                       num_frames=count, **kwargs)
                for i, (video, count) in enumerate(zip(config.instance_video, counts, strict=True))
            ]
            _merge(output_dir, selections)
        del sam
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # SAM is gone; give its memory back before the diffusion models load
    accelerator.wait_for_everyone()
    return list_images(output_dir / INSTANCE_DIR, "--instance_video frames")
