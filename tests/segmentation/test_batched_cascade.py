"""Batched decoding across images: one decoder call per cascade stage, the same results as image by image."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from persam_dreambooth import PerSAM, PerSAMF, Segmentation
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.cascade import EmptyMaskWarning, persam_cascade, persam_cascade_batch
from persam_dreambooth.segmentation.location_prior import attention_prior
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor

LOGIT_TOL = 1e-4  # batched vs one-by-one: float rounding only


@pytest.fixture(scope="module")
def images():
    """Four photos of different sizes and aspect ratios."""
    return [
        tiny.synthetic_subject(80, 120, box_yx=(20, 50, 60, 100), seed=3)[0],
        tiny.synthetic_subject(90, 90, box_yx=(20, 30, 70, 80), seed=5)[0],
        tiny.synthetic_subject(120, 64, box_yx=(30, 10, 90, 50), seed=8)[0],
        tiny.synthetic_subject(40, 200, box_yx=(5, 60, 35, 140), seed=9)[0],
    ]


@pytest.fixture(scope="module")
def models(sam):
    image, mask = tiny.synthetic_subject()
    persam, persamf = PerSAM(sam), PerSAMF(sam, steps=100)
    persam.set_reference(image, mask)
    persamf.set_reference(image, mask)
    return {"persam": persam, "persamf": persamf}


def _close(batched: Segmentation, single: Segmentation):
    assert np.abs(batched.stage_logits - single.stage_logits).max() < LOGIT_TOL
    assert np.abs(batched.stage_scores - single.stage_scores).max() < LOGIT_TOL
    assert np.array_equal(batched.mask, single.mask)
    assert np.array_equal(batched.points_xy, single.points_xy)
    assert np.array_equal(batched.similarity, single.similarity)
    assert batched.stage_used == single.stage_used and batched.fallbacks == single.fallbacks
    assert (batched.box_xyxy is None) == (single.box_xyxy is None)
    if batched.box_xyxy is not None:
        assert np.array_equal(batched.box_xyxy, single.box_xyxy)


def test_predict_batch_of_one_is_predict_bit_for_bit(sam, images):
    predictor = GuidedSamPredictor(sam)
    emb = predictor.encode(images[0])
    pts, lbl, box = np.array([[30, 40], [100, 5]]), np.array([1, 0]), np.array([10, 12, 90, 70])
    mask_in = torch.randn(1, *predictor.low_res_size, generator=torch.Generator().manual_seed(0))
    attn = torch.rand(1, 1, 1, predictor.grid_size[0] * predictor.grid_size[1])
    target = torch.randn(1, 1, sam.prompt_encoder.embed_dim)
    cases = [
        ({"point_coords": pts, "point_labels": lbl}, {"point_coords": [pts], "point_labels": [lbl]}),
        ({"box": box}, {"boxes": [box]}),
        ({"point_coords": pts, "point_labels": lbl, "box": box, "mask_input": mask_in},
         {"point_coords": [pts], "point_labels": [lbl], "boxes": [box], "mask_inputs": [mask_in]}),
        ({"point_coords": pts, "point_labels": lbl, "attn_sim": attn, "target_embedding": target},
         {"point_coords": [pts], "point_labels": [lbl], "attn_sim": attn, "target_embedding": target}),
    ]
    for single_kw, batch_kw in cases:
        for multimask in (True, False):
            one = predictor.predict(emb, **single_kw, multimask_output=multimask)
            (many,) = predictor.predict_batch([emb], **batch_kw, multimask_output=multimask)
            assert torch.equal(one.low_res_logits, many.low_res_logits)
            assert torch.equal(one.iou_predictions, many.iou_predictions)


def test_predict_batch_decodes_each_image_with_its_own_prompts_and_prior(sam, images):
    predictor = GuidedSamPredictor(sam)
    embs = [predictor.encode(img) for img in images]
    hw = predictor.grid_size[0] * predictor.grid_size[1]
    g = torch.Generator().manual_seed(1)
    pts = [np.array([[5 + 7 * i, 9 + 3 * i], [2 * i, 4]]) for i in range(len(embs))]
    lbl = [np.array([1, 0])] * len(embs)
    boxes = [np.array([1 + i, 2, 30 + 5 * i, 35]) for i in range(len(embs))]
    masks = [torch.randn(1, *predictor.low_res_size, generator=g) for _ in embs]
    attn = torch.rand(len(embs), 1, 1, hw, generator=g)  # a different prior per image
    target = torch.randn(1, 1, sam.prompt_encoder.embed_dim, generator=g)
    outs = predictor.predict_batch(embs, pts, lbl, boxes=boxes, mask_inputs=masks, multimask_output=True,
                                   attn_sim=attn, target_embedding=target)
    for i, emb in enumerate(embs):
        one = predictor.predict(emb, pts[i], lbl[i], box=boxes[i], mask_input=masks[i], multimask_output=True,
                                attn_sim=attn[i : i + 1], target_embedding=target)
        torch.testing.assert_close(outs[i].low_res_logits, one.low_res_logits, rtol=0, atol=LOGIT_TOL)
        torch.testing.assert_close(outs[i].iou_predictions, one.iou_predictions, rtol=0, atol=LOGIT_TOL)
    # the per-image prior matters: swapping two images' priors changes their outputs
    swapped = attn[[1, 0, 2, 3]]
    outs2 = predictor.predict_batch(embs, pts, lbl, boxes=boxes, mask_inputs=masks, multimask_output=True,
                                    attn_sim=swapped, target_embedding=target)
    assert (outs2[0].low_res_logits - outs[0].low_res_logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one entry per image"):
        predictor.predict_batch(embs, pts[:2], lbl[:2])
    with pytest.raises(ValueError, match="batch size 1 or 4"):
        predictor.decoder(torch.stack([e.features for e in embs[:2]]), sam.prompt_encoder.get_dense_pe(),
                          torch.zeros(4, 3, sam.prompt_encoder.embed_dim), torch.zeros(4, 32, 4, 4), True)


@pytest.mark.parametrize("method", ["persam", "persamf"])
def test_segment_embeddings_equals_one_by_one(models, images, method):
    model = models[method]
    embs = [model.encode(img) for img in images]
    batched = model.segment_embeddings(embs)
    assert len(batched) == len(images)
    for emb, result in zip(embs, batched, strict=True):
        _close(result, model.segment_embedding(emb))
    assert model.segment_embeddings([]) == []


@pytest.mark.parametrize("method", ["persam", "persamf"])
def test_batched_multi_instance_equals_one_by_one(models, images, method):
    model = models[method]
    embs = [model.encode(img) for img in images]
    # permissive settings so that images stop after different numbers of rounds (the batch shrinks)
    kwargs = {"max_instances": 3, "similarity_threshold": -1.0, "overlap_iou": 1.0}
    batched = model.segment_embeddings(embs, **kwargs)
    assert len(batched) == len(images)
    assert len({len(found) for found in batched}) > 1 and max(len(found) for found in batched) > 1
    for emb, found in zip(embs, batched, strict=True):
        single = model.segment_embedding(emb, **kwargs)
        assert isinstance(found, list) and len(found) == len(single)
        for a, b in zip(found, single, strict=True):
            _close(a, b)


def test_batch_of_one_is_the_cascade_bit_for_bit(models, images):
    persam = models["persam"]
    emb = persam.encode(images[1])
    (one,) = persam_cascade_batch(persam.predictor, [emb], persam.reference.target)
    ref = persam_cascade(persam.predictor, emb, persam.reference.target)
    assert np.array_equal(one.stage_logits, ref.stage_logits) and np.array_equal(one.mask, ref.mask)
    # per-image attention priors are built image by image and stacked
    prior = attention_prior(torch.from_numpy(ref.similarity), persam.predictor.grid_size,
                            persam.predictor.frame_size, emb.input_size)
    assert prior.shape == (1, 1, 1, 16)
    with pytest.raises(ValueError, match=r"`similarities\[0\]` must have shape"):
        persam_cascade_batch(persam.predictor, [emb], persam.reference.target, [torch.zeros(3, 3)])


def test_fallbacks_in_a_batch(images):
    """A SAM whose masks are all empty: every image falls back, batched exactly as one by one."""
    blank = tiny.tiny_sam()
    with torch.no_grad():
        for mlp in blank.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    image, mask = tiny.synthetic_subject()
    for model in (PerSAM(blank), PerSAMF(blank, steps=5)):
        model.set_reference(image, mask)
        embs = [model.encode(img) for img in images[:3]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyMaskWarning)
            batched = model.segment_embeddings(embs)
            singles = [model.segment_embedding(e) for e in embs]
        for a, b in zip(batched, singles, strict=True):
            _close(a, b)
            assert a.fallbacks and a.stage_used < 3
