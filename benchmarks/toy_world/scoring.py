"""Leakage, prompt fidelity and subject fidelity of generated world images, read by the world detector.

- background leakage: of the images whose prompt asks for a background other than the training one, the fraction
  the detector classifies as the training background;
- prompt fidelity: the fraction whose detected background is the one the prompt asks for;
- subject fidelity: histogram intersection (4 bins per channel, 64 bins) between the colours inside the detected
  object mask and the colours inside the exact masks of the training images (1 = same colour distribution); an
  image with (almost) no detected object scores 0. ``subject_rate`` is the fraction the detector's colour head
  calls the subject's checkerboard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world
from .detector import COLOR_CLASSES, WorldDetector, detect

MIN_OBJECT_PX = 12


def color_hist(pixels: np.ndarray, bins: int = 4) -> np.ndarray:
    """``pixels`` (K, 3) uint8 -> normalised histogram (bins**3,); all zeros when K == 0."""
    q = (pixels.astype(np.int64) * bins) // 256  # (K, 3) in [0, bins)
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
    return h / h.sum() if h.sum() else h


def reference_hist(samples: list[world.Sample]) -> np.ndarray:
    """The subject's colour histogram: all object pixels (exact masks) of the training images."""
    return color_hist(np.concatenate([s.image[s.mask] for s in samples]))


def asked_background(prompt: str) -> str | None:
    """The background word a prompt asks for ("... on dots" -> "dots"), or None."""
    words = prompt.split()
    if "on" in words and words.index("on") + 1 < len(words) and words[words.index("on") + 1] in world.BACKGROUNDS:
        return words[words.index("on") + 1]
    return None


@dataclass
class Scores:
    """Per-image arrays, all of length N."""

    asked: np.ndarray  # background asked for (str, "" when none)
    background: np.ndarray  # detected background (str)
    shape: np.ndarray  # detected shape (str)
    color: np.ndarray  # detected colour class (str)
    subject_sim: np.ndarray  # float in [0, 1]

    def summary(self, train_background: str = world.SUBJECT_BACKGROUND, shape: str = world.SUBJECT_SHAPE) -> dict:
        other = (self.asked != "") & (self.asked != train_background)
        asked = self.asked != ""
        return {
            "n": int(len(self.asked)),
            "leakage": float((self.background[other] == train_background).mean()) if other.any() else float("nan"),
            "prompt_fidelity": float((self.background[asked] == self.asked[asked]).mean()) if asked.any()
            else float("nan"),
            "subject_fidelity": float(self.subject_sim.mean()),
            "subject_rate": float((self.color == "subject").mean()),
            "shape_rate": float((self.shape == shape).mean()),
            # what the images show instead: detected background kinds when another than the training one was asked
            "detected_backgrounds": {bg: float((self.background[other] == bg).mean()) if other.any() else 0.0
                                     for bg in world.BACKGROUNDS},
        }


def score_images(model: WorldDetector, images: np.ndarray, prompts: list[str], ref_hist: np.ndarray) -> Scores:
    """``images`` (N, 32, 32, 3) uint8 with their ``prompts`` (N,)."""
    if len(images) != len(prompts):
        raise ValueError(f"score_images needs one prompt per image, got {len(images)} images, {len(prompts)} prompts")
    det = detect(model, images)
    sims = []
    for img, m in zip(images, det["mask"], strict=True):
        if m.sum() < MIN_OBJECT_PX:
            sims.append(0.0)
        else:
            sims.append(float(np.minimum(color_hist(img[m]), ref_hist).sum()))
    return Scores(
        asked=np.array([asked_background(p) or "" for p in prompts]),
        background=np.array([world.BACKGROUNDS[i] for i in det["background"]]),
        shape=np.array([world.SHAPES[i] for i in det["shape"]]),
        color=np.array([COLOR_CLASSES[i] for i in det["color"]]),
        subject_sim=np.array(sims),
    )


def mean_ci(values: list[float], z_table: dict[int, float] | None = None) -> tuple[float, float]:
    """Mean and the half-width of a 95 % Student-t confidence interval over ``values`` (seeds)."""
    t95 = z_table or {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(t95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v)))
