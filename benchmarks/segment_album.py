"""Images per second of the album pipeline (``segment_images``, what ``persam-dreambooth segment`` runs), in one run,
on the same photos and model:

1. one at a time, float32, loading and writing in the same thread (the loop before issue 3);
   1b. the same with background loading and writing (what ``--batch-size 1``, the faithful default, runs now);
2. batched (``--batch-size N``, background loading, ``segment_embeddings`` decoding when PerSAM has it), for every
   ``--dtypes`` entry (float32 and, e.g., bfloat16 autocast of the encoder);
3. batched with the embedding cache: cold (encodes and writes the cache), then warm (no encoder call at all).

End to end per photo: JPEG decoding, resize, encoder, the PerSAM cascade, and writing the mask PNG + overlay JPEG.
Weights are random (segment_anything's builders, nothing downloaded), so only the speed means something.

    python benchmarks/segment_album.py --model tiny --num-images 24 --batch-size 8 --threads 1
    python benchmarks/segment_album.py --model vit_b --checkpoint /tmp/sam_vit_b_random.pth --num-images 2 \
        --batch-size 2 --size 512 --threads 2
    python benchmarks/segment_album.py --model vit_h --device cuda --num-images 32 --batch-size 8 \
        --dtypes float32 bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(name: str, checkpoint: str | None, device: str):
    if name == "tiny":
        from persam_dreambooth import testing as tiny

        sam = tiny.tiny_sam()
    else:
        from persam_dreambooth.segmentation.sam import SAM_BUILDERS

        torch.manual_seed(0)
        sam = SAM_BUILDERS[name].build()  # random weights, segment_anything's architecture
        if checkpoint:
            sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.to(device).eval()


def write_photos(folder: Path, count: int, size: int) -> tuple[list[Path], object, object]:
    """``count`` synthetic JPEG photos (``size`` x 3/4 ``size``) + a reference image and mask."""
    from PIL import Image

    from persam_dreambooth import testing as tiny

    h, w = (size * 3) // 4, size
    folder.mkdir(parents=True, exist_ok=True)
    ref, mask = tiny.synthetic_subject(h, w, box_yx=(h // 4, w // 4, 3 * h // 4, 3 * w // 4))
    paths = []
    for i in range(count):
        y0, x0 = h // 5 + (i * 7) % (h // 5), w // 5 + (i * 11) % (w // 5)
        image, _ = tiny.synthetic_subject(h, w, box_yx=(y0, x0, y0 + h // 2, x0 + w // 2), seed=i + 1)
        paths.append(folder / f"{i:04d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=92)
    return paths, ref, mask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(persam, paths, out: Path, *, batch_size: int, dtype: str, cache=None, prefetch: int, device: str,
             background: bool = True):
    from persam_dreambooth.albums.batch_encoder import BatchEncoder
    from persam_dreambooth.albums.segment_photos import AlbumOptions, segment_images

    out.mkdir(parents=True, exist_ok=True)
    encoder = BatchEncoder(persam.predictor, dtype, cache)
    options = AlbumOptions(batch_size=batch_size, prefetch=prefetch if background else 0,
                           background_writes=background, progress=False)
    sync(device)
    start = time.perf_counter()
    segment_images(persam, paths, out, options=options, encoder=encoder)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 4), "images_per_second": round(len(paths) / seconds, 3),
            "encoder_calls": encoder.encoder_calls, "encoder_seconds": round(encoder.encoder_seconds, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--checkpoint", default=None, help="state dict to load into --model (else random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--size", type=int, default=640, help="photo width (height = 3/4 of it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="encoder dtypes for the batched mode")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up runs (for slow CPU runs; keep them on a GPU)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from persam_dreambooth import PerSAM
    from persam_dreambooth.albums.embedding_cache import EmbeddingCache, EncoderIdentity

    sam = build_model(args.model, args.checkpoint, args.device)
    persam = PerSAM(sam)
    work = Path(tempfile.mkdtemp(prefix="segment-album-bench-"))
    paths, ref, mask = write_photos(work / "photos", args.num_images, args.size)
    persam.set_reference(ref, mask)
    batched_decoder = hasattr(persam, "segment_embeddings")
    # warm-up (allocator, kernels, autotuning) for every batch shape and dtype used below; not timed
    for dtype in [] if args.no_warmup else sorted({"float32", *args.dtypes}):
        for bs in sorted({1, args.batch_size}):
            run_mode(persam, paths[: min(bs, len(paths))], work / "warmup", batch_size=bs, dtype=dtype, prefetch=0,
                     device=args.device)

    results = {}
    results["1. one at a time, float32"] = run_mode(persam, paths, work / "one", batch_size=1, dtype="float32",
                                                    prefetch=0, device=args.device, background=False)
    results["1b. one at a time, float32, background I/O"] = run_mode(
        persam, paths, work / "one_bg", batch_size=1, dtype="float32", prefetch=args.prefetch, device=args.device)
    for dtype in args.dtypes:
        results[f"2. batched x{args.batch_size}, {dtype}"] = run_mode(
            persam, paths, work / f"batched_{dtype}", batch_size=args.batch_size, dtype=dtype,
            prefetch=args.prefetch, device=args.device)
    for dtype in args.dtypes:
        identity = EncoderIdentity(model_type=args.model, weights_sha256=f"benchmark-random-{args.model}",
                                   img_size=int(sam.image_encoder.img_size), encoder_dtype=dtype)
        cache = EmbeddingCache(work / "cache", identity)
        results[f"3a. batched x{args.batch_size}, {dtype}, cache cold"] = run_mode(
            persam, paths, work / f"cold_{dtype}", batch_size=args.batch_size, dtype=dtype, cache=cache,
            prefetch=args.prefetch, device=args.device)
        results[f"3b. batched x{args.batch_size}, {dtype}, cache warm"] = run_mode(
            persam, paths, work / f"warm_{dtype}", batch_size=args.batch_size, dtype=dtype, cache=cache,
            prefetch=args.prefetch, device=args.device)

    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu x{torch.get_num_threads()} thread(s)")
    setup = {"model": args.model, "weights": args.checkpoint or "random", "device": args.device,
             "device_name": device_name, "photos": f"{args.num_images} synthetic JPEGs {args.size}x"
             f"{(args.size * 3) // 4}", "batch_size": args.batch_size, "prefetch": args.prefetch,
             "batched_decoder": batched_decoder, "torch": torch.__version__}
    print(f"setup: {json.dumps(setup)}")  # noqa: T201
    base = results["1. one at a time, float32"]["images_per_second"]
    for name, r in results.items():
        print(f"  {name:<42} {r['images_per_second']:>9.3f} img/s  ({r['seconds']:.2f} s for {r['images']}, "  # noqa: T201
              f"{r['encoder_calls']} encoder call(s), encoder {r['encoder_seconds']:.2f} s)  "
              f"x{r['images_per_second'] / base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
