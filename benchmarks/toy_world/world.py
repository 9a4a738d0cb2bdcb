"""A deterministic synthetic world: coloured shapes on textured backgrounds, with exact masks and captions.

Every image is 32x32 RGB (``(H, W, 3) uint8``) with a boolean object mask ``(H, W)`` and a caption such as
"a red square on stripes". The DreamBooth subject is one specific square with a texture no world object has (an
orange / magenta checkerboard), rendered on a fixed background kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (230, 205, 40)}
BACKGROUNDS = ("stripes", "dots", "sky", "grass")
SUBJECT_TOKEN = "sks"
SUBJECT_SHAPE = "square"
SUBJECT_BACKGROUND = "stripes"
SUBJECT_COLORS = ((250, 140, 20), (190, 30, 200))  # the checkerboard's two colours (orange, magenta)
SUBJECT_CELL = 4  # checker cell side in pixels
WORDS = ("a", "on", SUBJECT_TOKEN, *SHAPES, *COLORS, *BACKGROUNDS)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, the object
    shape: str
    color: str  # a COLORS key, or "subject"
    background: str

    @property
    def caption(self) -> str:
        word = SUBJECT_TOKEN if self.color == "subject" else self.color
        return f"a {word} {self.shape} on {self.background}"


def background(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A background of ``kind`` as float ``(H, W, 3)`` in [0, 255], with random phase / jitter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "stripes":  # diagonal grey / white bands, period 8 px
        phase = rng.uniform(0, 8)
        band = (((xx + yy + phase) % 8) < 4).astype(np.float64)
        grey = 70 + 170 * band
        img = np.stack([grey, grey, grey * 0.95], axis=2)
    elif kind == "dots":  # pale dots on dark navy, an 8-px grid with a random offset
        oy, ox = rng.uniform(0, 8, size=2)
        d2 = ((yy + oy) % 8 - 4) ** 2 + ((xx + ox) % 8 - 4) ** 2
        dot = (d2 <= 3.0).astype(np.float64)[..., None]
        img = np.array([30, 30, 80]) * (1 - dot) + np.array([235, 235, 200]) * dot
    elif kind == "sky":  # smooth vertical gradient, light blue to near white
        t = (yy / (size - 1))[..., None] * rng.uniform(0.8, 1.0)
        img = np.array([90, 150, 235]) * (1 - t) + np.array([225, 235, 250]) * t
    elif kind == "grass":  # green noise with vertical blades
        blades = rng.normal(0, 25, size=(1, size)).repeat(size, axis=0)
        img = np.array([55, 135, 45]) + (rng.normal(0, 18, size=(size, size)) + blades)[..., None] * np.array(
            [0.5, 1.0, 0.4])
    else:
        raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")
    return img + rng.normal(0, 4, size=(size, size, 3))


def shape_mask(shape: str, cy: float, cx: float, r: float, size: int = SIZE, ss: int = 4) -> np.ndarray:
    """Boolean ``(H, W)`` mask of ``shape`` centred at (cy, cx) with half-extent r: a pixel is in when >= half of
    its ``ss x ss`` sub-samples are."""
    g = (np.arange(size * ss) + 0.5) / ss
    yy, xx = np.meshgrid(g, g, indexing="ij")
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        inside = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "square":
        inside = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif shape == "triangle":  # apex up
        inside = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    elif shape == "cross":
        arm = r * 0.35
        inside = ((np.abs(dy) <= r) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= r) & (np.abs(dy) <= arm))
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    cover = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))  # (H*ss, W*ss) -> (H, W)
    return cover >= 0.5


def subject_texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The subject's orange / magenta checkerboard, float ``(H, W, 3)``; its phase follows the object."""
    yy, xx = np.mgrid[0:size, 0:size]
    oy, ox = rng.integers(0, SUBJECT_CELL, size=2)
    cell = (((yy + oy) // SUBJECT_CELL + (xx + ox) // SUBJECT_CELL) % 2).astype(bool)[..., None]
    return np.where(cell, np.array(SUBJECT_COLORS[0], float), np.array(SUBJECT_COLORS[1], float))


def render(shape: str, color: str, bg: str, rng: np.random.Generator, size: int = SIZE) -> Sample:
    """One image: a ``shape`` in ``color`` (or ``"subject"``: the checkered one) on background ``bg``."""
    r = rng.uniform(7.0, 10.5)
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    mask = shape_mask(shape, cy, cx, r, size)
    img = background(bg, rng, size)
    if color == "subject":
        obj = subject_texture(rng, size)
    else:
        obj = np.array(COLORS[color], float) * rng.uniform(0.9, 1.1) + np.zeros((size, size, 3))
    obj = obj + rng.normal(0, 5, size=(size, size, 3))
    img[mask] = obj[mask]
    return Sample(np.clip(img, 0, 255).round().astype(np.uint8), mask, shape, color, bg)


def world_samples(n: int, seed: int = 0) -> list[Sample]:
    """``n`` world images (no subject), shape / colour / background drawn uniformly and independently."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        out.append(render(shape, color, bg, rng))
    return out


def subject_samples(n: int = 5, bg: str = SUBJECT_BACKGROUND, seed: int = 1000) -> list[Sample]:
    """The DreamBooth subject rendered ``n`` times on background ``bg`` (positions, sizes, phases vary)."""
    rng = np.random.default_rng(seed)
    return [render(SUBJECT_SHAPE, "subject", bg, rng) for _ in range(n)]


def world_caption(sample: Sample, rng: np.random.Generator) -> str:
    """Training caption of a world image: full (80 %), without the background (10 %), or empty (10 %, for
    classifier-free guidance)."""
    u = rng.uniform()
    if u < 0.8:
        return sample.caption
    if u < 0.9:
        return f"a {sample.color} {sample.shape}"
    return ""
