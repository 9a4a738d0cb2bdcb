"""PerSAM-F's training losses: dice with +1 smoothing and the sigmoid focal loss (docs/design/persam_method.md §4.3).

Both take mask **logits** and a binary target of the same shape and are differentiable (autograd). They are the
definitions the fused fitting in :mod:`~.scale_fit` reproduces in closed form, and what a reader should check it
against:

* dice: ``1 - (2 * sum(p * g) + 1) / (sum(p) + sum(g) + 1)`` with ``p = sigmoid(logits)``, sums over all pixels;
* focal (RetinaNet form): ``alpha_t * (1 - p_t) ** gamma * BCE(logits, g)`` per pixel, **mean** over pixels, with
  ``p_t = p * g + (1 - p) * (1 - g)`` and ``alpha_t = alpha * g + (1 - alpha) * (1 - g)``.

Each function scores **one** mask (the published code's ``num_masks = 1``): ``logits`` and ``target`` may have any
shape, and every element is a pixel of that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DICE_SMOOTH", "FOCAL_ALPHA", "FOCAL_GAMMA", "dice_loss", "sigmoid_focal_loss"]

DICE_SMOOTH = 1.0  #: added to the numerator and the denominator of the dice ratio (published value)
FOCAL_ALPHA = 0.25  #: weight of the positive class in the focal loss (published value)
FOCAL_GAMMA = 2.0  #: focusing exponent of the focal loss (published value)


def _check(logits: Tensor, target: Tensor) -> Tensor:
    if logits.shape != target.shape:
        raise ValueError(f"`target` must have the shape of `logits` {tuple(logits.shape)}, got {tuple(target.shape)}.")
    return target.to(logits.dtype)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """Soft dice loss of one mask: ``1 - (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)``.

    Shapes:
        logits, target ``(...)`` (any, the same) -> ``()``; ``target`` is 0/1 (bool or float).
    """
    target = _check(logits, target)
    prob = torch.sigmoid(logits)
    numerator = 2 * (prob * target).sum()
    denominator = prob.sum() + target.sum()
    return 1 - (numerator + smooth) / (denominator + smooth)


def sigmoid_focal_loss(
    logits: Tensor, target: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> Tensor:
    """Sigmoid focal loss of one mask, **mean** over its pixels (docs/design/persam_method.md §4.3).

    Shapes:
        logits, target ``(...)`` (any, the same) -> ``()``; ``target`` is 0/1 (bool or float).

    Raises:
        ValueError: ``alpha`` outside [0, 1] or ``gamma`` negative.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    target = _check(logits, target)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * loss).mean()
