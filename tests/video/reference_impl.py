"""An independent, straightforward re-statement of the published per-frame video algorithm (with fixes A-C).

Written from docs/design/persam_video.md on the official ``segment_anything.SamPredictor`` (stateful, one image at a
time, the colour trick for the reference cells, the decoder re-run at every PerSAM-F training step), as the published
scripts do. The product (``PerSAMVideo``) must give the same label maps on every frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamPredictor

MARGIN = 10


def _box_prompt(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.any(mask, axis=1)
    cols = np.any(mask, axis=0)
    rmin, rmax = np.where(rows)[0][[0, -1]]
    cmin, cmax = np.where(cols)[0][[0, -1]]
    cmin = 0 if cmin - MARGIN <= 0 else cmin - MARGIN
    rmin = 0 if rmin - MARGIN <= 0 else rmin - MARGIN
    cmax = mask.shape[1] if cmax + MARGIN >= mask.shape[1] else cmax + MARGIN
    rmax = mask.shape[0] if rmax + MARGIN >= mask.shape[0] else rmax + MARGIN
    return np.array([[(cmin + cmax) // 2, (rmin + rmax) // 2]]), np.array([cmin, rmin, cmax, rmax])


def _points(sim: torch.Tensor, topk: int) -> np.ndarray:
    width = sim.shape[1]
    idx = sim.flatten(0).topk(topk)[1]
    rows = idx // width
    cols = idx - rows * width
    return torch.stack([cols, rows], dim=1).cpu().numpy()


def _tight(mask: np.ndarray) -> np.ndarray | None:
    y, x = np.nonzero(mask)
    if len(x) == 0:
        return None
    return np.array([x.min(), y.min(), x.max(), y.max()])


def _similarity(predictor: SamPredictor, target: torch.Tensor) -> torch.Tensor:
    feat = predictor.features.squeeze()
    c, h, w = feat.shape
    feat = feat / feat.norm(dim=0, keepdim=True)
    sim = target @ feat.reshape(c, h * w)
    sim = F.interpolate(sim.reshape(1, 1, h, w), scale_factor=4, mode="bilinear")
    return predictor.model.postprocess_masks(sim, predictor.input_size, predictor.original_size).squeeze()


def _target(predictor: SamPredictor, frame: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    feat = predictor.features.squeeze().permute(1, 2, 0)  # (h, w, C)
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[..., 0] = mask.astype(np.uint8) * 215  # the published colour trick
    resized = predictor.transform.apply_image(rgb)
    tensor = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    tensor = predictor.model.preprocess(tensor)  # normalise like an image, zero-pad
    cell_map = F.interpolate(tensor, size=feat.shape[:2], mode="bilinear")[0, 0]
    selected = feat[cell_map > 0]
    if selected.shape[0] == 0:  # Fix C: the best-covered cell (area pooling of the float-resized mask)
        h_new, w_new = resized.shape[:2]
        img = predictor.model.image_encoder.img_size
        fl = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w_new, h_new), Image.BILINEAR))
        canvas = torch.zeros(1, 1, img, img)
        canvas[0, 0, :h_new, :w_new] = torch.from_numpy(fl.copy())
        cov = F.avg_pool2d(canvas, img // feat.shape[0])[0, 0]
        k = int(torch.argmax(cov.flatten()))
        selected = feat.reshape(-1, feat.shape[-1])[k:k + 1]
    t = selected.max(dim=0)[0] / 2 + selected.mean(0) / 2
    return (t / t.norm()).unsqueeze(0)


def reference_track(sam, frames, first_labels, method="persam", steps=800, lr=4e-4, choices=None):
    """The label maps of every frame; ``choices`` (a list) receives per frame the per-object (A, B, C) choices."""
    topk = 2 if method == "persam" else 1
    predictor = SamPredictor(sam)
    labels = [int(v) for v in np.unique(first_labels) if v != 0]
    slots = [first_labels == v for v in labels]
    predictor.set_image(frames[0])
    targets = [_target(predictor, frames[0], m) for m in slots]
    weights = []
    if method == "persam_f":
        for m, t in zip(slots, targets, strict=True):
            sim = _similarity(predictor, t)
            centre, box = _box_prompt(m)
            pts = np.concatenate([_points(sim, topk), centre])
            w = torch.nn.Parameter(torch.ones(2, 1) / 3)
            opt = torch.optim.AdamW([w], lr=lr, eps=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            gt = torch.tensor(m).float().flatten()[None]
            for _ in range(steps):
                high, _, _ = predictor.predict(pts, np.ones(len(pts)), box[None], multimask_output=True,
                                               return_logits=True)
                high = torch.as_tensor(high).flatten(1)
                weight = torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0)
                mixed = (high * weight).sum(0).unsqueeze(0)
                p = mixed.sigmoid()
                dice = 1 - (2 * (p * gt).sum(-1) + 1) / (p.sum(-1) + gt.sum(-1) + 1)
                ce = F.binary_cross_entropy_with_logits(mixed, gt, reduction="none")
                p_t = p * gt + (1 - p) * (1 - gt)
                focal = ((0.25 * gt + 0.75 * (1 - gt)) * ce * (1 - p_t) ** 2).mean(1)
                loss = (dice + focal).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            weights.append(torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0).detach())
    out = [first_labels.copy()]
    for frame in frames[1:]:
        predictor.set_image(frame)
        maps = []
        picks = []
        for j, t in enumerate(targets):
            sim = _similarity(predictor, t)
            centre, box = _box_prompt(slots[j])
            pts = np.concatenate([_points(sim, topk), centre])
            lbl = np.ones(len(pts))
            if method == "persam":
                masks, scores, logits = predictor.predict(pts, lbl, box[None], multimask_output=True)
                counts = np.array([int(np.sum(m, dtype=np.int64)) for m in masks])  # Fix A
                pick = int(np.argmax(counts))
                choice_a = pick
                masks, scores, logits = predictor.predict(pts, lbl, mask_input=logits[pick:pick + 1],
                                                          multimask_output=True)
            else:
                high, scores, logits = predictor.predict(pts, lbl, box[None], multimask_output=True,
                                                         return_logits=True)
                wn = weights[j].numpy()
                mixed_high = (torch.as_tensor(high) * weights[j].unsqueeze(-1)).sum(0)
                mixed_low = (logits * wn[..., None]).sum(0)
                b = _tight(mixed_high.numpy() > 0)
                choice_a = -1
                if b is None:
                    choice_a = int(np.argmax(scores * wn[0]))
                    b = _tight(high[choice_a] > 0)
                    if b is None:
                        maps.append(mixed_high.numpy())
                        picks.append((choice_a, -1, -1))
                        continue
                masks, scores, logits = predictor.predict(pts, lbl, b[None], mask_input=mixed_low[None],
                                                          multimask_output=True)
            best = int(np.argmax(scores))
            b = _tight(masks[best])
            if b is None:
                raise AssertionError("empty pass-B mask in the reference run: pick another test video")
            high, scores, _ = predictor.predict(pts, lbl, b[None], mask_input=logits[best:best + 1],
                                                multimask_output=True, return_logits=True)
            maps.append(high[int(np.argmax(scores))])
            picks.append((choice_a, best, int(np.argmax(scores))))
        stack = np.concatenate([np.zeros((1, *first_labels.shape), np.uint8), np.stack(maps)], axis=0)
        winner = np.argmax(stack, axis=0)
        lab = np.asarray([0, *labels])[winner].astype(first_labels.dtype)
        for j, v in enumerate(labels):  # Fix B
            if (lab == v).any():
                slots[j] = lab == v
        out.append(lab)
        if choices is not None:
            choices.append(picks)
    return out
