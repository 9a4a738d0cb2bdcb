"""PerSAM-F: losses by hand, the cached-logit fit against the published loop, the published steps with SamPredictor."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from persam_dreambooth import PerSAM, PerSAMF, Segmentation
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.cascade import EmptyMaskWarning
from persam_dreambooth.segmentation.location_prior import (
    box_from_mask,
    select_point_prompts,
    similarity_map,
    target_embedding,
    upscale_to_original,
)
from persam_dreambooth.segmentation.losses import dice_loss, sigmoid_focal_loss
from persam_dreambooth.segmentation.reference_mask import reference_cells
from persam_dreambooth.segmentation.scale_fit import fit_scale_weights


@pytest.fixture(scope="module")
def persamf(sam, reference):
    model = PerSAMF(sam)
    model.set_reference(*reference)
    return model


def published_fit(logits: list[torch.Tensor], gts: list[torch.Tensor], steps: int, lr: float = 1e-3):
    """The published optimisation with autograd, torch.optim.AdamW and CosineAnnealingLR (mean over references)."""
    weights = torch.nn.Parameter(torch.ones(2, 1) / 3)
    optimizer = torch.optim.AdamW([weights], lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in range(steps):
        lam = torch.cat((1 - weights.sum(0).unsqueeze(0), weights), dim=0)  # (3, 1)
        loss = 0
        for maps, gt in zip(logits, gts, strict=True):
            mixed = (maps.flatten(1) * lam).sum(0)  # (3, HW) * (3, 1) -> (HW,)
            target = gt.flatten().float()
            loss = loss + dice_loss(mixed, target) + sigmoid_focal_loss(mixed, target)
        loss = loss / len(logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return torch.cat((1 - weights.sum(0).unsqueeze(0), weights)).detach().flatten(), torch.tensor(losses)


def synthetic_logits(seed: int, shape=(30, 40), good: int = 1):
    """Three logit maps; map ``good`` matches the ground truth, the other two are noise."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.zeros(shape, dtype=torch.bool)
    gt[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 5 : 3 * shape[1] // 5] = True
    maps = torch.randn(3, *shape, generator=g) * 2
    maps[good] = torch.where(gt, 4.0, -4.0) + torch.randn(shape, generator=g) * 0.5
    return maps, gt


# ------------------------------------------------------------------------------------------------------------ losses
def test_dice_and_focal_on_a_2x2_example():
    logits = torch.tensor([[0.0, math.log(3)], [-math.log(3), 0.0]])  # p = [[0.5, 0.75], [0.25, 0.5]]
    target = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    # dice: 1 - (2 * 1.25 + 1) / (2 + 2 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx(0.3, abs=1e-7)
    # focal per pixel: alpha_t (1 - p_t)^2 ce -> .25*.25*ln2, .25*.0625*ln(4/3), .75*.0625*ln(4/3), .75*.25*ln2
    expected = (0.25 * math.log(2) + 0.0625 * math.log(4 / 3)) / 4
    assert float(sigmoid_focal_loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    assert float(sigmoid_focal_loss(logits, target, alpha=0.5, gamma=0.0)) == pytest.approx(
        0.5 * (2 * math.log(2) + 2 * math.log(4 / 3)) / 4, rel=1e-6)  # gamma 0, alpha .5: half the mean BCE
    with pytest.raises(ValueError, match="`target` must have the shape"):
        dice_loss(logits, target[0])
    with pytest.raises(ValueError, match="`alpha`"):
        sigmoid_focal_loss(logits, target, alpha=1.5)


# ------------------------------------------------------------------------------------------------------ the fit
def test_fit_moves_weight_to_the_scale_that_matches_and_keeps_sum_one():
    for good in (0, 2):
        maps, gt = synthetic_logits(seed=good, good=good)
        fit = fit_scale_weights(maps, gt, steps=300, lr=5e-3)
        weights = fit.weights
        assert weights.shape == (3,) and weights.dtype == torch.float32
        assert int(weights.argmax()) == good and float(weights[good]) > 1 / 3 + 0.2
        assert all(float(weights[k]) < 1 / 3 for k in range(3) if k != good)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)  # lambda_0 = 1 - w1 - w2
        assert fit.losses.shape == (300,)
        assert float(fit.losses[-50:].mean()) < float(fit.losses[:50].mean()) - 0.05
        assert float(fit.losses[-1]) < float(fit.losses[0])


@pytest.mark.parametrize("steps", [1000, 200])
def test_fit_equals_the_published_autograd_and_torch_optim_loop(steps):
    maps, gt = synthetic_logits(seed=5)
    fit = fit_scale_weights(maps, gt, steps=steps)
    weights, losses = published_fit([maps], [gt], steps)
    assert torch.allclose(fit.weights, weights, rtol=0, atol=1e-6)
    assert torch.allclose(fit.losses, losses, rtol=0, atol=1e-6)


def test_fit_input_checks():
    maps, gt = synthetic_logits(seed=1)
    with pytest.raises(ValueError, match=r"`gt\[0\]` must have shape \(H, W\) == \(30, 40\)"):
        fit_scale_weights(maps, gt[:, :-1], steps=2)
    with pytest.raises(ValueError, match="`logits` must have shape"):
        fit_scale_weights(maps[0], gt, steps=2)
    with pytest.raises(ValueError, match="one mask per reference"):
        fit_scale_weights([maps, maps], [gt], steps=2)
    with pytest.raises(ValueError, match="`steps`"):
        fit_scale_weights(maps, gt, steps=0)
    with pytest.raises(ValueError, match="`lr`"):
        fit_scale_weights(maps, gt, lr=0)
    # an all-foreground reference (no background segment) still fits without NaN
    fit = fit_scale_weights(maps, torch.ones(30, 40, dtype=torch.bool), steps=5)
    assert torch.isfinite(fit.weights).all() and torch.isfinite(fit.losses).all()


def test_cached_fit_equals_a_decoder_per_step_loop_on_the_tiny_sam(sam, reference):
    """The published loop: SamPredictor's decoder re-run at every step (200 steps keep the test fast)."""
    steps = 200
    image, mask = reference
    persamf = PerSAMF(sam, steps=steps)
    persamf.set_reference(image, mask)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    cells = reference_cells(mask, sam.image_encoder.img_size, sam.prompt_encoder.image_embedding_size).cells
    target = target_embedding(predictor.features[0], cells, pooling="max_mean")
    sim = upscale_to_original(similarity_map(target, predictor.features[0]), sam.prompt_encoder.mask_input_size,
                              sam.image_encoder.img_size, predictor.input_size, predictor.original_size)
    point, label = select_point_prompts(sim, topk=1, negative=False)
    assert np.array_equal(persamf.reference.points_xy[0], point.numpy())

    weights = torch.nn.Parameter(torch.ones(2, 1) / 3)
    optimizer = torch.optim.AdamW([weights], lr=1e-3, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gt = torch.from_numpy(mask).flatten().float()
    for _ in range(steps):
        logits_high, _, _ = predictor.predict(point.numpy(), label.numpy(), multimask_output=True, return_logits=True)
        lam = torch.cat((1 - weights.sum(0).unsqueeze(0), weights), dim=0)
        mixed = (torch.from_numpy(logits_high).flatten(1) * lam).sum(0)
        loss = dice_loss(mixed, gt) + sigmoid_focal_loss(mixed, gt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    expected = torch.cat((1 - weights.sum(0).unsqueeze(0), weights)).detach().flatten().numpy()
    assert np.abs(persamf.scale_weights - expected).max() <= 1e-6
    assert np.abs(persamf.scale_weights - 1 / 3).max() > 1e-2  # the weights did move


# ---------------------------------------------------------------------------------------------------- inference
def test_public_api_and_result_fields(persamf, target_image):
    import persam_dreambooth

    assert persam_dreambooth.PerSAMF is PerSAMF
    weights = persamf.scale_weights
    assert isinstance(weights, np.ndarray) and weights.shape == (3,) and weights.dtype == np.float32
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert persamf.fit_losses.shape == (1000,)
    result = persamf.segment(target_image)
    assert isinstance(result, Segmentation)
    h, w = target_image.shape[:2]
    assert result.mask.shape == (h, w) and result.mask.dtype == bool
    assert result.points_xy.shape == (1, 2) and result.point_labels.tolist() == [1]
    x, y = result.points_xy[0]
    assert result.similarity[y, x] == result.similarity.max()
    assert result.stage_logits.shape == (3, 16, 16) and result.stage_scores.shape == (3,)
    assert result.stage_used == 3 and result.fallbacks == () and result.seconds > 0
    assert persamf.predictor is not None and persamf.sam is persamf.predictor.sam
    emb = persamf.encode(target_image)
    again = persamf.segment_embedding(emb)
    assert np.array_equal(again.stage_logits, result.stage_logits) and np.array_equal(again.mask, result.mask)


@pytest.mark.parametrize("square", [False, True])
def test_inference_matches_the_published_steps(sam, persamf, target_image, square):
    if square:
        target_image = tiny.synthetic_subject(90, 90, box_yx=(20, 30, 70, 80), seed=5)[0]
    result = persamf.segment(target_image)
    ref = persamf.reference
    predictor = SamPredictor(sam)
    predictor.set_image(target_image)
    feats = predictor.features[0]
    sim = upscale_to_original(similarity_map(ref.target, feats), sam.prompt_encoder.mask_input_size,
                              sam.image_encoder.img_size, predictor.input_size, predictor.original_size)
    assert np.array_equal(result.similarity, sim.numpy())
    point, label = select_point_prompts(sim, topk=1, negative=False)
    pts, lbl = point.numpy(), label.numpy()
    assert np.array_equal(result.points_xy, pts)
    weights = ref.weights  # (3,) torch, as the published `weights` tensor
    high, scores, low = predictor.predict(pts, lbl, multimask_output=True, return_logits=True)
    mask = ((torch.from_numpy(high) * weights[:, None, None]).sum(0) > 0).numpy()
    logit = (low * weights.numpy()[:, None, None]).sum(0)  # numpy, as published
    np.testing.assert_allclose(result.stage_logits[0], logit, rtol=0, atol=1e-6)
    box1 = box_from_mask(torch.from_numpy(mask)).numpy()
    m2, s2, l2 = predictor.predict(pts, lbl, box=box1[None], mask_input=logit[None], multimask_output=True)
    b2 = int(np.argmax(s2))
    np.testing.assert_allclose(result.stage_logits[1], l2[b2], rtol=0, atol=1e-5)
    box2 = box_from_mask(torch.from_numpy(m2[b2])).numpy()
    assert np.array_equal(result.box_xyxy, box2)
    m3, s3, l3 = predictor.predict(pts, lbl, box=box2[None], mask_input=l2[b2][None], multimask_output=True)
    b3 = int(np.argmax(s3))
    np.testing.assert_allclose(result.stage_logits[2], l3[b3], rtol=0, atol=1e-5)
    assert np.array_equal(result.mask, m3[b3])


def test_empty_mixed_mask_falls_back_to_the_best_single_output(persamf, target_image):
    model = PerSAMF(persamf.sam, steps=3)
    model._reference = dataclasses.replace(persamf.reference, weights=torch.zeros(3))  # mixed logits all 0: empty
    with pytest.warns(EmptyMaskWarning, match="mixed stage-1 mask is empty"):
        result = model.segment(target_image)
    emb = model.encode(target_image)
    out = model.predictor.predict(emb, result.points_xy, result.point_labels, multimask_output=True)
    assert np.array_equal(result.stage_logits[0], out.low_res_logits[out.best].numpy())
    assert len(result.fallbacks) == 1 and result.stage_used in (2, 3)


def test_all_empty_never_raises(reference, target_image):
    blank = tiny.tiny_sam()
    with torch.no_grad():
        for mlp in blank.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    model = PerSAMF(blank, steps=5)
    model.set_reference(*reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.segment(target_image)
    assert any(issubclass(w.category, EmptyMaskWarning) for w in caught)
    assert result.stage_used == 1 and result.box_xyxy is None and not result.mask.any()
    assert len(result.fallbacks) == 2 and np.array_equal(result.stage_logits[2], result.stage_logits[0])


def test_constructor_and_reference_errors(sam, reference):
    with pytest.raises(ValueError, match="`steps`"):
        PerSAMF(sam, steps=0)
    with pytest.raises(ValueError, match="`lr`"):
        PerSAMF(sam, lr=-1.0)
    model = PerSAMF(sam, steps=2)
    with pytest.raises(RuntimeError, match="set_reference"):
        model.scale_weights  # noqa: B018
    with pytest.raises(ValueError, match="`mask` is empty"):
        model.set_reference(reference[0], np.zeros_like(reference[1]))
    assert isinstance(model, PerSAM)  # same interface: callers treat both alike


def test_mask_sets_can_use_persam_f(tmp_path, tiny_sam_model):
    from PIL import Image

    from persam_dreambooth.masks.make import make_mask_set, segmenter_class

    assert segmenter_class("persam_f") is PerSAMF
    masks = tiny.write_instance_dir(tmp_path / "img", n=2)
    ref_mask = tmp_path / "ref.png"
    Image.fromarray(masks["00"].astype(np.uint8) * 255).save(ref_mask)
    images = sorted((tmp_path / "img").iterdir())
    mask_set = make_mask_set(images, tmp_path / "masks", images[0], reference_mask=ref_mask, method="persam_f",
                             sam=tiny_sam_model, sam_model_type="tiny", progress=False)
    assert mask_set.record["method"] == "persam_f" and set(mask_set.record["images"]) == {"00", "01"}
