"""Web app speed, server side (issue 12): click-to-preview latency on a cached embedding, and propagation throughput
against the ``segment`` command on the same photos.

1. **Click latency**: ``Controller.click`` end to end as the page calls it (map the click, update project.json under
   the lock, SAM's prompt encoder + mask decoder on the cached embedding, write masks/<stem>.png atomically, draw the
   overlay picture), after one click has encoded the photo. Also SAM's decode alone (``Engine.preview``).
2. **Propagation**: the app's "Propagate" (``Controller.propagate``: encode each photo, PerSAM cascade, write masks and
   state) vs ``persam-dreambooth segment`` run in-process on the same photos with the same reference mask and the
   same SAM weights file. Both load SAM from that file and encode the reference and every other photo once;
   ``segment`` gets the photos other than the reference, which is what the app segments. Runs alternate, the median
   of ``--repeats`` is reported.

Weights are random (nothing is downloaded): ``tiny`` is the test SAM, ``vit_b`` / ``vit_h`` segment_anything's
architectures with random weights (saved to a temporary file first, as the CLI needs a file).

    python benchmarks/ui_latency.py --model tiny --num-images 8 --size 512
    python benchmarks/ui_latency.py --model vit_b --num-images 4 --size 1024 --repeats 2 --clicks 10
    python benchmarks/ui_latency.py --model vit_h --device cuda --num-images 16 --size 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from persam_dreambooth import testing as tiny  # noqa: E402
from persam_dreambooth.cli import main as cli_main  # noqa: E402
from persam_dreambooth.ui.app import Controller  # noqa: E402
from persam_dreambooth.ui.engine import Engine  # noqa: E402
from persam_dreambooth.ui.project import Project  # noqa: E402


def write_photos(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size * 3 // 4, size
    paths = []
    for i in range(count):
        y0, x0 = height // 5 + 3 * i, width // 5 + 4 * i
        image, _ = tiny.synthetic_subject(height, width, box_yx=(y0, x0, y0 + height // 2, x0 + width // 2), seed=i)
        path = folder / f"p{i:02d}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
    return paths


def save_weights(model: str, folder: Path) -> Path:
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS

    tiny.register_tiny_sam()
    torch.manual_seed(0)
    sam = tiny.tiny_sam() if model == "tiny" else SAM_BUILDERS[model].build()
    path = folder / f"{model}.pth"
    torch.save(sam.state_dict(), path)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def click_latency(work: Path, photos: list[Path], model: str, weights: Path, device: str, clicks: int) -> dict:
    project = Project(work / "click-project")
    project.import_files(photos[:1])
    name = project.list_photos()[0].name
    ctl = Controller(project, Engine(model, str(weights), device))
    height, width = project.load_photo(name).shape[:2]
    scale = min(1.0, 1024 / max(height, width))
    ctl.click(name, "positive click", [width * scale / 2, height * scale / 2])  # loads SAM, encodes the photo
    rng = np.random.default_rng(0)
    from persam_dreambooth.ui.engine import Prompt

    ends, decodes, end_cpu, decode_cpu = [], [], [], []
    for i in range(clicks):
        xy = [float(rng.uniform(0.2, 0.8) * width * scale), float(rng.uniform(0.2, 0.8) * height * scale)]
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        ctl.click(name, "negative click" if i % 3 == 2 else "positive click", xy)
        sync(device)
        ends.append(time.perf_counter() - t0)
        end_cpu.append(time.process_time() - c0)
        prompt = Prompt.from_json(project.read_state()["reference"])
        t0, c0 = time.perf_counter(), time.process_time()
        ctl.engine.preview(project.photo_path(name), prompt)
        sync(device)
        decodes.append(time.perf_counter() - t0)
        decode_cpu.append(time.process_time() - c0)
    assert ctl.engine.encoder_calls == 1, ctl.engine.encoder_calls
    return {"clicks": clicks, "end_to_end_ms_median": 1000 * statistics.median(ends),
            "end_to_end_ms_p90": 1000 * float(np.percentile(ends, 90)),
            "end_to_end_cpu_ms_median": 1000 * statistics.median(end_cpu),
            "sam_decode_ms_median": 1000 * statistics.median(decodes),
            "sam_decode_cpu_ms_median": 1000 * statistics.median(decode_cpu), "photo_hw": [height, width]}


def propagate_app(work: Path, photos: list[Path], model: str, weights: Path, device: str, tag: str) -> float:
    project = Project(work / f"app-{tag}")
    project.import_files(photos)
    names = [p.name for p in project.list_photos()]
    ref_mask = np.asarray(Image.open(work / "ref_mask.png")) > 0
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    engine = Engine(model, str(weights), device)
    ctl = Controller(project, engine)
    project.save_mask(names[0], ref_mask)  # the reference mask, as a click would have made it
    project.update_state(lambda s: s.__setitem__("reference", {"photo": names[0], "points": [], "box": None}))
    ctl.propagate("PerSAM", 0.65, 0.7)
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert engine.encoder_calls == len(photos)
    return seconds, cpu


def propagate_cli(work: Path, photos: list[Path], model: str, weights: Path, device: str, tag: str) -> float:
    out = work / f"segment-{tag}"
    argv = ["segment", "--ref-image", str(photos[0]), "--ref-mask", str(work / "ref_mask.png"), "--images",
            *[str(p) for p in photos[1:]], "--output", str(out), "--sam-model", model, "--sam-checkpoint",
            str(weights), "--device", device]
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    code = cli_main(argv)
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert code == 0 and len(list(out.glob("p*.png"))) == len(photos) - 1
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, vit_b, vit_l or vit_h (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="photo width (height = 3/4 of it)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="propagation runs of each (0: clicks only)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = write_photos(work / "photos", args.num_images, args.size)
        _, mask = tiny.synthetic_subject(args.size * 3 // 4, args.size,
                                         box_yx=(args.size * 3 // 20, args.size // 5, args.size * 3 // 20
                                                 + args.size * 3 // 8, args.size // 5 + args.size // 2))
        Image.fromarray(mask.astype(np.uint8) * 255).save(work / "ref_mask.png")
        weights = save_weights(args.model, work)
        click = click_latency(work, photos, args.model, weights, args.device, args.clicks)
        runs: dict[str, list[tuple[float, float]]] = {"app": [], "cli": []}
        for r in range(args.repeats):
            order = (("app", propagate_app), ("cli", propagate_cli)) if r % 2 == 0 else (
                ("cli", propagate_cli), ("app", propagate_app))
            for kind, fn in order:
                runs[kind].append(fn(work, photos, args.model, weights, args.device, f"{kind}{r}"))
        figures = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
                   "photos": args.num_images, "size": [args.size * 3 // 4, args.size], "click": click}
        if args.repeats:
            app_s, cli_s = (statistics.median(t for t, _ in runs[k]) for k in ("app", "cli"))
            app_cpu, cli_cpu = (statistics.median(c for _, c in runs[k]) for k in ("app", "cli"))
            figures.update({
                "propagate_app_s": runs["app"], "segment_cli_s": runs["cli"],  # (wall, cpu) per run
                "app_photos_per_s": (args.num_images - 1) / app_s,
                "segment_photos_per_s": (args.num_images - 1) / cli_s,
                "app_overhead_pct": 100 * (app_s / cli_s - 1), "app_overhead_cpu_pct": 100 * (app_cpu / cli_cpu - 1),
            })
    print(f"model {args.model} on {args.device} ({figures['threads']} thread(s)), photos {figures['size'][0]}x"
          f"{figures['size'][1]}")
    print(f"click -> mask, end to end (server): median {click['end_to_end_ms_median']:.1f} ms wall "
          f"({click['end_to_end_cpu_ms_median']:.1f} ms CPU), p90 {click['end_to_end_ms_p90']:.1f} ms; SAM decode "
          f"alone {click['sam_decode_ms_median']:.1f} ms wall ({click['sam_decode_cpu_ms_median']:.1f} ms CPU) "
          f"({args.clicks} clicks, cached embedding)")
    if args.repeats:
        print(f"propagate {args.num_images - 1} photos: app {app_s:.2f} s wall / {app_cpu:.2f} s CPU "
              f"({figures['app_photos_per_s']:.3f} photos/s) vs segment {cli_s:.2f} s wall / {cli_cpu:.2f} s CPU "
              f"({figures['segment_photos_per_s']:.3f} photos/s): app overhead {figures['app_overhead_pct']:+.1f} % "
              f"wall, {figures['app_overhead_cpu_pct']:+.1f} % CPU (runs (wall, CPU): app "
              f"{[(round(t, 2), round(c, 2)) for t, c in runs['app']]}, segment "
              f"{[(round(t, 2), round(c, 2)) for t, c in runs['cli']]})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    os.environ.pop("GRADIO_TEMP_DIR", None)


if __name__ == "__main__":
    main()
