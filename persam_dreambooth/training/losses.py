"""The masked diffusion loss and Min-SNR weighting (docs/design/masked_dreambooth.md, Decision 2).

Notation: ``l = (pred - target)^2`` elementwise on latents ``(B, C, h, w)``; ``m`` the latent mask ``(B, 1, h, w)``
in [0, 1]; ``bw`` the background weight. The per-pixel weight is ``w = bw + (1 - bw) * m`` and

* ``normalize="none"``:       ``mean(w * l)``                      (kohya / SimpleTuner: the step shrinks with the
  subject's coverage);
* ``normalize="per_sample"``: ``mean_b [ sum(w * l)_b / sum(w * C)_b ]`` (each sample is a weighted mean over its
  supervised pixels, so masked and vanilla runs train at the same effective step size; the default);
* ``normalize="batch"``:      ``sum(w * l) / sum(w * C)``           (a weighted mean over the whole batch).

With an all-ones mask (or ``bw = 1``) every mode equals ``F.mse_loss(pred, target)``. Min-SNR weights apply per
sample *after* the spatial reduction: ask for ``reduction="none"`` to get the per-sample terms.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["MaskNormalize", "masked_diffusion_loss", "min_snr_weights"]

MaskNormalize = Literal["none", "per_sample", "batch"]
_NORMALIZE = ("none", "per_sample", "batch")
# A sample whose weights sum to zero (an empty mask with bw = 0) contributes 0 instead of 0 / 0.
_EPS = 1e-12


def masked_diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    background_weight: float = 0.0,
    normalize: MaskNormalize = "per_sample",
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Mean squared error weighted by a latent mask.

    Args:
        pred: the model output.
        target: the diffusion target (noise for epsilon prediction, velocity for v-prediction).
        mask: the subject mask at latent resolution, in [0, 1] (see ``masks.ops.to_latent_resolution``).
        background_weight: weight of pixels outside the mask, in [0, 1] (0 = supervise the subject only).
        normalize: ``"none"``, ``"per_sample"`` or ``"batch"`` (module docstring).
        reduction: ``"mean"`` returns the scalar loss; ``"none"`` returns per-sample terms ``(B,)`` whose mean is
            exactly the scalar loss in every ``normalize`` mode (multiply them by Min-SNR weights, then average).

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``; float32 whatever the input dtype.

    Shapes:
        ``pred``, ``target``: ``(B, C, h, w)``; ``mask``: ``(B, 1, h, w)`` (or ``(B, h, w)``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"`target` must have the shape of `pred` {tuple(pred.shape)}, got {tuple(target.shape)}.")
    if pred.ndim != 4:
        raise ValueError(f"`pred` must have shape (B, C, h, w), got {tuple(pred.shape)}.")
    b, c, h, w = pred.shape
    if mask.ndim == 3:
        mask = mask[:, None]  # (B, h, w) -> (B, 1, h, w)
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"`mask` must have shape (B, 1, h, w) == ({b}, 1, {h}, {w}), got {tuple(mask.shape)}.")
    if not 0.0 <= float(background_weight) <= 1.0:
        raise ValueError(f"`background_weight` must be in [0, 1], got {background_weight!r}.")
    if normalize not in _NORMALIZE:
        raise ValueError(f"`normalize` must be one of {_NORMALIZE}, got {normalize!r}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")

    # The loss is computed in float32 whatever the autocast dtype (diffusers does the same for its MSE).
    sq = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    weight = background_weight + (1.0 - background_weight) * mask.float()  # (B, 1, h, w), broadcasts over C
    weighted = (sq * weight).sum(dim=(1, 2, 3))  # (B,): sum over C, h, w of w * l
    if normalize == "none":
        per_sample = weighted / float(c * h * w)  # mean_{chw}(w * l)
    elif normalize == "per_sample":
        per_sample = weighted / (weight.sum(dim=(1, 2, 3)) * c).clamp_min(_EPS)  # sum(w l)_b / sum(w C)_b
    else:  # batch: mean_b of these terms is sum(w l) / sum(w C)
        per_sample = weighted * b / (weight.sum() * c).clamp_min(_EPS)
    return per_sample if reduction == "none" else per_sample.mean()


def min_snr_weights(
    snr: torch.Tensor, gamma: float, prediction_type: Literal["epsilon", "v_prediction", "sample"]
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for per-sample losses, as diffusers' DreamBooth script has them.

    ``min(snr, gamma) / snr`` for epsilon (and sample) targets; for v-prediction the same weight plus 1 (diffusers:
    "the velocity objective needs to be floored to an SNR weight of one"), so a run configured like a diffusers one
    trains alike.

    Shapes:
        ``snr``: ``(B,)`` -> ``(B,)``.
    """
    if gamma <= 0:
        raise ValueError(f"`gamma` (snr_gamma) must be > 0, got {gamma!r}.")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"`prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}."
        )
    weights = torch.clamp(snr, max=gamma) / snr
    return weights + 1.0 if prediction_type == "v_prediction" else weights
