"""Several reference shots: one shot in a list is the one-shot result bit for bit; more shots pool and fit jointly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_persam_f import published_fit

from persam_dreambooth import PerSAM, PerSAMF
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.cascade import location_confidence
from persam_dreambooth.segmentation.location_prior import select_point_prompts, target_embedding


@pytest.fixture(scope="module")
def shots():
    """Two references of different sizes and object areas, and a target photo."""
    a = tiny.synthetic_subject()
    b = tiny.synthetic_subject(72, 90, box_yx=(10, 20, 60, 80), seed=7)
    target = tiny.synthetic_subject(80, 120, box_yx=(20, 50, 60, 100), seed=3)[0]
    return a, b, target


def _same(x, y):
    assert np.array_equal(x.mask, y.mask) and np.array_equal(x.stage_logits, y.stage_logits)
    assert np.array_equal(x.points_xy, y.points_xy) and x.score == y.score


@pytest.mark.parametrize("cls", [PerSAM, PerSAMF])
def test_one_shot_in_a_list_is_the_one_shot_call(sam, shots, cls):
    (image, mask), _, target = shots
    make = (lambda: cls(sam)) if cls is PerSAM else (lambda: cls(sam, steps=200))
    single, listed, tupled = make(), make(), make()
    single.set_reference(image, mask)
    listed.set_reference([image], [mask])
    tupled.set_reference_embedding((single.reference.embedding,), (mask,))
    for model in (listed, tupled):
        assert torch.equal(model.reference.target, single.reference.target)
        assert len(model.reference.shots) == 1
        _same(model.segment(target), single.segment(target))
    if cls is PerSAMF:
        assert np.array_equal(listed.scale_weights, single.scale_weights)
        assert np.array_equal(listed.fit_losses, single.fit_losses)


def test_persam_pools_all_shots_cells_together(sam, shots):
    (image_a, mask_a), (image_b, mask_b), target = shots
    model = PerSAM(sam)
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        ref = model.set_reference([image_a, image_b], [mask_a, mask_b])
    finally:
        handle.remove()
    assert len(calls) == 2 and len(ref.shots) == 2  # each shot encoded once
    feats = [s.embedding.features for s in ref.shots]
    cells = [s.cells.cells for s in ref.shots]
    counts = [int(c.sum()) for c in cells]
    assert counts[0] != counts[1]  # so that pooling cells and averaging per-shot means differ
    # every cell counts once
    pooled = torch.cat([f.permute(1, 2, 0)[c] for f, c in zip(feats, cells, strict=True)]).mean(0)
    torch.testing.assert_close(ref.target, pooled, rtol=0, atol=1e-6)
    per_shot = torch.stack([target_embedding(f, c) for f, c in zip(feats, cells, strict=True)]).mean(0)
    assert (ref.target - per_shot).abs().max() > 1e-4
    result = model.segment(target)
    assert result.mask.shape == target.shape[:2] and result.stage_used in (2, 3)


def test_persam_f_fits_the_weights_on_all_shots_jointly(sam, shots):
    (image_a, mask_a), (image_b, mask_b), target = shots
    steps = 300
    model = PerSAMF(sam, steps=steps)
    ref = model.set_reference([image_a, image_b], [mask_a, mask_b])
    feats = [s.embedding.features for s in ref.shots]
    cells = [s.cells.cells for s in ref.shots]
    torch.testing.assert_close(ref.target, target_embedding(feats, cells, pooling="max_mean"), rtol=0, atol=0)
    # each shot's own positive point and three logit maps; the weights minimise the mean of the shots' losses
    logits = []
    for shot, points in zip(ref.shots, ref.points_xy, strict=True):
        point, label = select_point_prompts(location_confidence(model.predictor, shot.embedding, ref.target),
                                            negative=False)
        assert np.array_equal(points, point.numpy())
        logits.append(model.predictor.predict(shot.embedding, point, label, return_high_res=True).high_res_logits)
    expected, losses = published_fit(logits, [torch.from_numpy(mask_a), torch.from_numpy(mask_b)], steps)
    assert np.abs(model.scale_weights - expected.numpy()).max() <= 1e-6
    assert np.abs(model.fit_losses - losses.numpy()).max() <= 1e-6
    only_a = PerSAMF(sam, steps=steps)
    only_a.set_reference(image_a, mask_a)
    assert np.abs(only_a.scale_weights - model.scale_weights).max() > 1e-3  # the second shot changed the fit
    assert model.segment(target).mask.shape == target.shape[:2]


def test_reference_list_errors_name_the_shot(sam, shots):
    (image_a, mask_a), (image_b, mask_b), _ = shots
    model = PerSAM(sam)
    with pytest.raises(ValueError, match=r"`mask\[1\]` has size .*\(72, 89\).*`image\[1\]`.*\(72, 90\)"):
        model.set_reference([image_a, image_b], [mask_a, mask_b[:, :-1]])
    with pytest.raises(ValueError, match=r"`mask\[1\]` is empty"):
        model.set_reference([image_a, image_b], [mask_a, np.zeros_like(mask_b)])
    with pytest.raises(ValueError, match="same length"):
        model.set_reference([image_a, image_b], [mask_a])
    with pytest.raises(ValueError, match="same length"):
        model.set_reference([], [])
    with pytest.raises(TypeError, match="must be a list"):
        model.set_reference([image_a], mask_a)
    with pytest.raises(TypeError, match="`mask` is a list"):
        model.set_reference(image_a, [mask_a])
    with pytest.raises(FileNotFoundError):
        model.set_reference([image_a, "/nonexistent/b.jpg"], [mask_a, mask_b])
    with pytest.raises(TypeError, match=r"`embedding\[0\]` must be an ImageEmbedding"):
        model.set_reference_embedding([image_a], [mask_a])
    assert model._reference is None  # nothing was set by a failed call


def test_shots_may_be_paths_and_pil_images(sam, shots, tmp_path):
    (image_a, mask_a), (image_b, mask_b), target = shots
    Image.fromarray(image_b).save(tmp_path / "b.png")
    Image.fromarray(mask_b.astype(np.uint8) * 255).save(tmp_path / "b_mask.png")
    arrays = PerSAM(sam)
    arrays.set_reference([image_a, image_b], [mask_a, mask_b])
    mixed = PerSAM(sam)
    mixed.set_reference((Image.fromarray(image_a), tmp_path / "b.png"), (mask_a, str(tmp_path / "b_mask.png")))
    assert torch.equal(arrays.reference.target, mixed.reference.target)
