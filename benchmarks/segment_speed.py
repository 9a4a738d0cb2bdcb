"""Seconds per image: ``PerSAM.segment`` against plain SAM doing the same work, on the same model and images.

Two plain-SAM baselines, both with the prompts PerSAM used (points; points + mask input; points + box + mask input):

* **SamPredictor** as users call it: ``set_image`` (one encoder pass) + three ``predict`` calls. Each ``predict``
  upscales *all* its masks to the original size and copies them to numpy (1 + 3 + 3 = 7 full-size maps), which PerSAM
  does not do, so this baseline flatters PerSAM on large photos.
* **lean**: the same encoder pass and three decoder passes (``prompt_encoder`` + ``mask_decoder``), upscaling only
  what a three-pass cascade needs: the stage-2 mask (for its box) and the final mask. This is "the same work", so
  ``PerSAM - lean`` is PerSAM's own overhead: the similarity map at full resolution, point selection, the attention
  prior and the two injections in the decoder.

Weights are random (nothing is downloaded): the architecture comes from segment_anything's builders.

    python benchmarks/segment_speed.py --model vit_b --device cpu --num-images 3 --repeats 3
    python benchmarks/segment_speed.py --model tiny --repeats 5

Images: ``--images DIR`` (a PerSeg-style ``Images/<object>/*.jpg`` tree or a plain folder; the first image is the
reference, with its ``Annotations/<object>/<stem>.png`` mask if present, else a centred box mask), default
``/work/shared/data/perseg_sample`` if it exists, else synthetic photos.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = Path("/work/shared/data/perseg_sample")


def build_model(name: str, device: str):
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS

    if name == "tiny":
        from persam_dreambooth import testing as tiny  # the test suite's tiny SAM (64-px frame, 4x4 grid)

        sam = tiny.tiny_sam()
    else:
        torch.manual_seed(0)
        sam = SAM_BUILDERS[name].build()  # segment_anything builder, checkpoint=None: random weights
    return sam.to(device).eval()


def load_images(source: Path | None, count: int, size: int):
    """``(reference image, reference mask, [test images])`` as uint8 arrays."""
    from persam_dreambooth.data.images import find_mask_for, list_images, load_image, load_mask

    if source is not None and source.exists():
        root = source / "Images" if (source / "Images").is_dir() else source
        folders = sorted(p for p in root.iterdir() if p.is_dir()) or [root]
        paths = [p for f in folders for p in list_images(f)]
        ref_path = paths[0]
        ann = source / "Annotations" / ref_path.parent.name
        mask_path = find_mask_for(ref_path, ann) if ann.is_dir() else None
        ref = load_image(ref_path)
        if mask_path is not None:
            mask = load_mask(mask_path)
        else:
            mask = np.zeros(ref.shape[:2], dtype=bool)
            h, w = mask.shape
            mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        tests = [load_image(p) for p in paths[1 : 1 + count]]
        return ref, mask, tests, f"{source} ({len(tests)} of {len(paths) - 1} test images)"
    from persam_dreambooth import testing as tiny

    ref, mask = tiny.synthetic_subject(size, size, box_yx=(size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    tests = [tiny.synthetic_subject(size, size, box_yx=(size // 5 + i, size // 3, 3 * size // 4, 4 * size // 5),
                                    seed=i + 1)[0] for i in range(count)]
    return ref, mask, tests, f"synthetic {size}x{size}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_persam(persam, image, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = persam.segment(image)
    sync(device)
    return time.perf_counter() - start, result


def encode_timed(predictor, image, device, encode: bool) -> tuple[float, float]:
    """Start the clock and run ``set_image`` if ``encode``; returns ``(start, end of encoding)`` times."""
    sync(device)
    start = time.perf_counter()
    if encode:
        predictor.set_image(image)
        sync(device)
    return start, time.perf_counter()


def time_plain(predictor, image, result, device, encode: bool = True) -> tuple[float, float]:
    """SamPredictor: one encoder pass + the three decoder passes with the prompts PerSAM used.

    Returns ``(encoder seconds, decoder-side seconds)``; with ``encode=False`` the image must already be set.
    """
    pts, lbl = result.points_xy, result.point_labels
    box = result.box_xyxy if result.box_xyxy is not None else np.array([0, 0, image.shape[1] - 1, image.shape[0] - 1])
    start, mid = encode_timed(predictor, image, device, encode)
    _, s1, l1 = predictor.predict(pts, lbl, multimask_output=False)
    _, s2, l2 = predictor.predict(pts, lbl, mask_input=l1[0:1], multimask_output=True)
    b = int(np.argmax(s2))
    predictor.predict(pts, lbl, box=box[None], mask_input=l2[b : b + 1], multimask_output=True)
    sync(device)
    return mid - start, time.perf_counter() - mid


@torch.no_grad()
def time_lean(predictor, image, result, device, encode: bool = True) -> tuple[float, float]:
    """Plain SAM, same work as PerSAM's cascade: one encoder pass, three decoder passes, two mask upscalings.

    Returns ``(encoder seconds, decoder-side seconds)``; with ``encode=False`` the image must already be set.
    """
    sam = predictor.model
    original = image.shape[:2]
    pts, lbl = result.points_xy, result.point_labels
    start, mid = encode_timed(predictor, image, device, encode)
    coords = torch.as_tensor(predictor.transform.apply_coords(pts.astype(np.float64), original), dtype=torch.float,
                             device=device)[None]  # (N, 2) -> (1, N, 2)
    labels = torch.as_tensor(lbl, dtype=torch.int, device=device)[None]  # (N,) -> (1, N)
    pe = sam.prompt_encoder.get_dense_pe()

    def decode(masks=None, boxes=None, multimask=True):
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
        low, iou = sam.mask_decoder(predictor.features, pe, sparse, dense, multimask_output=multimask)
        best = int(iou[0].argmax())
        return low[0, best : best + 1]  # (1, h_lr, w_lr)

    low1 = decode(multimask=False)
    low2 = decode(masks=low1[None])
    mask2 = sam.postprocess_masks(low2[None], predictor.input_size, original)[0, 0] > sam.mask_threshold  # (H, W)
    rows, cols = torch.nonzero(mask2.any(1)).flatten(), torch.nonzero(mask2.any(0)).flatten()
    if rows.numel():
        box = np.array([[cols[0].item(), rows[0].item(), cols[-1].item(), rows[-1].item()]], dtype=np.float64)
    else:
        box = np.array([[0, 0, original[1] - 1, original[0] - 1]], dtype=np.float64)
    boxes = torch.as_tensor(predictor.transform.apply_boxes(box, original), dtype=torch.float, device=device)
    low3 = decode(masks=low2[None], boxes=boxes)
    final = sam.postprocess_masks(low3[None], predictor.input_size, original)[0, 0] > sam.mask_threshold
    final.cpu().numpy()
    sync(device)
    return mid - start, time.perf_counter() - mid


def time_cascade(persam, embedding, device) -> float:
    """PerSAM on a cached embedding: everything except the encoder."""
    sync(device)
    start = time.perf_counter()
    persam.segment_embedding(embedding)
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--num-images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end repeats per image")
    parser.add_argument("--decode-repeats", type=int, default=10, help="decoder-side repeats per image")
    parser.add_argument("--synthetic-size", type=int, default=512, help="side of synthetic photos (no --images)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from segment_anything import SamPredictor

    from persam_dreambooth import PerSAM

    sam = build_model(args.model, args.device)
    ref, mask, tests, what = load_images(args.images, args.num_images, args.synthetic_size)
    persam = PerSAM(sam)
    persam.set_reference(ref, mask)
    predictor = SamPredictor(sam)
    # warm-up (allocator, kernels) on the first image, not timed
    _, warm = time_persam(persam, tests[0], args.device)
    time_plain(predictor, tests[0], warm, args.device)

    # A. end to end: PerSAM.segment vs SamPredictor.set_image + 3 predicts vs lean plain SAM, interleaved so that
    #    drift hits all alike
    per_persam, per_plain, per_lean, per_encoder = [], [], [], []
    # B. decoder side only, on the same encoded image (no encoder noise): PerSAM cascade vs 3 predicts vs lean
    per_cascade, per_decode, per_lean_decode = [], [], []
    for image in tests:
        ours, theirs, lean, enc = [], [], [], []
        result = None
        for _ in range(args.repeats):
            t, result = time_persam(persam, image, args.device)
            ours.append(t)
            e, d = time_plain(predictor, image, result, args.device)
            enc.append(e)
            theirs.append(e + d)
            e, d = time_lean(predictor, image, result, args.device)
            lean.append(e + d)
        per_persam.append(statistics.median(ours))
        per_plain.append(statistics.median(theirs))
        per_lean.append(statistics.median(lean))
        per_encoder.append(statistics.median(enc))
        embedding = persam.encode(image)
        casc, dec, lean_dec = [], [], []
        for _ in range(args.decode_repeats):
            casc.append(time_cascade(persam, embedding, args.device))
            dec.append(time_plain(predictor, image, result, args.device, encode=False)[1])
            lean_dec.append(time_lean(predictor, image, result, args.device, encode=False)[1])
        per_cascade.append(statistics.median(casc))
        per_decode.append(statistics.median(dec))
        per_lean_decode.append(statistics.median(lean_dec))

    mean = statistics.mean
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    lines = [f"model {args.model} (random weights), device {args.device} [{device_name}], images: {what}",
             f"repeats {args.repeats} end-to-end, {args.decode_repeats} decoder-side (median per image, mean over "
             "images)"]
    for i, image in enumerate(tests):
        h, w = image.shape[:2]
        lines.append(f"  image {i} ({w}x{h}): PerSAM {per_persam[i]:.4f} s | SamPredictor {per_plain[i]:.4f} s | lean "
                     f"{per_lean[i]:.4f} s (encoder {per_encoder[i]:.4f} s) | decoder side: PerSAM "
                     f"{per_cascade[i]:.4f} s, SamPredictor {per_decode[i]:.4f} s, lean {per_lean_decode[i]:.4f} s")
    e2e_plain = 100.0 * (mean(per_persam) - mean(per_plain)) / mean(per_plain)
    e2e_lean = 100.0 * (mean(per_persam) - mean(per_lean)) / mean(per_lean)
    extra = mean(per_cascade) - mean(per_lean_decode)
    split = 100.0 * extra / (mean(per_encoder) + mean(per_lean_decode))
    lines += [
        f"A. end to end: PerSAM.segment {mean(per_persam):.4f} s/image; SamPredictor (1 encoder + 3 predict) "
        f"{mean(per_plain):.4f} s/image -> {e2e_plain:+.2f} %; lean plain SAM (same work) {mean(per_lean):.4f} "
        f"s/image -> overhead {e2e_lean:+.2f} %",
        f"B. decoder side: PerSAM cascade {mean(per_cascade):.4f} s, SamPredictor 3 predicts "
        f"{mean(per_decode):.4f} s, lean 3 decoder passes {mean(per_lean_decode):.4f} s -> PerSAM's own extra "
        f"{extra:+.4f} s/image = "
        f"{split:+.2f} % of lean plain SAM's total ({mean(per_encoder):.4f} s encoder + "
        f"{mean(per_lean_decode):.4f} s decoder)",
    ]
    for line in lines:
        print(line)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
