"""PerSAM-F's scale weights fitted on cached logits, with a fused closed-form gradient (persam_method.md §4).

Decision 6 of the spec: SAM's three logit maps are computed once.

The published code re-runs SAM's decoder at each of its 1000 steps, although the decoder inputs never change, then
back-propagates dice + focal through the mixture ``sum_k lambda_k * L_k`` with autograd. :func:`fit_scale_weights`
takes the ``K = 3`` high-resolution logit maps **once** and runs the same optimisation: the same objective
(:mod:`~.losses`), the same parameterisation ``lambda = [1 - w1 - w2, w1, w2]`` (``w`` initialised to 1/3), the same
``AdamW`` arithmetic (:func:`adamw_update_`, identical to ``torch.optim.AdamW``'s single-tensor path) and the same
``CosineAnnealingLR`` learning rates (:func:`cosine_annealing_lrs`). The weights agree with the published loop to
float rounding (tests: <= 1e-6 after 1000 steps).

How the loop is made cheap (profiled on CPU; the published loss costs ~25 elementwise passes forward + backward):

* The target is binary, so pixels are grouped once into foreground and background segments and the background
  logits are negated: with ``y = +z`` (foreground) or ``-z`` (background), ``u = sigmoid(y)`` is the probability of
  the true class, ``v = 1 - u`` and ``ce = -logsigmoid(y)``. Then, per pixel, focal ``= alpha_t * v**gamma * ce``
  and ``d focal / dy = -alpha_t * v**gamma * (gamma * u * ce + v)``; dice only needs ``sum(p)``, ``sum(p * g)`` and
  ``dp/dy = u * v``. ``d loss / d lambda_k = sum_i (d loss / d y_i) * Y_ki`` is a matrix product with the (signed)
  logit maps ``Y``, and ``d loss / d w_j = d loss / d lambda_j - d loss / d lambda_0`` (as autograd computes it).
* One step is then 9 elementwise passes over the pixels (into preallocated buffers), three reductions per piece
  and about 25 small operations (segment sums, dice coefficients, the gradient, AdamW); every view the loop uses is
  made before it, so a step allocates nothing and only launches kernels. Nothing leaves the device and nothing
  synchronises, so a GPU runs the 1000 steps back to back. On CPU the pixels are processed in pieces of at most
  2**17 (bounded buffers; smaller pieces were slower, larger ones no faster).
* ``ce = -log(max(u, tiny))`` (two cheap passes instead of ``logsigmoid``): identical to rounding while ``ce < 87.3``.
  Beyond (a logit more than 87 on the wrong side, ``u`` below float32's smallest normal) only the *reported* loss of
  that pixel is capped at 87.3; its gradient, hence the weights, are unaffected (``u * ce`` underflows either way).

Per step on one CPU core (AMD EPYC, shared; ``benchmarks/persam_f_fit.py --size 512``): about 1.1-1.2 ms for a
512x512 reference (262k pixels; ~0.1 ms of it is the fixed per-step cost), against ~5 ms for the published autograd
loss on the same cached logits, ~10.5 ms per published step with the tiny test SAM's decoder and ~127 ms with
ViT-B's.

Memory: the signed logit maps (``K * P`` float32 for ``P`` pixels over all references) plus 8 piece-sized buffers;
the input logits are not modified (the caller may free them once this returns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from persam_dreambooth.segmentation.losses import FOCAL_ALPHA, FOCAL_GAMMA

__all__ = [
    "ADAMW_EPS",
    "ADAMW_WEIGHT_DECAY",
    "ScaleFit",
    "adamw_update_",
    "cosine_annealing_lrs",
    "fit_scale_weights",
]

ADAMW_EPS = 1e-4  #: published ``torch.optim.AdamW(..., eps=1e-4)``
ADAMW_WEIGHT_DECAY = 0.01  #: ``torch.optim.AdamW``'s default, active in the published code (persam_method.md Q10)
ADAMW_BETAS = (0.9, 0.999)  #: ``torch.optim.AdamW``'s defaults
_CPU_CHUNK = 1 << 17  # pixels per piece on CPU: 8 buffers of 512 KiB (measured best of 2^14..2^22 at 4 Mpx)
_TINY = float(torch.finfo(torch.float32).tiny)  # log(u) is taken of max(u, tiny): ce is capped at 87.3


class ScaleFit(NamedTuple):
    """Result of :func:`fit_scale_weights`.

    Attributes:
        weights: ``(K,)`` float32 mixing weights ``[1 - w1 - ... , w1, ...]`` after the last step.
        losses: ``(steps,)`` float32 loss at each step, evaluated before that step's update (what the published loop
            logs); with several references, the mean over them.
    """

    weights: Tensor
    losses: Tensor


def cosine_annealing_lrs(base_lr: float, steps: int, t_max: int | None = None, eta_min: float = 0.0) -> list[float]:
    """The learning rate of each optimizer step under ``CosineAnnealingLR(T_max=t_max)`` stepped after every step.

    Uses the scheduler's own recursive form (not the closed form), so the numbers are the scheduler's exactly.
    ``t_max`` defaults to ``steps``.
    """
    t_max = steps if t_max is None else t_max
    if t_max < 1:
        raise ValueError(f"`t_max` must be >= 1, got {t_max}.")
    lrs = [float(base_lr)]
    lr = float(base_lr)
    for epoch in range(1, steps):
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * epoch / t_max)) / (1 + math.cos(math.pi * (epoch - 1) / t_max)) * (
                lr - eta_min
            ) + eta_min
        lrs.append(lr)
    return lrs


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
    weight_decay: float = ADAMW_WEIGHT_DECAY,
) -> None:
    """One AdamW step in place, with ``torch.optim.AdamW``'s arithmetic (single-tensor path, amsgrad off).

    ``step`` is 1 for the first update. ``param``, ``exp_avg`` and ``exp_avg_sq`` are updated; all have one shape.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


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
    chunk_size: int | None = None,
) -> ScaleFit:
    """Fit PerSAM-F's mixing weights on SAM's multimask logits of the reference image(s).

    Minimises ``dice(+1) + focal(alpha, gamma)`` of the mixed logits ``sum_k lambda_k * L_k`` against the reference
    mask, with ``lambda = [1 - sum(w), w]``, ``w`` initialised to ``1/K`` each (1/3 for SAM), ``steps`` AdamW steps
    (``lr``, ``eps``, ``weight_decay``, ``betas``) and a cosine learning rate over ``steps`` (persam_method.md §4).

    Several references (a list, or a 4-D tensor) are fitted jointly: the loss is the **mean** over references of each
    reference's ``dice + focal`` (each on its own pixels), so one reference gives exactly the single-image objective
    and each reference counts equally whatever its size.

    Args:
        logits: ``(K, H, W)`` high-resolution logits of one reference (SAM's multimask outputs, original size), or
            ``(N, K, H, W)``, or a list of ``(K, H_r, W_r)``. Runs on this tensor's device in float32.
        gt: the reference mask(s): ``(H, W)`` bool (or 0/1), ``(N, H, W)``, or a list of ``(H_r, W_r)``.
        steps: optimizer steps (1000 in the paper); ``lr``: AdamW's base learning rate.
        chunk_size: pixels processed per pass; ``None``: 2**17 on CPU (cache-sized), everything at once on GPU.

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
    device = maps[0].device
    k = maps[0].shape[0]
    num_refs = len(maps)
    if chunk_size is None:
        chunk_size = _CPU_CHUNK if device.type == "cpu" else 1 << 62
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")

    # Signed logit maps Y (K, P_total), segments [fg_0, bg_0, fg_1, bg_1, ...]; background columns negated.
    sizes = []
    for g in masks:
        n_fg = int(g.sum())
        sizes += [n_fg, g.numel() - n_fg]
    signed = torch.empty(k, sum(sizes), dtype=torch.float32, device=device)
    start = 0
    for r, (m, g) in enumerate(zip(maps, masks, strict=True)):
        for seg, sel in ((2 * r, g), (2 * r + 1, ~g)):
            stop = start + sizes[seg]
            for row in range(k):  # masked_select straight into place: no (K, P) temporary
                torch.masked_select(m[row], sel, out=signed[row, start:stop])
            if seg % 2 == 1:
                signed[:, start:stop].neg_()
            start = stop
    del maps, masks

    # Pieces: (segment, start, stop), no piece crossing a segment boundary; empty segments are skipped.
    pieces: list[tuple[int, int, int]] = []
    start = 0
    for seg, size in enumerate(sizes):
        for a in range(start, start + size, chunk_size):
            pieces.append((seg, a, min(a + chunk_size, start + size)))
        start += size
    longest = max(b - a for _, a, b in pieces)
    y, u, v, log_u, pw, t = (torch.empty(longest, device=device) for _ in range(6))
    grads = torch.empty(2 * longest, device=device)  # viewed (2, n) per piece: focal part, dice part of dloss/dy
    num_pieces, num_segs = len(pieces), len(sizes)
    piece_stats = torch.empty(num_pieces, 2, device=device)  # [sum of p (fg: u, bg: v), sum of v**gamma * log u]
    piece_mm = torch.empty(num_pieces, 2 * k, device=device)  # per piece, (2, K) flattened: [focal; dice] x Y rows
    one = torch.ones((), device=device)
    # Every view the step loop touches is made once here, so a step only launches kernels (on CPU a view costs as
    # much as a small kernel). Per piece: signed maps (K, n), the mixed logits as (1, n) and (n,), the buffers, the
    # (2, n) gradient pair, the tensor summed for dice, and the piece's output slots.
    work = []
    for j, (seg, a, b) in enumerate(pieces):
        n = b - a
        pair = grads[: 2 * n].view(2, n)  # (2n,) -> (2, n), contiguous for every piece size (fast matrix products)
        sig = signed[:, a:b]  # (K, n)
        work.append((sig, sig.T, y[:n].view(1, n), y[:n], u[:n], v[:n], log_u[:n], pw[:n], t[:n], pair[0], pair[1],
                     pair, u[:n] if seg % 2 == 0 else v[:n], piece_stats[j, 0:1], piece_stats[j, 1],
                     piece_mm[j].view(2, k)))  # (2K,) -> (2, K)

    # Constants per segment (float64 on the host, then float32 tensors). Pieces are summed into segments by ``gather``.
    n_pixels = [sizes[2 * r] + sizes[2 * r + 1] for r in range(num_refs)]
    seg_of = torch.tensor([p[0] for p in pieces], device=device)
    gather = torch.zeros(num_segs, num_pieces, device=device)  # (segments, pieces) of 0/1
    gather[seg_of, torch.arange(num_pieces, device=device)] = 1.0
    # coef[s] = [focal, dice] factor of segment s in d loss / d lambda; the focal one is constant: -alpha_t / N
    coef = torch.tensor(
        [[-(alpha if seg % 2 == 0 else 1 - alpha) / n_pixels[seg // 2], 0.0] for seg in range(num_segs)],
        device=device,
    )
    dice_fg, dice_bg = coef[0::2, 1], coef[1::2, 1]  # (R,) views, rewritten every step
    fg_plus_1 = torch.tensor([sizes[2 * r] + 1.0 for r in range(num_refs)], device=device)
    history = torch.empty(steps, num_segs, 2, device=device)  # per step and segment: the summed piece stats
    history_rows = history.unbind(0)  # steps x (S, 2) views
    stats = torch.empty(num_segs, 2, device=device)  # this step's: rows fg_0, bg_0, fg_1, ...
    fg_p, bg_p = stats[0::2, 0], stats[1::2, 0]  # (R,) sum of p over fg (= dice intersection), over bg
    seg_mm = torch.empty(num_segs, 2 * k, device=device)
    seg_mm_t = seg_mm.view(2 * num_segs, k).T  # (S, 2K) -> (2S, K) -> (K, 2S): rows = lambda_k
    coef_flat = coef.view(2 * num_segs)  # (S, 2) -> (2S,), in seg_mm_t's column order
    scratch = torch.empty(4, num_refs, device=device)
    twice_i_plus_1, union, union_sq, numer = scratch.unbind(0)
    grad_lam = torch.empty(k, device=device)
    grad_lam_w, grad_lam_0 = grad_lam[1:], grad_lam[0]
    grad_w = torch.empty(k - 1, device=device)

    w = torch.full((k - 1,), 1.0 / k, device=device)  # published: torch.ones(2, 1) / 3 (same float32 value)
    exp_avg, exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
    # lambda = [1 - sum(w), w] = base + mix @ w in one kernel (the same float32 values as the published cat/sum)
    lam = torch.empty(1, k, device=device)
    lam_row = lam[0]
    base = torch.zeros(k, device=device)
    base[0] = 1.0
    mix = torch.cat([-torch.ones(1, k - 1), torch.eye(k - 1)]).to(device)  # (K, K-1)
    lrs = cosine_annealing_lrs(lr, steps)
    for step in range(steps):
        torch.addmv(base, mix, w, out=lam_row)
        for sig, sig_t, y_row, yj, uj, vj, lj, pwj, tj, g_focal, g_dice, pair, summed, sum_slot, dot_slot, mm_slot \
                in work:
            torch.mm(lam, sig, out=y_row)  # (1, K) @ (K, n) -> (1, n): signed mixed logits
            torch.sigmoid(yj, out=uj)  # probability of the true class
            torch.sub(one, uj, out=vj)
            torch.clamp(uj, min=_TINY, out=lj).log_()  # = -ce (exact to rounding while ce < 87.3, see below)
            if gamma == 2.0:
                torch.mul(vj, vj, out=pwj)
            else:
                torch.pow(vj, gamma, out=pwj)
            torch.addcmul(vj, uj, lj, value=-gamma, out=tj)  # v + gamma * u * ce
            torch.mul(pwj, tj, out=g_focal)  # -(d focal / dy) / (alpha_t / N)
            torch.mul(uj, vj, out=g_dice)  # dp/dy up to the sign: u * v = p * (1 - p)
            torch.sum(summed, 0, keepdim=True, out=sum_slot)  # sum of p over the piece
            torch.dot(pwj, lj, out=dot_slot)  # -(sum of v**gamma * ce)
            torch.mm(pair, sig_t, out=mm_slot)  # (2, n) @ (n, K) -> (2, K)
        torch.mm(gather, piece_stats, out=stats)  # (segments, pieces) @ (pieces, 2): summed per segment
        history_rows[step].copy_(stats)
        torch.mm(gather, piece_mm, out=seg_mm)  # (segments, pieces) @ (pieces, 2K)
        # d dice / d p = -(2 g U - (2I + 1)) / U^2; times dp/dy = +-u v (sign of y): fg (2I+1-2U)/U^2, bg -(2I+1)/U^2
        torch.mul(fg_p, 2, out=twice_i_plus_1).add_(1)
        torch.add(fg_p, bg_p, out=union).add_(fg_plus_1)  # sum(p) + sum(g) + 1
        torch.mul(union, union, out=union_sq)
        torch.mul(union, 2, out=numer)
        torch.sub(twice_i_plus_1, numer, out=numer)
        torch.div(numer, union_sq, out=dice_fg)
        torch.neg(twice_i_plus_1, out=numer)
        torch.div(numer, union_sq, out=dice_bg)
        # d loss / d lambda_k = sum over segments s and parts c of coef[s, c] * seg_mm[s, c, k]
        torch.mv(seg_mm_t, coef_flat, out=grad_lam)  # (K, 2S) @ (2S,) -> (K,)
        if num_refs > 1:
            grad_lam.div_(num_refs)  # mean of the references' losses
        torch.sub(grad_lam_w, grad_lam_0, out=grad_w)  # lambda_0 = 1 - sum(w): as autograd's chain rule
        adamw_update_(w, grad_w, exp_avg, exp_avg_sq, step + 1, lrs[step], betas, eps, weight_decay)

    weights = torch.cat([1 - w.sum(0, keepdim=True), w])
    history = history.view(steps, num_refs, 2, 2)  # (steps, 2R, 2) -> (steps, R, [fg, bg], [sum p, dot])
    fg_p, bg_p = history[:, :, 0, 0], history[:, :, 1, 0]  # (steps, R)
    dice = 1 - (2 * fg_p + 1) / (fg_p + bg_p + fg_plus_1)
    n_pix = torch.tensor(n_pixels, dtype=torch.float32, device=device)
    focal = -(alpha * history[:, :, 0, 1] + (1 - alpha) * history[:, :, 1, 1]) / n_pix
    return ScaleFit(weights=weights, losses=(dice + focal).mean(dim=1))
