"""PerSAM-F fitting time: ours (decoder once, fused loss) against the published decoder-per-step loop.

Same model, same reference image and mask, same point prompt, same optimiser settings. Measured:

* **ours**: ``PerSAMF.set_reference_embedding`` on an already-encoded reference = reference cells, target, one
  decoder pass, upscaling of the three logit maps, and :func:`fit_scale_weights` for ``--steps`` steps;
  also ``fit_scale_weights`` alone on those logits.
* **published loop**: at every step ``SamPredictor.predict_torch(..., return_logits=True)`` (decoder + upscaling to
  the original size), the published mixing, dice + focal through autograd, ``torch.optim.AdamW`` and
  ``CosineAnnealingLR``. Run for ``--ref-steps`` steps; its per-step time is scaled to ``--steps``.
* **autograd on cached logits** (the in-between): the published loss and optimiser, without the decoder.

With ``--ref-steps == --steps`` the script also reports how far the two fits' weights are apart.
Weights are random (nothing is downloaded) unless ``--checkpoint`` is given.

    python benchmarks/persam_f_fit.py --model tiny --size 512 --ref-steps 1000
    python benchmarks/persam_f_fit.py --model vit_b --checkpoint /tmp/sam_vit_b_random.pth --size 512 --ref-steps 50
    python benchmarks/persam_f_fit.py --model vit_b --device cuda --size 512 --ref-steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGE = Path("/work/shared/data/perseg_sample/Images/cat/00.jpg")
DEFAULT_MASK = Path("/work/shared/data/perseg_sample/Annotations/cat/00.png")


def build_model(name: str, checkpoint: str | None, device: str):
    if name == "tiny":
        from persam_dreambooth import testing as tiny  # the test suite's tiny SAM (64-px frame, 4x4 grid)

        return tiny.tiny_sam().to(device).eval()
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, load_sam

    if checkpoint:
        return load_sam(name, checkpoint=checkpoint, device=device)
    torch.manual_seed(0)
    return SAM_BUILDERS[name].build().to(device).eval()  # random weights


def load_reference(image_path: Path, mask_path: Path, size: int | None):
    from persam_dreambooth.data.images import load_image, load_mask

    image, mask = load_image(image_path), load_mask(mask_path)
    if size:
        scale = size / max(image.shape[:2])
        wh = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = np.array(Image.fromarray(image).resize(wh, Image.Resampling.BILINEAR))
        mask = np.array(Image.fromarray(mask).resize(wh, Image.Resampling.NEAREST))
    return image, mask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Wall time and this process's CPU time (the latter is robust to other jobs on a shared CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def published_loop(sam, image, mask, point, steps, t_max, device):
    """The published training loop: the decoder re-run at every step. Returns (seconds, weights (3,))."""
    from segment_anything import SamPredictor


    predictor = SamPredictor(sam)
    predictor.set_image(image)
    coords = torch.as_tensor(predictor.transform.apply_coords(point.astype(float), image.shape[:2]),
                             dtype=torch.float, device=device)[None]  # (1, 1, 2)
    labels = torch.ones(1, 1, dtype=torch.int, device=device)
    weights = torch.nn.Parameter(torch.ones(2, 1, device=device) / 3)
    optimizer = torch.optim.AdamW([weights], lr=1e-3, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t_max)
    gt = torch.from_numpy(mask).to(device).flatten().float()
    with Clock(device) as clock:
        _published_steps(predictor, coords, labels, weights, optimizer, scheduler, gt, steps)
    return clock, torch.cat((1 - weights.sum(0).unsqueeze(0), weights)).detach().flatten().cpu().numpy()


def _published_steps(predictor, coords, labels, weights, optimizer, scheduler, gt, steps):
    from persam_dreambooth.segmentation.losses import dice_loss, sigmoid_focal_loss

    for _ in range(steps):
        with torch.no_grad():
            high, _, _ = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
        lam = torch.cat((1 - weights.sum(0).unsqueeze(0), weights), dim=0)  # (3, 1)
        mixed = (high[0].flatten(1) * lam).sum(0)
        loss = dice_loss(mixed, gt) + sigmoid_focal_loss(mixed, gt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def autograd_on_cached(logits, mask, steps, t_max, device):
    from persam_dreambooth.segmentation.losses import dice_loss, sigmoid_focal_loss

    weights = torch.nn.Parameter(torch.ones(2, 1, device=device) / 3)
    optimizer = torch.optim.AdamW([weights], lr=1e-3, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t_max)
    gt = torch.from_numpy(mask).to(device).flatten().float()
    flat = logits.flatten(1)
    with Clock(device) as clock:
        for _ in range(steps):
            lam = torch.cat((1 - weights.sum(0).unsqueeze(0), weights), dim=0)
            mixed = (flat * lam).sum(0)
            loss = dice_loss(mixed, gt) + sigmoid_focal_loss(mixed, gt)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, vit_b, vit_l or vit_h (random weights)")
    parser.add_argument("--checkpoint", default=None, help="weights file for --model (default: random)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--mask", type=Path, default=DEFAULT_MASK)
    parser.add_argument("--size", type=int, default=512, help="resize the reference to this long side (0: as is)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--ref-steps", type=int, default=100, help="steps of the published loop actually run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of our fit (the best is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from persam_dreambooth.segmentation.persam_f import PerSAMF
    from persam_dreambooth.segmentation.scale_fit import fit_scale_weights

    sam = build_model(args.model, args.checkpoint, args.device)
    image, mask = load_reference(args.image, args.mask, args.size)
    persamf = PerSAMF(sam, steps=args.steps)
    start = time.perf_counter()
    embedding = persamf.encode(image)
    sync(args.device)
    encode_s = time.perf_counter() - start

    ours, fit_only = [], []
    for _ in range(args.repeats):
        with Clock(args.device) as clock:
            persamf.set_reference_embedding(embedding, mask)
        ours.append(clock)
    ref = persamf.reference
    point = ref.points_xy[0]
    out = persamf.predictor.predict(embedding, point, np.ones(1, np.int64), multimask_output=True)
    logits = persamf.predictor.upscale(out.low_res_logits, embedding)  # (3, H, W)
    gt = torch.from_numpy(mask).to(args.device)
    for _ in range(args.repeats):
        with Clock(args.device) as clock:
            fit_scale_weights(logits, gt, args.steps)
        fit_only.append(clock)
    cached = autograd_on_cached(logits, mask, args.ref_steps, args.steps, args.device)
    loop, loop_weights = published_loop(sam, image, mask, point, args.ref_steps, args.steps, args.device)

    scale = args.steps / args.ref_steps
    print(f"model {args.model} ({'checkpoint' if args.checkpoint else 'random weights'}), device {args.device}, "
          f"threads {torch.get_num_threads()}, reference {image.shape[1]}x{image.shape[0]} "
          f"({int(mask.sum())} mask pixels), {args.steps} steps; seconds as wall / process CPU")
    print(f"  encoder (once, both ways): {encode_s:.3f} wall")
    for kind in ("wall", "cpu"):
        best = min(getattr(c, kind) for c in ours)
        best_fit = min(getattr(c, kind) for c in fit_only)
        loop_s, cached_s = getattr(loop, kind) * scale, getattr(cached, kind) * scale
        print(f"  [{kind}] ours, set_reference_embedding (1 decoder pass + fit): {best:.3f} s "
              f"(fit_scale_weights alone {best_fit:.3f} s = {1e3 * best_fit / args.steps:.3f} ms/step)")
        print(f"  [{kind}] published loop, decoder every step: {loop_s:.3f} s "
              f"({1e3 * loop_s / args.steps:.3f} ms/step; {args.ref_steps} steps run)")
        print(f"  [{kind}] autograd + torch.optim on cached logits: {cached_s:.3f} s "
              f"({1e3 * cached_s / args.steps:.3f} ms/step)")
        print(f"  [{kind}] speed-up vs the published loop: {loop_s / best:.1f}x (fit alone: {loop_s / best_fit:.1f}x; "
              f"fit alone vs autograd on cached logits: {cached_s / best_fit:.1f}x)")
    if args.ref_steps == args.steps:
        diff = float(np.abs(persamf.scale_weights - loop_weights).max())
        print(f"  weights: ours {np.round(persamf.scale_weights, 6).tolist()}, published loop "
              f"{np.round(loop_weights, 6).tolist()}, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
