"""PerSAM-F's scale weights, fitted on SAM's three logit maps computed once (docs/design/persam_method.md §4).

The published code re-runs SAM's decoder at each of its 1000 steps, although the decoder inputs never change
(Decision 6: here the three high-resolution logit maps are computed **once**), then minimises dice + focal of the
mixture ``sum_k lambda_k * L_k`` with ``lambda = [1 - w1 - w2, w1, w2]`` (``w`` initialised to 1/3) by autograd,
``torch.optim.AdamW(lr, eps=1e-4)`` (weight decay 0.01, its default) and ``CosineAnnealingLR(T_max=steps)``.
:func:`fit_scale_weights` is that loop on the cached logits: the same objective (:mod:`~.losses`), the same optimiser
and schedule objects, so the weights agree with the published loop to float rounding (tests: <= 1e-6 after 1000
steps).

Speed: a hand-fused version (closed-form gradient, hand-written AdamW, 337 lines; git 01378da) was 5.5x faster for
the fit alone but only **1.94x end to end** on a ViT-B reference fit (process CPU seconds, 1 thread, 1282x1282
reference, 1000 steps: encoder 21.05 + decoder and fit 30.66 here vs 5.55 fused;
``nice python benchmarks/persam_f_fit.py --model vit_b --size 0``), below the 2x that would justify a second code
path, so this readable loop is the only one. The fit costs about 30 ms per step per 1.6 Mpx on one CPU core, linear in
the reference's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from persam_dreambooth.segmentation.losses import FOCAL_ALPHA, FOCAL_GAMMA, dice_loss, sigmoid_focal_loss

__all__ = ["ADAMW_BETAS", "ADAMW_EPS", "ADAMW_WEIGHT_DECAY", "ScaleFit", "fit_scale_weights"]

ADAMW_EPS = 1e-4  #: published ``torch.optim.AdamW(..., eps=1e-4)``
#: ``torch.optim.AdamW``'s default, active in the published code (docs/design/persam_method.md Q10)
ADAMW_WEIGHT_DECAY = 0.01
ADAMW_BETAS = (0.9, 0.999)  #: ``torch.optim.AdamW``'s defaults


class ScaleFit(NamedTuple):
    """Result of :func:`fit_scale_weights`.

    Attributes:
        weights: ``(K,)`` float32 mixing weights ``[1 - w1 - ... , w1, ...]`` after the last step.
        losses: ``(steps,)`` float32 loss at each step, evaluated before that step's update (what the published loop
            logs); with several references, the mean over them.
    """

    weights: Tensor
    losses: Tensor


def _as_references(
    logits: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    gt: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
) -> tuple[list[Tensor], list[Tensor]]:
    """Normalise the inputs to lists of ``(K, H_r, W_r)`` float32 logits and ``(H_r, W_r)`` bool masks."""
    if isinstance(logits, (Tensor, np.ndarray)):
        maps = torch.as_tensor(logits)
        if maps.dim() == 3:
            maps_list = [maps]
        elif maps.dim() == 4:
            maps_list = list(maps)
        else:
            raise ValueError(f"`logits` must have shape (K, H, W) or (N, K, H, W), got {tuple(maps.shape)}.")
    else:
        maps_list = [torch.as_tensor(m) for m in logits]
    if isinstance(gt, (Tensor, np.ndarray)):
        masks = torch.as_tensor(gt)
        masks_list = [masks] if masks.dim() == 2 else list(masks)
    else:
        masks_list = [torch.as_tensor(m) for m in gt]
    if not maps_list:
        raise ValueError("`logits` must hold at least one reference.")
    if len(masks_list) != len(maps_list):
        raise ValueError(f"`gt` must hold one mask per reference ({len(maps_list)}), got {len(masks_list)}.")
    k = maps_list[0].shape[0] if maps_list[0].dim() == 3 else -1
    device = maps_list[0].device
    for i, (m, g) in enumerate(zip(maps_list, masks_list, strict=True)):
        if m.dim() != 3 or m.shape[0] != k or k < 2:
            raise ValueError(f"`logits[{i}]` must have shape (K, H, W) with the same K >= 2, got {tuple(m.shape)}.")
        if tuple(g.shape) != tuple(m.shape[1:]):
            raise ValueError(f"`gt[{i}]` must have shape (H, W) == {tuple(m.shape[1:])}, got {tuple(g.shape)}.")
    return (
        [m.to(device=device, dtype=torch.float32) for m in maps_list],
        [g.to(device=device, dtype=torch.bool) for g in masks_list],
    )


def fit_scale_weights(
    logits: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    gt: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    steps: int = 1000,
    lr: float = 1e-3,
    *,
    weight_decay: float = ADAMW_WEIGHT_DECAY,
    eps: float = ADAMW_EPS,
    betas: tuple[float, float] = ADAMW_BETAS,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> ScaleFit:
    """Fit PerSAM-F's mixing weights on SAM's multimask logits of the reference image(s).

    Minimises ``dice(+1) + focal(alpha, gamma)`` of the mixed logits ``sum_k lambda_k * L_k`` against the reference
    mask, with ``lambda = [1 - sum(w), w]``, ``w`` initialised to ``1/K`` each (1/3 for SAM), ``steps`` steps of
    ``torch.optim.AdamW`` (``lr``, ``eps``, ``weight_decay``, ``betas``) under ``CosineAnnealingLR(T_max=steps)``.

    Several references (a list, or a 4-D tensor) are fitted jointly: the loss is the **mean** over references of each
    reference's ``dice + focal`` (each on its own pixels), so one reference gives exactly the single-image objective
    and each reference counts equally whatever its size.

    Args:
        logits: ``(K, H, W)`` high-resolution logits of one reference (SAM's multimask outputs, original size), or
            ``(N, K, H, W)``, or a list of ``(K, H_r, W_r)``. Runs on this tensor's device in float32.
        gt: the reference mask(s): ``(H, W)`` bool (or 0/1), ``(N, H, W)``, or a list of ``(H_r, W_r)``.
        steps: optimizer steps (1000 in the paper); ``lr``: AdamW's base learning rate.

    Returns:
        :class:`ScaleFit` ``(weights (K,), losses (steps,))`` on the logits' device.

    Raises:
        ValueError: shapes disagree, ``steps < 1``, ``lr <= 0``, ``alpha`` outside [0, 1] or ``gamma < 0``.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    maps, masks = _as_references(logits, gt)
    device, k = maps[0].device, maps[0].shape[0]
    flat = [m.flatten(1) for m in maps]  # (K, H, W) -> (K, HW) per reference
    targets = [g.flatten().float() for g in masks]  # (H, W) -> (HW,)
    del maps, masks
    w = torch.nn.Parameter(torch.full((k - 1, 1), 1.0 / k, device=device))  # published: torch.ones(2, 1) / 3
    optimizer = torch.optim.AdamW([w], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = torch.empty(steps, device=device)
    with torch.enable_grad():
        for step in range(steps):
            lam = torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0)  # (K, 1), as published
            loss = 0
            for maps_r, target in zip(flat, targets, strict=True):
                mixed = (maps_r * lam).sum(0)  # (K, HW) * (K, 1) -> (HW,)
                loss = loss + dice_loss(mixed, target) + sigmoid_focal_loss(mixed, target, alpha=alpha, gamma=gamma)
            loss = loss / len(flat)
            losses[step] = loss.detach()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    weights = torch.cat((1 - w.sum(0).unsqueeze(0), w)).detach().flatten()
    return ScaleFit(weights=weights, losses=losses)
