"""A tiny CNN that reads a world image: shape, colour (a world colour or the subject's checkerboard), background
kind, and a per-pixel object mask. Trained on freshly rendered world images with blur / noise / colour jitter so
that it also reads the slightly blurry images a diffusion model decodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import world
from .base_model import HERE, cache_root, to_tensor

logger = logging.getLogger(__name__)
COLOR_CLASSES = (*world.COLORS, "subject")
TRAINING_VERSION = 1  # bump when the detector or its training changes


@dataclass(frozen=True)
class DetectorConfig:
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    width: int = 16
    pool_size: int = 6000  # rendered images, redrawn each epoch from one seeded stream
    subject_fraction: float = 0.2  # share of images showing the subject (checkered square) on any background
    seed: int = 0


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU())


class WorldDetector(nn.Module):
    """``forward(x (B, 3, 32, 32) in [-1, 1])`` -> shape (B, 4), colour (B, 5), background (B, 4) logits and a
    mask logit map (B, 32, 32)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.b1, self.b2, self.b3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.seg = nn.Conv2d(w + 2 * w + 4 * w, 1, 1)
        self.heads = nn.ModuleDict({"shape": nn.Linear(8 * w, len(world.SHAPES)),
                                    "color": nn.Linear(8 * w, len(COLOR_CLASSES)),
                                    "background": nn.Linear(8 * w, len(world.BACKGROUNDS))})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.b1(x)  # (B, w, 32, 32)
        f2 = self.b2(F.avg_pool2d(f1, 2))  # (B, 2w, 16, 16)
        f3 = self.b3(F.avg_pool2d(f2, 2))  # (B, 4w, 8, 8)
        size = x.shape[-2:]
        feats = torch.cat([f1, F.interpolate(f2, size=size, mode="bilinear"),
                           F.interpolate(f3, size=size, mode="bilinear")], dim=1)  # (B, 7w, 32, 32)
        mask_logit = self.seg(feats)[:, 0]  # (B, 32, 32)
        m = torch.sigmoid(mask_logit).unsqueeze(1)  # (B, 1, 32, 32)
        inside = (f1 * m).sum((2, 3)) / (m.sum((2, 3)) + 1.0)  # (B, w): object-region colour features
        outside = torch.cat([(f1 * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + 1.0),
                             f2.mean((2, 3))], dim=1)  # (B, 3w): background features
        pooled = torch.cat([f3.amax((2, 3)), inside, outside], dim=1)  # (B, 8w)
        out = {name: head(pooled) for name, head in self.heads.items()}
        out["mask"] = mask_logit
        return out


def render_labelled(n: int, rng: np.random.Generator, subject_fraction: float) -> tuple[list, dict[str, np.ndarray]]:
    samples = []
    for _ in range(n):
        bg = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
        if rng.uniform() < subject_fraction:
            samples.append(world.render(world.SUBJECT_SHAPE, "subject", bg, rng))
        else:
            shape = world.SHAPES[rng.integers(len(world.SHAPES))]
            samples.append(world.render(shape, list(world.COLORS)[rng.integers(len(world.COLORS))], bg, rng))
    labels = {"shape": np.array([world.SHAPES.index(s.shape) for s in samples]),
              "color": np.array([COLOR_CLASSES.index(s.color) for s in samples]),
              "background": np.array([world.BACKGROUNDS.index(s.background) for s in samples])}
    return samples, labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (half the batch), colour gain and noise, as in decoded generations. ``x``: (B, 3, H, W)."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.5
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    gain = 1 + 0.1 * torch.randn(b, 3, 1, 1, generator=gen)
    return (x * gain + 0.06 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train_detector(config: DetectorConfig) -> tuple[WorldDetector, dict]:
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 7)
    samples, labels = render_labelled(config.pool_size, rng, config.subject_fraction)
    x_all = to_tensor([s.image for s in samples])
    m_all = torch.from_numpy(np.stack([s.mask for s in samples])).float()
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    model = WorldDetector(config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.steps), desc="detector", mininterval=10):
        idx = torch.randint(len(x_all), (config.batch,), generator=gen)
        out = model(augment(x_all[idx], gen))
        loss = F.binary_cross_entropy_with_logits(out["mask"], m_all[idx])
        loss = loss + sum(F.cross_entropy(out[k], y_all[k][idx]) for k in y_all)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test, test_labels = render_labelled(1000, np.random.default_rng(config.seed + 99), config.subject_fraction)
    pred = detect(model, np.stack([s.image for s in test]))
    info = {"config": asdict(config), "wall_s": time.time() - t0,
            **{f"clean_acc_{k}": float((pred[k] == test_labels[k]).mean()) for k in test_labels},
            "clean_mask_iou": float(np.mean([_iou(p, s.mask) for p, s in zip(pred["mask"], test, strict=True)]))}
    return model, info


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@torch.no_grad()
def detect(model: WorldDetector, images: np.ndarray) -> dict[str, np.ndarray]:
    """``images`` (N, 32, 32, 3) uint8 -> class indices ``shape``/``color``/``background`` (N,) and ``mask``
    (N, 32, 32) bool."""
    outs = [model(to_tensor(list(images[i:i + 256]))) for i in range(0, len(images), 256)]
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    res = {k: out[k].argmax(1).numpy() for k in ("shape", "color", "background")}
    res["mask"] = (out["mask"] > 0).numpy()
    return res


def detector_hash(config: DetectorConfig) -> str:
    h = hashlib.sha256(json.dumps({**asdict(config), "version": TRAINING_VERSION}, sort_keys=True).encode())
    h.update((HERE / "world.py").read_bytes())
    return h.hexdigest()[:16]


def load_detector(config: DetectorConfig = DetectorConfig(), root: Path | None = None) -> tuple[WorldDetector, dict]:
    """The cached detector for ``config`` (trained on first use) and its clean-image accuracy record."""
    folder = (root or cache_root()) / f"detector-{detector_hash(config)}"
    if not (folder / "detector.json").is_file():
        model, info = train_detector(config)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "detector.pt")
        (folder / "detector.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        logger.info("detector trained in %.0f s: %s", info["wall_s"], info)
    model = WorldDetector(config.width)
    model.load_state_dict(torch.load(folder / "detector.pt", weights_only=True))
    return model.eval(), json.loads((folder / "detector.json").read_text(encoding="utf-8"))
