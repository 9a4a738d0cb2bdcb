"""Mask operations for training: dilation, feathering, latent-resolution downsampling, coverage.

Masks here are float tensors in [0, 1] (soft edges are allowed) or bool tensors / arrays. Shapes use ``H, W`` for
image pixels and ``h, w`` for the latent grid; a leading ``...`` means any number of batch dimensions.

Design (docs/design/masked_dreambooth.md, Decision 1): the mask follows the image through every geometric transform, is
optionally dilated (``mask_dilate_px``) and feathered in image pixels, and reaches latent resolution by *area
averaging*, so a latent cell half covered by the subject gets weight 0.5 and the mean coverage is preserved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dilate", "feather", "to_latent_resolution", "coverage"]

MaskT = TypeVar("MaskT", torch.Tensor, np.ndarray)


def _as_float_4d(mask: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, tuple[int, ...], torch.dtype | None]:
    """``(..., H, W)`` -> ``(N, 1, H, W)`` float32, plus the leading shape and the input dtype (to restore)."""
    tensor = torch.as_tensor(mask)
    if tensor.ndim < 2:
        raise ValueError(f"`mask` must have shape (..., H, W), got {tuple(tensor.shape)}.")
    lead = tuple(tensor.shape[:-2])
    height, width = tensor.shape[-2:]
    flat = tensor.reshape(-1, 1, height, width).float()  # (..., H, W) -> (N, 1, H, W)
    return flat, lead, tensor.dtype


def _restore(flat: torch.Tensor, lead: tuple[int, ...], dtype: torch.dtype | None, as_numpy: bool) -> Any:
    out = flat.reshape(*lead, *flat.shape[-2:])  # (N, 1, H, W) -> (..., H, W)
    if dtype == torch.bool:
        out = out > 0.5
    return out.numpy() if as_numpy else out


def _copy(mask: MaskT) -> MaskT:
    return mask.copy() if isinstance(mask, np.ndarray) else mask.clone()


def dilate(mask: MaskT, px: int) -> MaskT:
    """Grow the mask by ``px`` pixels with a disk (grayscale dilation: each pixel takes the max within radius px).

    Works on bool and soft masks; returns the input's type (numpy in, numpy out) and dtype.

    Args:
        mask: ``(..., H, W)`` bool or float in [0, 1].
        px: radius in pixels, >= 0 (0 returns the mask unchanged).

    Shapes:
        ``(..., H, W) -> (..., H, W)``.
    """
    if not isinstance(px, int) or isinstance(px, bool) or px < 0:
        raise ValueError(f"`px` (mask dilation radius) must be an integer >= 0, got {px!r}.")
    as_numpy = isinstance(mask, np.ndarray)
    if px == 0:
        return _copy(mask)
    flat, lead, dtype = _as_float_4d(mask)
    # Pad with a value below any mask value so the border never spreads foreground.
    padded = F.pad(flat, (px, px, px, px), value=-1.0)  # (N, 1, H + 2px, W + 2px)
    height, width = flat.shape[-2:]
    out = torch.full_like(flat, -1.0)
    # A disk is a stack of horizontal segments: for each row offset dy, a max-pool of half-width
    # floor(sqrt(px^2 - dy^2)) over the row shifted by dy. 2*px + 1 pools instead of (2*px + 1)^2 shifts.
    for dy in range(-px, px + 1):
        half = math.isqrt(px * px - dy * dy)
        rows = padded[:, :, px + dy: px + dy + height, :]  # (N, 1, H, W + 2px)
        pooled = F.max_pool2d(rows, kernel_size=(1, 2 * half + 1), stride=1)  # (N, 1, H, W + 2px - 2*half)
        offset = px - half
        out = torch.maximum(out, pooled[:, :, :, offset: offset + width])  # (N, 1, H, W)
    return cast(MaskT, _restore(out.clamp_min(0.0), lead, dtype, as_numpy))


def feather(mask: MaskT, px: int) -> MaskT:
    """Soften the mask edge with a ``(2 px + 1)``-wide box blur (border pixels average only inside the image).

    Args:
        mask: ``(..., H, W)`` bool or float in [0, 1]; bool input comes back as float32.
        px: blur radius in pixels, >= 0 (0 returns the mask unchanged).

    Shapes:
        ``(..., H, W) -> (..., H, W)``.
    """
    if not isinstance(px, int) or isinstance(px, bool) or px < 0:
        raise ValueError(f"`px` (mask feather radius) must be an integer >= 0, got {px!r}.")
    as_numpy = isinstance(mask, np.ndarray)
    if px == 0:
        return _copy(mask)
    flat, lead, _ = _as_float_4d(mask)
    blurred = F.avg_pool2d(flat, 2 * px + 1, stride=1, padding=px, count_include_pad=False)  # (N, 1, H, W)
    return cast(MaskT, _restore(blurred.clamp(0.0, 1.0), lead, torch.float32, as_numpy))


def to_latent_resolution(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Downsample a pixel mask to the latent grid by area averaging.

    Each latent cell gets the mean of the pixels it covers, so soft edges appear where the subject covers part of a
    cell and the mean coverage is preserved exactly when ``H % h == 0`` and ``W % w == 0`` (the VAE's case).

    Args:
        mask: ``(..., H, W)`` bool or float in [0, 1].
        size: the latent ``(h, w)``; each must be <= the pixel size.

    Returns:
        ``(..., h, w)`` float32 in [0, 1].
    """
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"`size` must be a latent (h, w) of positive integers, got {size!r}.")
    flat, lead, _ = _as_float_4d(mask)
    if size[0] > flat.shape[-2] or size[1] > flat.shape[-1]:
        raise ValueError(f"`size` {size} must not exceed the mask's (H, W) {tuple(flat.shape[-2:])}.")
    small = F.interpolate(flat, size=size, mode="area")  # (N, 1, H, W) -> (N, 1, h, w), mean over each cell
    return small.reshape(*lead, *size)  # (N, 1, h, w) -> (..., h, w)


def coverage(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The foreground fraction of each mask: the mean over the last two dimensions.

    Shapes:
        ``(..., H, W) -> (...)`` float32 in [0, 1].
    """
    flat, lead, _ = _as_float_4d(mask)
    return flat.mean(dim=(1, 2, 3)).reshape(lead)  # (N, 1, H, W) -> (N,) -> (...)
