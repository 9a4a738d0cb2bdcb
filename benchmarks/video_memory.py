"""Peak memory (RSS) of ``persam-dreambooth segment-video`` on long synthetic videos: flat in the video's length.

A synthetic 640x360 video (two moving objects on a moving background, H.264 written with PyAV) of each length is
segmented with the tiny test SAM (so the model costs almost nothing and the peak is what the pipeline holds: the
decoded frame, one embedding, the objects' logit maps, the label map, the overlay frame). Each length runs in a fresh
process (``ru_maxrss`` only grows); the child also samples its current RSS every 10 % of the frames.

    nice -n 19 python benchmarks/video_memory.py --lengths 1000 10000
    nice -n 19 python benchmarks/video_memory.py --lengths 1000 10000 --stage library   # PerSAMVideo.iter_track only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 360, 640


def _frame(t: int):
    """Frame ``t`` ``(H, W, 3)`` uint8 and its label map ``(H, W)`` uint8 (objects 1 and 2)."""
    import numpy as np

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[..., 0] = (xx + 2 * t) % 256
    image[..., 1] = (yy * 2 + t) % 256
    image[..., 2] = 90
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    cx = 150 + (3 * t) % 300
    disc = (yy - 180) ** 2 + (xx - cx) ** 2 < 70**2
    x0 = 420 - (t % 200)
    square = (yy > 40) & (yy < 170) & (xx > x0) & (xx < x0 + 130)
    image[square] = (40, 200, 60)
    labels[square] = 2
    image[disc] = (220, 40, 40)
    labels[disc] = 1
    return image, labels


def _write_video(path: Path, length: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for t in range(length):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(t)[0], format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(stage: str, folder: Path, length: int) -> None:
    sys.path.insert(0, str(ROOT))
    import warnings

    import torch

    from persam_dreambooth import testing as tiny

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tiny.register_tiny_sam()
    video = folder / f"video_{length}.mp4"
    samples: list[tuple[int, float]] = []
    start = time.perf_counter()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if stage == "library":
        from persam_dreambooth import PerSAMVideo
        from persam_dreambooth.data.video import open_video

        tracker = PerSAMVideo(tiny.tiny_sam())
        frames = (f.image for f in open_video(video).frames())
        for frame in tracker.iter_track(frames, _frame(0)[1]):
            if frame.index % max(1, length // 10) == 0:
                samples.append((frame.index, round(_rss_mib(), 1)))
    else:
        import logging

        from persam_dreambooth import cli
        from persam_dreambooth.data.video import save_label_png

        logging.disable(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
        save_label_png(_frame(0)[1], folder / "ref.png")
        code = cli.main(["segment-video", "--video", str(video), "--ref-mask", str(folder / "ref.png"), "--output",
                         str(folder / f"out_{length}"), "--sam-model", "tiny", "--sam-checkpoint",
                         str(folder / "tiny.pth"), "--device", "cpu"])
        assert code == 0, code
        run = json.loads((folder / f"out_{length}" / "run.json").read_text(encoding="utf-8"))
        samples.append((run["frames_done"], None))  # frames written (checks that the whole video was segmented)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"stage": stage, "frames": length, "size": f"{WIDTH}x{HEIGHT}",  # noqa: T201
                      "baseline_mib": round(base / 1024, 1), "peak_mib": round(peak / 1024, 1),
                      "rss_samples_mib": samples, "seconds": round(time.perf_counter() - start, 1)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stage", choices=["cli", "library"], default="cli")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.stage, args.folder, args.lengths[0])
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    from persam_dreambooth import testing as tiny

    with tempfile.TemporaryDirectory(prefix="video-memory-") as tmp:
        folder = Path(tmp)
        torch.save(tiny.tiny_sam().state_dict(), folder / "tiny.pth")
        for length in args.lengths:
            _write_video(folder / f"video_{length}.mp4", length)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", "--stage", args.stage, "--folder", str(folder),
                                  "--lengths", str(length)], check=True, capture_output=True, text=True, env=env)
            print(out.stdout.strip().splitlines()[-1], flush=True)  # noqa: T201
            for item in folder.glob(f"out_{length}"):
                import shutil

                shutil.rmtree(item)
    return 0


if __name__ == "__main__":
    sys.exit(main())
