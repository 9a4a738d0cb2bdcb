"""The masked-loss contract (docs/design/masked_dreambooth.md, Decision 2) on hand-made tensors."""

import pytest
import torch
import torch.nn.functional as F

from persam_dreambooth.training import masked_diffusion_loss, min_snr_weights

MODES = ("none", "per_sample", "batch")


def _tensors(b=3, c=4, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


@pytest.mark.parametrize("normalize", MODES)
def test_all_ones_mask_equals_mse_in_every_mode(normalize):
    pred, target = _tensors()
    ones = torch.ones(3, 1, 6, 5)
    expected = F.mse_loss(pred, target)
    assert torch.allclose(masked_diffusion_loss(pred, target, ones, normalize=normalize), expected, atol=1e-6)
    # background weight 1 ignores the mask entirely
    half = (torch.rand(3, 1, 6, 5) > 0.5).float()
    loss = masked_diffusion_loss(pred, target, half, background_weight=1.0, normalize=normalize)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("normalize", MODES)
def test_error_outside_the_mask_costs_nothing(normalize):
    target = torch.zeros(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1.0
    pred = torch.randn(2, 4, 8, 8) * (1 - mask)  # wrong only outside the mask
    assert masked_diffusion_loss(pred, target, mask, normalize=normalize).item() == 0.0
    pred_inside = torch.randn(2, 4, 8, 8) * mask
    assert masked_diffusion_loss(pred_inside, target, mask, normalize=normalize).item() > 0.0


def test_modes_match_their_formulas():
    pred, target = _tensors(b=2, c=2, h=4, w=4, seed=1)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # sample 0 covers half the frame
    mask[1, :, 0, 0] = 0.5  # sample 1: one half-weighted pixel
    bw = 0.1
    sq = (pred - target) ** 2
    w = bw + (1 - bw) * mask
    c = 2
    none = (w * sq).mean()
    per_sample = torch.stack([(w[i] * sq[i]).sum() / (w[i].sum() * c) for i in range(2)]).mean()
    batch = (w * sq).sum() / (w.sum() * c)
    for mode, expected in (("none", none), ("per_sample", per_sample), ("batch", batch)):
        got = masked_diffusion_loss(pred, target, mask, background_weight=bw, normalize=mode)
        assert torch.allclose(got, expected, atol=1e-6), mode
    # the default is per_sample with background weight 0: a mean over the supervised pixels only
    default = masked_diffusion_loss(pred, target, mask)
    fg = torch.stack([(mask[i] * sq[i]).sum() / (mask[i].sum() * c) for i in range(2)]).mean()
    assert torch.allclose(default, fg, atol=1e-6)


def test_background_weight_interpolates_between_masked_and_full():
    pred, target = _tensors(seed=2)
    mask = torch.zeros(3, 1, 6, 5)
    mask[:, :, 1:4, 1:4] = 1
    losses = [masked_diffusion_loss(pred, target, mask, background_weight=bw, normalize="none").item()
              for bw in (0.0, 0.3, 1.0)]
    assert losses[0] < losses[1] < losses[2]
    assert losses[2] == pytest.approx(F.mse_loss(pred, target).item(), abs=1e-6)


@pytest.mark.parametrize("normalize", MODES)
def test_per_sample_terms_average_to_the_loss_and_carry_snr_weights(normalize):
    pred, target = _tensors(seed=3)
    mask = (torch.rand(3, 1, 6, 5, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    terms = masked_diffusion_loss(pred, target, mask, normalize=normalize, reduction="none")
    assert terms.shape == (3,)
    assert torch.allclose(terms.mean(), masked_diffusion_loss(pred, target, mask, normalize=normalize), atol=1e-6)
    snr = torch.tensor([0.5, 5.0, 50.0])
    weights = min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(weights, torch.tensor([1.0, 1.0, 0.1]))
    # diffusers' DreamBooth formula: v-prediction adds 1 to the epsilon weight; sample uses the epsilon weight
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([2.0, 2.0, 1.1]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "sample"), weights)
    assert (terms * weights).mean() < terms.mean()
    with pytest.raises(ValueError, match="`prediction_type` must be"):
        min_snr_weights(snr, 5.0, "flow")


def test_empty_mask_sample_contributes_zero_not_nan():
    pred, target = _tensors(b=2)
    mask = torch.ones(2, 1, 6, 5)
    mask[1] = 0
    loss = masked_diffusion_loss(pred, target, mask, normalize="per_sample", reduction="none")
    assert torch.isfinite(loss).all() and loss[1] == 0


def test_half_precision_inputs_give_float32_and_bad_shapes_are_named():
    pred, target = _tensors()
    loss = masked_diffusion_loss(pred.half(), target.half(), torch.ones(3, 1, 6, 5, dtype=torch.half))
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match=r"`mask` must have shape \(B, 1, h, w\) == \(3, 1, 6, 5\)"):
        masked_diffusion_loss(pred, target, torch.ones(3, 1, 3, 5))
    with pytest.raises(ValueError, match="`normalize` must be one of"):
        masked_diffusion_loss(pred, target, torch.ones(3, 1, 6, 5), normalize="area")
    with pytest.raises(ValueError, match=r"`background_weight` must be in \[0, 1\]"):
        masked_diffusion_loss(pred, target, torch.ones(3, 1, 6, 5), background_weight=1.5)
