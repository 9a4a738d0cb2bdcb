"""``persam-dreambooth segment-video``: track the objects marked on one frame through a video (PerSAM / PerSAM-F).

    persam-dreambooth segment-video (--video FILE | --frames DIR) (--ref-mask PNG | --ref-box x0,y0,x1,y1
        | --ref-point x,y) [--ref-frame N] --output DIR [--method persam|persam-f] [--every-nth K] [--max-frames M]
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--overwrite] [--config FILE]

Outputs in ``--output``: ``labels/<frame>.png`` (palette PNG label maps, 0 = background, k = object k),
``overlay.mp4`` (masks and point prompts over the frames), ``results.jsonl`` (one line per frame: per object its
score, box, area; the frame's seconds) and ``run.json``. Tracking runs forward from ``--ref-frame`` (frames before it
are not segmented). A rerun with the same settings resumes after the last frame written, with exactly the state an
uninterrupted run would have (see docs/video.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from persam_dreambooth.config import field_help, flag_name

__all__ = ["SamOptions", "SegmentVideoConfig", "add_video_command", "register", "run", "segment_video"]

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
RESULTS = "results.jsonl"
RUN_JSON = "run.json"
OVERLAY = "overlay.mp4"


@dataclass
class SamOptions:
    """What the video commands share: the SAM flags (as ``segment``'s), the tracker, required-flag checks."""

    sam_model: str = field_help("vit_h", help="SAM model type: vit_h, vit_l, vit_b")
    sam_checkpoint: str | None = field_help(None, help="SAM weights file; default: the official checkpoint, "
                                            "downloaded once and verified")
    device: str | None = field_help(None, help="cuda, cuda:N or cpu (default: cuda if available)")
    dtype: Literal["float32", "bfloat16", "float16"] = field_help(
        "float32", help="image-encoder autocast: float32 (the faithful default), bfloat16 or float16")
    method: Literal["persam", "persam-f"] = field_help("persam", help="tracker")

    @property
    def tracker_method(self) -> Literal["persam", "persam_f"]:
        """``method`` as :class:`~persam_dreambooth.segmentation.persam_video.PerSAMVideo` spells it."""
        return "persam_f" if self.method == "persam-f" else "persam"

    def require(self, *names: str) -> None:
        """Raise ``ValueError`` naming the first flag of ``names`` left empty."""
        for name in names:
            if not getattr(self, name):
                raise ValueError(f"`{flag_name(type(self), name, dashes=True)}` is required.")

    def check_sam(self) -> None:
        from persam_dreambooth.segmentation.sam import SAM_BUILDERS
        from persam_dreambooth.utils.devices import resolve_device

        cls = type(self)
        if self.sam_model not in SAM_BUILDERS:
            raise ValueError(f"`{flag_name(cls, 'sam_model', True)}` must be one of {sorted(SAM_BUILDERS)}, got "
                             f"{self.sam_model!r}.")
        if self.sam_checkpoint is not None and not Path(self.sam_checkpoint).is_file():
            raise FileNotFoundError(f"`{flag_name(cls, 'sam_checkpoint', True)}` file {self.sam_checkpoint!r} does "
                                    "not exist.")
        if self.sam_checkpoint is None and SAM_BUILDERS[self.sam_model].checksum is None:
            raise ValueError(f"`--sam-checkpoint` is required for `--sam-model` {self.sam_model!r}: it has no "
                             "official checkpoint to download.")
        resolve_device(self.device, "--device")

    def load(self) -> Any:
        from persam_dreambooth.segmentation.sam import load_sam

        return load_sam(self.sam_model, self.sam_checkpoint, self.device)


@dataclass
class SegmentVideoConfig(SamOptions):
    """Settings of ``segment-video`` (flags = field names with dashes)."""

    video: str | None = field_help(None, help="the video file (.mp4, .mov, .webm, .mkv, .gif, ...)")
    frames: str | None = field_help(None, help="a folder of frames instead of a video (sorted by name)")
    ref_frame: int = field_help(0, help="index of the frame the reference marks (tracking runs forward from it)")
    ref_mask: str | None = field_help(None, help="label map of the reference frame: a palette PNG (one object per "
                                      "index) or any mask (one object)")
    ref_box: str | None = field_help(None, help="x0,y0,x1,y1 of the subject on the reference frame (SAM makes "
                                     "the mask)")
    ref_point: str | None = field_help(None, help="x,y of a click on the subject on the reference frame")
    output: str = field_help("", help="output folder (created if missing; a rerun resumes)")
    every_nth: int = field_help(1, help="segment every K-th frame from the reference frame on")
    max_frames: int | None = field_help(None, help="segment at most M frames (the reference frame included)")
    overlay: bool = field_help(True, help="write overlay.mp4")
    overwrite: bool = field_help(False, help="start again when --output holds a run with other settings")

    def __post_init__(self) -> None:
        cls = type(self)

        def flag(name: str) -> str:
            return flag_name(cls, name, dashes=True)

        if (self.video is None) == (self.frames is None):
            raise ValueError(f"Give exactly one of `{flag('video')}` and `{flag('frames')}`.")
        refs = [flag(n) for n in ("ref_mask", "ref_box", "ref_point") if getattr(self, n) is not None]
        if len(refs) != 1:
            raise ValueError(f"Give exactly one of `--ref-mask`, `--ref-box` and `--ref-point`; got "
                             f"{', '.join(refs) or 'none'}.")
        if not self.output:
            raise ValueError(f"`{flag('output')}` is required: the folder to write the label maps into.")
        for name, low in (("ref_frame", 0), ("every_nth", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"`{flag(name)}` must be an integer >= {low}, got {getattr(self, name)}.")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"`{flag('max_frames')}` must be an integer >= 1, got {self.max_frames}.")

    @property
    def source_flag(self) -> str:
        return "--video" if self.video is not None else "--frames"


def add_video_command(subparsers: Any, name: str, config_cls: type, run: Any, *, help: str,
                      description: str) -> argparse.ArgumentParser:
    """Add a video sub-command: ``--config FILE`` plus one dashed flag per field of ``config_cls``."""
    from persam_dreambooth.config import add_dataclass_arguments

    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML file of these settings")
    add_dataclass_arguments(parser, config_cls, dashes=True)
    parser.set_defaults(func=run)
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``segment-video`` sub-command."""
    return add_video_command(
        subparsers, "segment-video", SegmentVideoConfig, run,
        help="track objects marked on one frame through a video (PerSAM / PerSAM-F)",
        description="Track the object(s) marked on --ref-frame through the video. Writes labels/<frame>.png, "
        "overlay.mp4, results.jsonl and run.json into --output; a rerun resumes.",
    )


def run(args: argparse.Namespace) -> int:
    from persam_dreambooth.config import parse_config

    summary = segment_video(parse_config(SegmentVideoConfig, args, args.config))
    logger.info("segmented %d frame(s) (%d this run) into %s", summary["frames_done"], summary["frames_this_run"],
                summary["output"])
    return 0


# ------------------------------------------------------------------------------------------------ the run
def _settings(cfg: SegmentVideoConfig, source: Any, labels: np.ndarray | None, weights: str) -> dict[str, Any]:
    ref: dict[str, Any] = {"frame": cfg.ref_frame, "box": cfg.ref_box, "point": cfg.ref_point}
    if labels is not None:
        ref["mask_sha256"] = hashlib.sha256(labels.tobytes() + str(labels.shape).encode()).hexdigest()
    return {
        "source": str(Path(source.path).resolve()), "source_size": list(source.size), "method": cfg.method,
        "every_nth": cfg.every_nth, "max_frames": cfg.max_frames, "reference": ref, "sam_model": cfg.sam_model,
        "sam_weights": weights, "dtype": cfg.dtype,
    }


def _read_rows(path: Path, labels_dir: Path) -> list[dict[str, Any]]:
    """The complete rows of ``results.jsonl`` whose label PNG exists (a torn last line is dropped)."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not (labels_dir / f"{row['frame']}.png").is_file():
            break
        rows.append(row)
    return rows


def _plan_resume(cfg: SegmentVideoConfig, out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """``(rows already done with the same settings, whether an older run must be cleared first)``; refuses other
    settings without ``--overwrite``. Nothing is written here."""
    run_json = out / RUN_JSON
    if not run_json.is_file():
        return [], False
    try:
        previous = json.loads(run_json.read_text(encoding="utf-8")).get("settings")
    except json.JSONDecodeError:
        previous = None
    if previous != settings:
        if not cfg.overwrite:
            raise ValueError(f"`--output` {str(out)!r} holds a segment-video run with other settings; choose another "
                             "folder or add `--overwrite` to start again there.")
        return [], True
    return _read_rows(out / RESULTS, out / LABELS_DIR), False


def _clear(out: Path) -> None:
    """Remove an older run's outputs (``--overwrite``)."""
    for name in (RESULTS, RUN_JSON, OVERLAY):
        (out / name).unlink(missing_ok=True)
    for png in (out / LABELS_DIR).glob("*.png") if (out / LABELS_DIR).is_dir() else ():
        png.unlink()


def _row(name: str, frame: Any) -> dict[str, Any]:
    return {
        "frame": name,
        "index": None,  # filled by the caller (the video frame index)
        "seconds": round(frame.seconds, 4),
        "objects": [{"label": o.label, "score": None if o.score != o.score else round(o.score, 6),
                     "box": None if o.box_xyxy is None else list(o.box_xyxy), "area": o.area,
                     "points": np.asarray(o.points_xy).astype(int).tolist(),
                     "events": list(o.events)} for o in frame.objects],
    }


def segment_video(cfg: SegmentVideoConfig) -> dict[str, Any]:
    """Run ``segment-video`` (validated config). Returns a summary dict (also in ``run.json``)."""
    import torch
    from tqdm.auto import tqdm

    from persam_dreambooth.data.video import open_video, read_label_map, save_label_png
    from persam_dreambooth.segmentation.persam_video import PerSAMVideo, VideoFrame, check_first_labels, object_result
    from persam_dreambooth.segmentation.reference_prompt import ReferenceArgNames
    from persam_dreambooth.segmentation.video_reference import reference_labels
    from persam_dreambooth.utils.io import atomic_write_json, atomic_write_text, check_output_dir
    from persam_dreambooth.utils.locks import lock_output_dir

    cfg.check_sam()
    out = check_output_dir(cfg.output, "--output")
    source = open_video(cfg.video if cfg.video is not None else cfg.frames, cfg.source_flag)
    frames = source.frames(every_nth=cfg.every_nth, max_frames=cfg.max_frames, start=cfg.ref_frame)
    ref = next(frames, None)
    if ref is None or ref.index != cfg.ref_frame:
        count = source.frame_count if source.frame_count is not None else "fewer"
        raise ValueError(f"`--ref-frame` {cfg.ref_frame} is out of range: `{cfg.source_flag}` has {count} frame(s) "
                         f"(valid: 0..{'N-1' if source.frame_count is None else source.frame_count - 1}).")
    names = ReferenceArgNames(mask="--ref-mask", box="--ref-box", point="--ref-point")
    given_labels = None
    if cfg.ref_mask is not None:  # checked before SAM is loaded
        given_labels, _ = reference_labels(ref.image, mask=cfg.ref_mask, names=names)  # read as `--ref-mask`
    weights = "official" if cfg.sam_checkpoint is None else str(Path(cfg.sam_checkpoint).resolve())
    settings = _settings(cfg, source, given_labels, weights)
    done_rows, clear = _plan_resume(cfg, out, settings)

    with lock_output_dir(out, "segment-video", "--output", tidy_on_error=True):  # one run per folder
        sam = cfg.load()
        tracker = PerSAMVideo(sam, cfg.tracker_method, encoder_dtype=cfg.dtype)
        ref_score = None
        if given_labels is None:
            given_labels, ref_score = reference_labels(ref.image, box=cfg.ref_box, point=cfg.ref_point,
                                                       predictor=tracker.predictor, names=names)
        first_labels = check_first_labels(given_labels, ref.image.shape, "--ref-mask")
        if clear:  # only now that every input is known to be good
            _clear(out)
        labels_dir = out / LABELS_DIR
        labels_dir.mkdir(parents=True, exist_ok=True)
        start_time = time.perf_counter()
        run_info = {"settings": settings, "status": "running", "reference_mask_score": ref_score,
                    "package": "persam_dreambooth"}
        atomic_write_json(out / RUN_JSON, run_info)

        objects = tracker.init_objects(tracker.encode(ref.image, "reference frame"), first_labels)
        if cfg.tracker_method == "persam_f":  # the fitted mixing weights per object (recomputed alike on resume)
            run_info["persam_f_weights"] = {str(o.label): [round(float(w), 6) for w in o.weights] for o in objects
                                            if o.weights is not None}
        if not done_rows:
            ref_name = source.frame_name(ref.index)
            save_label_png(first_labels, labels_dir / f"{ref_name}.png")
            no_points = np.zeros((0, 2), np.int64)
            frame0 = VideoFrame(0, first_labels, [object_result(o.label, first_labels, float("nan"), no_points, None,
                                                                ()) for o in objects], 0.0)
            done_rows = [{**_row(ref_name, frame0), "index": ref.index}]
            atomic_write_text(out / RESULTS, json.dumps(done_rows[0]) + "\n")
        else:  # resume: each slot = the object's pixels in the last label map it was present in (Fix B)
            atomic_write_text(out / RESULTS, "".join(json.dumps(r) + "\n" for r in done_rows))
            for obj in objects:
                last = next((r for r in reversed(done_rows)
                             if any(o["label"] == obj.label and o["area"] > 0 for o in r["objects"])), None)
                if last is not None:
                    previous = read_label_map(labels_dir / f"{last['frame']}.png", "--output")
                    obj.slot = torch.from_numpy(previous == obj.label).to(obj.slot.device)
        done = {r["index"] for r in done_rows}  # frame indices only: memory stays flat over a long video
        frames_done = len(done_rows)
        del done_rows
        total = None
        if source.frame_count is not None:
            total = len(range(cfg.ref_frame, source.frame_count, cfg.every_nth))
            total = min(total, cfg.max_frames) if cfg.max_frames is not None else total
        this_run = 0
        with open(out / RESULTS, "a", encoding="utf-8") as results, \
                tqdm(total=total, initial=frames_done, desc="frames", unit="frame") as bar:
            for data in frames:
                if data.index in done:
                    continue
                start = time.perf_counter()
                embedding = tracker.encode(data.image, f"{cfg.source_flag} frame {data.index}")
                labels, objs = tracker.step(embedding, objects, first_labels.dtype)
                del embedding
                frame = VideoFrame(data.index, labels, objs, time.perf_counter() - start)
                name = source.frame_name(data.index)
                save_label_png(labels, labels_dir / f"{name}.png")
                results.write(json.dumps({**_row(name, frame), "index": data.index}) + "\n")
                results.flush()
                frames_done += 1
                this_run += 1
                bar.update(1)
        if cfg.overlay:
            write_overlay(source, out, cfg)
        summary = {"output": str(out), "frames_done": frames_done, "frames_this_run": this_run,
                   "seconds_this_run": round(time.perf_counter() - start_time, 3)}
        atomic_write_json(out / RUN_JSON, {**run_info, "status": "complete", **summary})
        return summary


def label_overlay(image: np.ndarray, labels: np.ndarray, points: list[list[list[int]]] | None = None,
                  alpha: float = 0.5) -> np.ndarray:
    """The frame with each object's pixels tinted in its DAVIS colour and its point prompts as green dots.

    Shapes: ``image (H, W, 3)`` uint8, ``labels (H, W)`` -> ``(H, W, 3)`` uint8.
    """
    from PIL import Image, ImageDraw

    from persam_dreambooth.data.video import davis_palette

    palette = np.asarray(davis_palette(), dtype=np.float32).reshape(256, 3)
    out = image.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[labels[fg].astype(np.uint8)]
    edge = np.zeros_like(fg)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edge] = 255
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if points:
        draw = ImageDraw.Draw(canvas)
        radius = max(2, round(max(image.shape[:2]) / 150))
        for pts in points:
            for x, y in pts:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(0, 220, 0), outline=(0, 0, 0))
    return np.asarray(canvas)


def write_overlay(source: Any, out: Path, cfg: SegmentVideoConfig) -> None:
    """Write ``overlay.mp4`` from the label PNGs, ``results.jsonl`` and the decoded frames (a second streamed pass:
    one frame, one label map and one line of results in memory at a time)."""
    from persam_dreambooth.data.video import VideoWriter, read_label_map

    fps = source.fps / cfg.every_nth
    with open(out / RESULTS, encoding="utf-8") as results, VideoWriter(out / OVERLAY, fps=fps) as writer:
        row = json.loads(next(results))
        for data in source.frames(every_nth=cfg.every_nth, max_frames=cfg.max_frames, start=cfg.ref_frame):
            if data.index != row["index"]:
                continue
            labels = read_label_map(out / LABELS_DIR / f"{row['frame']}.png", "--output")
            writer.write(label_overlay(data.image, labels, [o["points"] for o in row["objects"]]))
            line = next(results, None)
            if line is None:
                break
            row = json.loads(line)
