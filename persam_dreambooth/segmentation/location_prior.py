"""PerSAM's location prior as pure tensor functions (no SAM object, no I/O).

Letters: ``C`` feature channels, ``h, w`` the embedding grid, ``H, W`` the original image, ``S`` SAM's square input
frame (``sam.image_encoder.img_size``), ``h', w'`` the resized image inside that frame (``ResizeLongestSide``).
Points are ``(x, y)`` = (column, row) in original-image pixels, SAM's convention.

The functions follow ``docs/design/persam_method.md`` (P5-P7, §3, Decision 3):

* :func:`target_embedding` pools the reference features inside the reference cells (mean, or (max + mean)/2), over
  one or several references.
* :func:`similarity_map` is the cosine similarity of every grid feature with the target.
* :func:`upscale_to_original` brings a grid map to ``(H, W)`` with SAM's mask post-processing geometry.
* :func:`select_point_prompts` picks the top-k / bottom-k pixels as positive / negative points.
* :func:`attention_prior` turns the map into the ``attn_sim`` bias of target-guided attention.
* :func:`box_from_mask` is SAM's box prompt for a mask (inclusive corner pixels, as published).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "target_embedding",
    "similarity_map",
    "upscale_to_original",
    "select_point_prompts",
    "attention_prior",
    "content_grid_size",
    "box_from_mask",
]

_EPS = 1e-12  # guards the L2 normalisations against an all-zero vector (never hit by real SAM features)


def target_embedding(
    features: Tensor | Sequence[Tensor],
    cell_mask: Tensor | Sequence[Tensor],
    pooling: Literal["mean", "max_mean"] = "mean",
) -> Tensor:
    """Pool the reference features inside the target cells into one raw (un-normalised) vector.

    PerSAM uses ``"mean"``; PerSAM-F and the video variants use ``"max_mean"`` = (element-wise max + mean) / 2.

    Several references (sequences of features and cell masks) are pooled **over all their target cells together**:
    the mean (and max) is taken over the union of the cells, so every target cell counts once whatever image it comes
    from. With one reference (a tensor, or a sequence of one) the result is bit-identical to the one-shot pooling.

    Shapes:
        features ``(C, h, w)``; cell_mask ``(h, w)`` bool with at least one True -> ``(C,)``. Or sequences of those
        (same ``C``; each mask the shape of its features).

    Raises:
        ValueError: shapes differ, a mask selects no cell, the sequences differ in length, or ``pooling`` is unknown.
    """
    many = not isinstance(features, Tensor)
    feats: list[Tensor] = [features] if isinstance(features, Tensor) else list(features)
    masks: list[Tensor] = [cell_mask] if isinstance(cell_mask, Tensor) else list(cell_mask)
    if len(feats) != len(masks) or not feats:
        raise ValueError(f"`features` and `cell_mask` must hold the same number (>= 1) of references, got "
                         f"{len(feats)} and {len(masks)}.")
    selected = []
    for i, (feat, mask) in enumerate(zip(feats, masks, strict=True)):
        name = f"cell_mask[{i}]" if many else "cell_mask"
        c, h, w = feat.shape
        if tuple(mask.shape) != (h, w):
            raise ValueError(f"`{name}` must have shape (h, w) == {(h, w)}, got {tuple(mask.shape)}.")
        if not bool(mask.any()):
            raise ValueError(f"`{name}` selects no cell; the target embedding would be the mean of an empty set.")
        selected.append(feat.permute(1, 2, 0)[mask.to(torch.bool)])  # (C, h, w) -> (h, w, C) -> (n_i, C)
    if pooling not in ("mean", "max_mean"):
        raise ValueError(f"`pooling` must be 'mean' or 'max_mean', got {pooling!r}.")
    pooled = selected[0] if len(selected) == 1 else torch.cat(selected)  # (n, C): all references' target cells
    if pooling == "mean":
        return pooled.mean(dim=0)
    return (pooled.max(dim=0).values + pooled.mean(dim=0)) / 2


def similarity_map(target: Tensor, features: Tensor) -> Tensor:
    """Cosine similarity of every grid feature with ``target``: both are L2-normalised first (P5).

    Shapes:
        target ``(C,)``; features ``(C, h, w)`` -> ``(h, w)`` in [-1, 1].
    """
    c, h, w = features.shape
    flat = features.reshape(c, h * w)  # (C, h, w) -> (C, h*w)
    flat = flat / flat.norm(dim=0, keepdim=True).clamp_min(_EPS)
    unit = target / target.norm().clamp_min(_EPS)
    return (unit @ flat).reshape(h, w)  # (h*w,) -> (h, w)


def upscale_to_original(
    grid_map: Tensor,
    low_res_size: Sequence[int],
    frame_size: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
) -> Tensor:
    """Bring a grid map to the original image, as PerSAM does with its similarity map (P5).

    Bilinear (align_corners=False) to the low-res mask size (4x the grid), then SAM's ``postprocess_masks``
    geometry: bilinear to the ``frame_size`` square, crop the content ``input_size``, bilinear to ``original_size``.

    Shapes:
        grid_map ``(h, w)`` or ``(K, h, w)`` -> ``(H, W)`` or ``(K, H, W)`` float32.
    """
    squeeze = grid_map.dim() == 2
    x = grid_map[None, None] if squeeze else grid_map[None]  # -> (1, K, h, w)
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(low_res_size):
        x = F.interpolate(x, tuple(low_res_size), mode="bilinear", align_corners=False)  # (1, K, 4h, 4w)
    out = upscale_low_res(x[0], frame_size, input_size, original_size)
    return out[0] if squeeze else out


def upscale_low_res(
    low_res: Tensor, frame_size: int, input_size: Sequence[int], original_size: Sequence[int]
) -> Tensor:
    """SAM's ``Sam.postprocess_masks`` on ``(K, h_lr, w_lr)`` logits -> ``(K, H, W)`` (same ops, same order)."""
    x = F.interpolate(low_res[None], (frame_size, frame_size), mode="bilinear", align_corners=False)  # (1, K, S, S)
    x = x[..., : input_size[0], : input_size[1]]  # crop the padding: (1, K, h', w')
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)  # (1, K, H, W)
    return x[0]


def select_point_prompts(similarity: Tensor, topk: int = 1, negative: bool = True) -> tuple[Tensor, Tensor]:
    """The ``topk`` most similar pixels as positive points, then the ``topk`` least similar as negatives (P6).

    The map is flattened row-major; index ``n`` is ``row, col = divmod(n, W)`` and the point is ``(x, y) = (col,
    row)``. With ``topk=1`` ties go to the first pixel in row-major order (``argmax``); for larger ``topk`` they
    follow ``torch.topk`` (unspecified order, may differ between CPU and CUDA).

    Shapes:
        similarity ``(H, W)`` -> points_xy ``(N, 2)`` int64, labels ``(N,)`` int64 (1 positive, 0 negative),
        ``N = topk`` or ``2 * topk``; positives first.
    """
    if similarity.dim() != 2:
        raise ValueError(f"`similarity` must have shape (H, W), got {tuple(similarity.shape)}.")
    height, width = similarity.shape
    if not 1 <= topk <= height * width:
        raise ValueError(f"`topk` must be in [1, {height * width}] for a {height}x{width} map, got {topk}.")
    flat = similarity.reshape(-1)  # (H, W) -> (H*W,) row-major
    if topk == 1:  # argmax/argmin: the first extreme pixel in row-major order, and ~7x faster than CPU topk
        indices = [flat.argmax().reshape(1)]  # () -> (1,)
        if negative:
            indices.append(flat.argmin().reshape(1))
    else:
        indices = [flat.topk(topk, largest=True).indices]
        if negative:
            indices.append(flat.topk(topk, largest=False).indices)
    idx = torch.cat(indices)
    rows = torch.div(idx, width, rounding_mode="floor")
    cols = idx - rows * width
    points_xy = torch.stack([cols, rows], dim=1)  # (N, 2) as (x, y) = (col, row)
    labels = torch.ones(idx.numel(), dtype=torch.int64, device=idx.device)
    if negative:
        labels[topk:] = 0
    return points_xy.to(torch.int64), labels


def content_grid_size(grid_size: Sequence[int], frame_size: int, input_size: Sequence[int]) -> tuple[int, int]:
    """Grid cells covered by the resized image: ``(ceil(g_h * h' / S), ceil(g_w * w' / S))`` (Decision 3)."""
    gh, gw = grid_size
    return math.ceil(gh * input_size[0] / frame_size), math.ceil(gw * input_size[1] / frame_size)


def attention_prior(
    similarity: Tensor, grid_size: Sequence[int], frame_size: int, input_size: Sequence[int]
) -> Tensor:
    """The ``attn_sim`` bias of target-guided attention: sigmoid of the z-scored map on the content grid cells.

    The map is z-scored over all ``H*W`` pixels (unbiased std), resized bilinearly (align_corners=False, no
    antialias) onto the grid cells that hold the image (:func:`content_grid_size`), passed through a sigmoid; padding
    cells get 0. On square images this equals the published whole-map resize (Decision 3). The z-scoring is applied
    after the resize (bilinear weights sum to 1, so the result is the same up to float rounding), which avoids a
    full-resolution copy of the map.

    Shapes:
        similarity ``(H, W)`` -> ``(1, 1, 1, g_h * g_w)`` float32, row-major over the grid.
    """
    gh, gw = grid_size
    ch, cw = content_grid_size(grid_size, frame_size, input_size)
    sim = similarity.float()
    if sim.numel() > 1:
        std, mean = torch.std_mean(sim, unbiased=True)
    else:  # a 1-pixel map has no unbiased std: treat it as constant
        std, mean = torch.zeros((), device=sim.device), sim.reshape(())
    small = F.interpolate(sim[None, None], (ch, cw), mode="bilinear", align_corners=False)[0, 0]  # (H, W) -> (ch, cw)
    prior = torch.zeros(gh, gw, dtype=torch.float32, device=sim.device)
    prior[:ch, :cw] = torch.sigmoid((small - mean) / std.clamp_min(_EPS))  # a constant map gives 0.5
    return prior.reshape(1, 1, 1, gh * gw)  # (g_h, g_w) -> (1, 1, 1, g_h*g_w), broadcast over batch/heads/tokens


def box_from_mask(mask: Tensor) -> Tensor | None:
    """SAM's box prompt for a mask: ``[x_min, y_min, x_max, y_max]``, the corner pixels' own indices (P7), or ``None``.

    The published PerSAM prompts SAM with these inclusive corners; the package's bounding-box convention is
    exclusive (:func:`persam_dreambooth.utils.mask_geometry.bbox`), and this prompt is ``bbox(mask) - (0, 0, 1, 1)``.
    Kept on the mask's device (no host sync inside the cascade).

    Shapes:
        mask ``(H, W)`` -> ``(4,)`` int64.
    """
    rows = torch.nonzero(mask.any(dim=1)).flatten()  # (n, 1) -> (n,) row indices holding a pixel
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()  # (m, 1) -> (m,) column indices
    return torch.stack([cols[0], rows[0], cols[-1], rows[-1]]).to(torch.int64)
