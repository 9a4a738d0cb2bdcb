"""2x2 latent patches and token sequences, the layouts of FLUX.1 and FLUX.2 transformers.

FLUX.1 packs latents ``(N, C, h, w)`` into tokens ``(N, h/2 * w/2, 4C)``; FLUX.2 patchifies them first into
``(N, 4C, h/2, w/2)`` (where its VAE statistics and the loss live) and then flattens the grid into tokens. Both use
the same channel order (``c * 4 + dy * 2 + dx``) and the same row-major token order, so

    flux1_pack(x) == grid_to_tokens(patchify_2x2(x))

and the tokens of patch ``(i, j)`` come from latent cells ``(2i + dy, 2j + dx)``. A mask follows the same map when
it is area-averaged over each 2x2 cell (what the dataset does at the loss grid's factor), which is how the loss is
taken on the subject's positions whatever the packing (``docs/design/model_families.md``, "Flow-matching families").
"""

from __future__ import annotations

import torch

__all__ = ["patchify_2x2", "unpatchify_2x2", "grid_to_tokens", "tokens_to_grid", "flux1_pack", "flux1_unpack"]


def patchify_2x2(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w) -> (N, 4C, h/2, w/2)``; output channel ``c * 4 + dy * 2 + dx`` is cell ``(2i + dy, 2j + dx)``."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"2x2 patches need an even latent grid, got {h} x {w}.")
    x = x.reshape(n, c, h // 2, 2, w // 2, 2)  # (N, C, h/2, dy, w/2, dx)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (N, C, dy, dx, h/2, w/2)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unpatchify_2x2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify_2x2`: ``(N, 4C, h/2, w/2) -> (N, C, h, w)``."""
    n, c4, hh, ww = x.shape
    x = x.reshape(n, c4 // 4, 2, 2, hh, ww)  # (N, C, dy, dx, h/2, w/2)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (N, C, h/2, dy, w/2, dx)
    return x.reshape(n, c4 // 4, hh * 2, ww * 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w) -> (N, h * w, C)``, row-major (token ``i * w + j`` is cell ``(i, j)``)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w).permute(0, 2, 1)


def tokens_to_grid(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`grid_to_tokens`: ``(N, h * w, C) -> (N, C, h, w)``."""
    n, length, c = x.shape
    if length != height * width:
        raise ValueError(f"{length} tokens cannot fill a {height} x {width} grid.")
    return x.permute(0, 2, 1).reshape(n, c, height, width)


def flux1_pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX.1's packing: ``(N, C, h, w) -> (N, h/2 * w/2, 4C)``."""
    return grid_to_tokens(patchify_2x2(x))


def flux1_unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`flux1_pack` for a latent grid ``height x width``: ``(N, h/2 * w/2, 4C) -> (N, C, h, w)``."""
    return unpatchify_2x2(tokens_to_grid(x, height // 2, width // 2))
