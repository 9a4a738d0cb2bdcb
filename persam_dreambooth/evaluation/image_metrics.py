"""DreamBooth's subject- and prompt-fidelity metrics, and the two background measures of our design (§8.4).

All functions here are pure: they take embeddings (from :mod:`persam_dreambooth.evaluation.embedders`) or images
and masks, so they are tested on hand-made inputs with known answers.

Definitions (DreamBooth, Ruiz et al. 2023, §4.1), with ``G`` generated and ``R`` real instance images:

* **DINO** = mean over all pairs ``(g, r) in G x R`` of ``cos(dino(g), dino(r))``, DINO ViT-S/16 CLS embeddings.
* **CLIP-I** = the same with CLIP image embeddings.
* **CLIP-T** = mean over ``g`` of ``cos(clip_text(prompt(g)), clip_image(g))``.

Ours (derived, not a published standard):

* **masked DINO** = DINO between *subject-only* images: the subject's bounding box, padded to a square, every pixel
  outside the subject mask set to :data:`FILL`. The generated image's subject comes from PerSAM, the real images'
  from their training masks. High = the subject itself looks right, whatever the background.
* **background leakage** = DINO between *background-only* images: the whole frame with the (slightly dilated) subject
  mask filled with :data:`FILL`. High = the generated scenes resemble the training photos' backgrounds; lower is
  better, and the base model's value (which never saw the training photos) is the floor to compare with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from persam_dreambooth.masks.ops import dilate
from persam_dreambooth.utils.mask_geometry import bbox

__all__ = [
    "FILL",
    "cosine_matrix",
    "mean_pairwise_cosine",
    "paired_cosine",
    "subject_only",
    "background_only",
    "background_dilation_px",
]

# The ImageNet mean colour: after the models' normalisation it is ~0 in every channel, the most neutral fill.
FILL = (124, 116, 104)


def _as_2d(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"`{name}` must have shape (N, D) with N >= 1, got {tuple(t.shape)}.")
    return t


def cosine_matrix(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """All cosine similarities between the rows of ``a`` and ``b``.

    Shapes:
        ``a (N, D)``, ``b (M, D)`` -> ``(N, M)`` in [-1, 1].
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`a` and `b` must have the same embedding size, got {a.shape[1]} and {b.shape[1]}.")
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    return a @ b.T  # (N, D) @ (D, M) -> (N, M)


def mean_pairwise_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean cosine over all ``N * M`` pairs (DINO, CLIP-I, background leakage).

    Shapes:
        ``a (N, D)``, ``b (M, D)`` -> scalar.
    """
    return float(cosine_matrix(a, b).mean())


def paired_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Cosine between row ``i`` of ``a`` and row ``i`` of ``b`` (CLIP-T: text ``i`` against image ``i``).

    Shapes:
        ``a (N, D)``, ``b (N, D)`` -> ``(N,)``.
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}.")
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"`image` must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"`mask` must have shape (H, W) == image {image.shape[:2]}, got {mask.shape}.")
    return image, mask.astype(bool)


def subject_only(
    image: np.ndarray, mask: np.ndarray, fill: Sequence[int] = FILL, margin: float = 0.05
) -> np.ndarray | None:
    """The subject on a constant background, cropped to a square around it (for masked DINO).

    The mask's bounding box is grown by ``margin`` of its longer side, made square (so the metric models' centre
    crop keeps the whole subject), and every pixel outside the mask is ``fill``. Parts of the square beyond the image
    are ``fill`` too.

    Args:
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool, the subject.
        fill: RGB of the non-subject pixels.
        margin: extra border around the box, as a fraction of its longer side.

    Returns:
        ``(S, S, 3)`` uint8, or ``None`` when the mask is empty (no subject found).
    """
    image, mask = _check_pair(image, mask)
    box = bbox(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    side = max(1, round(side * (1 + 2 * margin)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    height, width = mask.shape
    # The part of the square inside the image, in image and in output coordinates.
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, width), min(top + side, height)
    region = image[sy0:sy1, sx0:sx1]
    keep = mask[sy0:sy1, sx0:sx1]
    target = out[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    target[keep] = region[keep]
    return out


def background_dilation_px(height: int, width: int) -> int:
    """How far the subject mask grows before it is removed: 2 % of the longer side, at least 1 pixel.

    Segmentation edges are never exact; without the margin, a rim of subject pixels would count as background.
    """
    return max(1, round(0.02 * max(height, width)))


def background_only(
    image: np.ndarray, mask: np.ndarray, fill: Sequence[int] = FILL, dilate_px: int | None = None
) -> np.ndarray:
    """The image with the subject (mask grown by ``dilate_px``) replaced by ``fill`` (for background leakage).

    Args:
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool, the subject; an empty mask returns the whole image.
        fill: RGB of the removed pixels.
        dilate_px: mask growth in pixels (default :func:`background_dilation_px`).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    image, mask = _check_pair(image, mask)
    px = background_dilation_px(*mask.shape) if dilate_px is None else dilate_px
    grown = dilate(mask, px) if mask.any() else mask
    out = image.copy()
    out[grown] = np.asarray(fill, dtype=np.uint8)
    return out

