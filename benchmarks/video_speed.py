"""Tracking overhead of ``PerSAMVideo`` over plain SAM making the same encoder and decoder calls (frames/s, CPU).

Both sides get the same frames (854x480, two objects) and the same SAM (ViT-B architecture, random weights: the
speed does not depend on the values). Per tracked frame:

* **PerSAMVideo** (``method="persam"``): encode the frame, then per object the similarity map, its top-2 points, the
  expanded box and three decoder passes, then the composition of the label map and the box propagation.
* **Plain SAM**: ``segment_anything.SamPredictor.set_image`` on the frame, then per object the same three
  ``predict`` calls (pass A with the tracker's points and box, pass B with pass A's logits, pass C with a box and
  pass B's logits). No similarity map, no composition.

The overhead is ``(t_tracker - t_plain) / t_plain`` over the tracked frames (frame 0 excluded), the rounds
interleaved so that both sides see the same machine load; it is reported for wall time and for the process's CPU
time (with one thread, CPU time is the work done and does not depend on the load of a shared machine).

    nice -n 19 python benchmarks/video_speed.py --frames 4 --rounds 2 --threads 2
    python benchmarks/video_speed.py --model vit_h --device cuda --dtype bfloat16 --frames 20   # on a GPU (plain SAM
                                                                                             # stays float32)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _video(num_frames: int, height: int = 480, width: int = 854):
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    frames, labels = [], []
    for t in range(num_frames):
        image = np.stack([(xx + 5 * t) % 256, (yy * 2) % 256, np.full_like(xx, 90)], axis=2).astype(np.float64)
        image += rng.normal(0, 10, image.shape)
        lab = np.zeros((height, width), np.uint8)
        disc = (yy - 240) ** 2 + (xx - 250 - 12 * t) ** 2 < 110**2
        square = (yy > 60) & (yy < 260) & (xx > 560 - 8 * t) & (xx < 760 - 8 * t)
        image[square], lab[square] = (40, 200, 60), 2
        image[disc], lab[disc] = (220, 40, 40), 1
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
        labels.append(lab)
    return frames, labels[0]


def _plain_sam(predictor, frames, prompts) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per frame of plain SAM doing the tracker's encoder and decoder calls."""
    import numpy as np

    seconds, cpu = [], []
    for frame, per_object in zip(frames, prompts, strict=True):
        start, start_cpu = time.perf_counter(), time.process_time()
        predictor.set_image(frame)
        for points, box in per_object:
            labels = np.ones(len(points))
            masks, scores, logits = predictor.predict(points, labels, np.asarray(box)[None], multimask_output=True)
            pick = int(np.argmax(masks.reshape(3, -1).sum(1)))
            masks, scores, logits = predictor.predict(points, labels, mask_input=logits[pick:pick + 1],
                                                      multimask_output=True)
            best = int(np.argmax(scores))
            predictor.predict(points, labels, np.asarray(box)[None], mask_input=logits[best:best + 1],
                              multimask_output=True, return_logits=True)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return seconds, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=4, help="frames per round (the first is the reference)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="vit_b", help="vit_b / vit_l / vit_h (random weights) or tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check: --model vit_h --device cuda)")
    parser.add_argument("--dtype", default="float32", help="the tracker's encoder autocast: float32 or bfloat16")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    from persam_dreambooth import PerSAMVideo

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "tiny":  # plumbing checks only: the test suite's tiny SAM
        from persam_dreambooth import testing as tiny

        sam = tiny.tiny_sam().to(args.device).eval()
    else:
        sam = sam_model_registry[args.model]().to(args.device).eval()
    frames, first_labels = _video(args.frames)
    tracker = PerSAMVideo(sam, encoder_dtype=args.dtype)
    plain = SamPredictor(sam)
    tracked: list[float] = []
    baseline: list[float] = []
    tracked_cpu: list[float] = []
    baseline_cpu: list[float] = []
    for _ in range(args.rounds):
        prompts = []
        start_cpu = time.process_time()
        for frame in tracker.iter_track(frames, first_labels):
            if frame.index:
                tracked.append(frame.seconds)
                tracked_cpu.append(time.process_time() - start_cpu)
                prompts.append([(o.points_xy, o.prompt_box) for o in frame.objects])
            start_cpu = time.process_time()
        wall, cpu = _plain_sam(plain, frames[1:], prompts)
        baseline += wall
        baseline_cpu += cpu
    t_track, t_plain = sum(tracked) / len(tracked), sum(baseline) / len(baseline)
    c_track, c_plain = sum(tracked_cpu) / len(tracked_cpu), sum(baseline_cpu) / len(baseline_cpu)
    print(json.dumps({  # noqa: T201
        "model": args.model, "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "frame_size": "854x480", "objects": 2,
        "tracked_frames": len(tracked), "persam_video_fps": round(1 / t_track, 4),
        "plain_sam_fps": round(1 / t_plain, 4),
        "persam_video_s_per_frame": round(t_track, 3), "plain_sam_s_per_frame": round(t_plain, 3),
        "overhead_percent": round(100 * (t_track - t_plain) / t_plain, 2),
        "persam_video_cpu_s_per_frame": round(c_track, 3), "plain_sam_cpu_s_per_frame": round(c_plain, 3),
        "cpu_overhead_percent": round(100 * (c_track - c_plain) / c_plain, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
