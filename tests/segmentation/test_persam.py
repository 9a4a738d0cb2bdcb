"""PerSAM end to end on the tiny SAM, checked against SamPredictor doing the published steps by hand."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from persam_dreambooth import PerSAM, Segmentation
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.cascade import EmptyMaskWarning
from persam_dreambooth.segmentation.location_prior import (
    attention_prior,
    box_from_mask,
    select_point_prompts,
    similarity_map,
    upscale_to_original,
)
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor
from persam_dreambooth.segmentation.reference_prompt import mask_from_prompt


def test_public_import_and_result_fields(persam, target_image):
    result = persam.segment(target_image)
    assert isinstance(result, Segmentation)
    h, w = target_image.shape[:2]
    assert result.mask.shape == (h, w) and result.mask.dtype == bool
    assert isinstance(result.score, float)
    assert result.points_xy.shape == (2, 2) and result.points_xy.dtype == np.int64
    assert result.point_labels.tolist() == [1, 0]
    assert (0 <= result.points_xy[:, 0]).all() and (result.points_xy[:, 0] < w).all()
    assert (0 <= result.points_xy[:, 1]).all() and (result.points_xy[:, 1] < h).all()
    assert result.similarity.shape == (h, w) and result.similarity.dtype == np.float32
    assert result.stage_logits.shape == (3, 16, 16) and result.stage_logits.dtype == np.float32
    assert result.stage_scores.shape == (3,)
    assert result.stage_used == 3 and result.fallbacks == ()
    assert result.seconds > 0
    x, y = result.points_xy[0]
    assert result.similarity[y, x] == result.similarity.max()  # positive point = arg-max at (row y, col x)
    xn, yn = result.points_xy[1]
    assert result.similarity[yn, xn] == result.similarity.min()


def test_segment_is_deterministic(persam, target_image):
    a, b = persam.segment(target_image), persam.segment(target_image)
    assert np.array_equal(a.mask, b.mask) and a.score == b.score
    assert np.array_equal(a.stage_logits, b.stage_logits) and np.array_equal(a.points_xy, b.points_xy)


@pytest.mark.parametrize("square", [False, True])
def test_cascade_matches_sam_predictor_steps(sam, persam, target_image, square):
    """Every stage recomputed with segment_anything's SamPredictor and the spec's formulas."""
    if square:
        target_image = tiny.synthetic_subject(90, 90, box_yx=(20, 30, 70, 80), seed=5)[0]
    result = persam.segment(target_image)
    predictor = SamPredictor(sam)
    predictor.set_image(target_image)
    feats = predictor.features[0]
    ref = persam.reference
    # location prior
    sim = upscale_to_original(similarity_map(ref.target, feats), sam.prompt_encoder.mask_input_size,
                              sam.image_encoder.img_size, predictor.input_size, predictor.original_size)
    assert np.array_equal(result.similarity, sim.numpy())
    points, labels = select_point_prompts(sim)
    assert np.array_equal(result.points_xy, points.numpy())
    # stage 1: SamPredictor's prompt path, decoder with both injections
    coords = torch.as_tensor(predictor.transform.apply_coords(points.numpy().astype(float), predictor.original_size),
                             dtype=torch.float)[None]
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(coords, labels.int()[None]), boxes=None, masks=None)
        attn = attention_prior(sim, sam.prompt_encoder.image_embedding_size, sam.image_encoder.img_size,
                               predictor.input_size)
        low1, iou1 = persam.predictor.decoder(predictor.features, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                              False, attn_sim=attn, target_embedding=ref.target[None, None])
    assert np.array_equal(result.stage_logits[0], low1[0, 0].numpy())
    # stage 2 and 3: plain SamPredictor.predict, as the published script
    pts, lbl = points.numpy(), labels.numpy()
    m2, s2, l2 = predictor.predict(pts, lbl, mask_input=result.stage_logits[0][None], multimask_output=True)
    b2 = int(np.argmax(s2))
    assert np.array_equal(result.stage_logits[1], l2[b2])
    box = box_from_mask(torch.from_numpy(m2[b2])).numpy()
    m3, s3, l3 = predictor.predict(pts, lbl, box=box[None], mask_input=l2[b2][None], multimask_output=True)
    b3 = int(np.argmax(s3))
    assert np.array_equal(result.box_xyxy, box)
    assert np.array_equal(result.stage_logits[2], l3[b3])
    assert np.array_equal(result.mask, m3[b3])
    assert result.score == pytest.approx(float(s3[b3]), abs=0)


def test_reference_is_encoded_once_and_each_image_once(sam, reference, target_image):
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        model = PerSAM(sam)
        model.set_reference(*reference)
        assert len(calls) == 1
        for _ in range(3):
            model.segment(target_image)
        assert len(calls) == 4
        emb = model.encode(target_image)
        model.segment_embedding(emb)
        model.segment_embedding(emb)
        assert len(calls) == 5
    finally:
        handle.remove()


def test_predictor_equals_sam_predictor(sam, target_image):
    ours = GuidedSamPredictor(sam)
    theirs = SamPredictor(sam)
    theirs.set_image(target_image)
    emb = ours.encode(target_image)
    assert torch.equal(emb.features, theirs.features[0])
    assert emb.input_size == theirs.input_size and emb.original_size == theirs.original_size
    pts, lbl, box = np.array([[30, 40], [100, 5]]), np.array([1, 0]), np.array([10, 12, 90, 70])
    for kwargs in ({"point_coords": pts, "point_labels": lbl}, {"box": box}, {"point_coords": pts, "point_labels": lbl,
                                                                                     "box": box}):
        for multimask in (True, False):
            m, s, low = theirs.predict(**kwargs, multimask_output=multimask)
            out = ours.predict(emb, **kwargs, multimask_output=multimask, return_high_res=True)
            assert np.array_equal(out.low_res_logits.numpy(), low) and np.array_equal(out.iou_predictions.numpy(), s)
            assert np.array_equal((out.high_res_logits > 0).numpy(), m)


def test_cached_and_batched_embeddings_feed_the_same_cascade(sam, reference, target_image):
    single = PerSAM(sam)
    single.set_reference(*reference)
    one = single.segment(target_image)
    # an embedding computed elsewhere (e.g. a cache) gives exactly the same result
    model = PerSAM(sam)
    model.set_reference_embedding(model.encode(reference[0]).to("cpu"), reference[1])
    cached = model.segment_embedding(single.encode(target_image))
    assert np.array_equal(cached.stage_logits, one.stage_logits) and np.array_equal(cached.mask, one.mask)
    # one encoder call for several images: the same features up to float rounding
    ref_emb, img_emb = model.predictor.encode_batch([reference[0], target_image])
    assert img_emb.original_size == target_image.shape[:2] and img_emb.input_size == (43, 64)
    torch.testing.assert_close(img_emb.features, single.encode(target_image).features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref_emb.features, single.reference.embedding.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "uint8_255", "uint8_01", "pil_L", "pil_P", "pil_RGBA_alpha", "path"])
def test_reference_mask_formats_give_the_same_target(sam, reference, kind, tmp_path):
    image, mask = reference
    base = PerSAM(sam)
    base.set_reference(image, mask)
    if kind == "bool":
        given = mask
    elif kind == "uint8_255":
        given = mask.astype(np.uint8) * 255
    elif kind == "uint8_01":
        given = mask.astype(np.uint8)
    elif kind == "pil_L":
        given = Image.fromarray(mask.astype(np.uint8) * 255)
    elif kind == "pil_P":
        given = Image.fromarray(mask.astype(np.uint8)).convert("P")
        given.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    elif kind == "pil_RGBA_alpha":
        rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
        rgba[..., :3] = 200  # colour everywhere; the alpha channel is the mask
        rgba[..., 3] = mask * 255
        given = Image.fromarray(rgba)
    else:
        given = tmp_path / "m.png"
        Image.fromarray(mask.astype(np.uint8) * 128).save(given)
    model = PerSAM(sam)
    model.set_reference(Image.fromarray(image), given)
    assert torch.equal(model.reference.target, base.reference.target)


def test_set_reference_errors(sam, reference):
    image, mask = reference
    model = PerSAM(sam)
    with pytest.raises(RuntimeError, match="set_reference"):
        model.segment(image)
    with pytest.raises(ValueError, match=r"\(96, 127\).*\(96, 128\)"):
        model.set_reference(image, mask[:, :-1])
    with pytest.raises(ValueError, match="`mask` is empty"):
        model.set_reference(image, np.zeros_like(mask))
    with pytest.raises(TypeError, match="Sam"):
        PerSAM(torch.nn.Linear(2, 2))


def test_tiny_reference_falls_back_without_nan(sam, reference, target_image):
    image, _ = reference
    tiny_mask = np.zeros(image.shape[:2], dtype=bool)
    tiny_mask[40:44, 60:64] = True
    model = PerSAM(sam)
    with pytest.warns(UserWarning, match="covers no whole embedding cell"):
        model.set_reference(image, tiny_mask)
    assert model.reference.cells.fallback and torch.isfinite(model.reference.target).all()
    result = model.segment(target_image)
    assert np.isfinite(result.similarity).all() and np.isfinite(result.stage_logits).all()


def test_empty_intermediate_mask_keeps_previous_stage(reference, target_image):
    """A real SAM whose mask logits are all 0 (hypernetwork heads zeroed): stage 2 is empty, nothing raises."""
    blank = copy.deepcopy(tiny.tiny_sam())
    with torch.no_grad():
        for mlp in blank.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    model = PerSAM(blank)
    model.set_reference(*reference)
    with pytest.warns(EmptyMaskWarning, match="stage 2 mask is empty"):
        result = model.segment(target_image)
    assert result.stage_used == 2
    assert result.box_xyxy is None
    assert len(result.fallbacks) == 1 and "stage 2" in result.fallbacks[0]
    assert not result.mask.any()
    assert np.array_equal(result.stage_logits[2], result.stage_logits[1])
    assert result.score == pytest.approx(float(result.stage_scores[1]))


def test_large_non_square_and_grayscale_images(persam):
    gray = np.random.default_rng(0).integers(0, 255, size=(37, 301), dtype=np.uint8)
    result = persam.segment(Image.fromarray(gray))
    assert result.mask.shape == (37, 301)
    assert result.similarity.shape == (37, 301)
    for shape in ((1, 1, 3), (2, 3, 3)):  # degenerate photos do not crash
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyMaskWarning)  # a flat photo may well give an empty mask
            small = persam.segment(np.full(shape, 120, dtype=np.uint8))
        assert small.mask.shape == shape[:2] and np.isfinite(small.stage_logits).all()
    # a 1 x 128 strip fits the 64-px frame (short side rounds to 1 pixel); 1 x 129 would be 0 pixels high
    assert persam.segment(np.full((1, 128, 3), 90, dtype=np.uint8)).mask.shape == (1, 128)
    with pytest.raises(ValueError, match=r"`image` has size \(H, W\) = \(1, 129\).*at most 128x the short side"):
        persam.segment(np.full((1, 129, 3), 90, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"`image` has size \(H, W\) = \(129, 1\)"):
        PerSAM(persam.sam).set_reference(np.full((129, 1, 3), 90, dtype=np.uint8), np.ones((129, 1), bool))


def test_mask_from_prompt_box_and_point(sam, reference):
    image, _ = reference
    predictor = GuidedSamPredictor(sam)
    emb = predictor.encode(image)
    theirs = SamPredictor(sam)
    theirs.set_image(image)
    m, s, _ = theirs.predict(box=np.array([40, 30, 90, 70]), multimask_output=True)
    mask, score = mask_from_prompt(predictor, emb, box_xyxy=(40, 30, 90, 70))
    assert np.array_equal(mask, m[int(np.argmax(s))]) and score == pytest.approx(float(s.max()))
    m, s, _ = theirs.predict(point_coords=np.array([[64, 48]]), point_labels=np.array([1]), multimask_output=True)
    mask, score = mask_from_prompt(predictor, emb, point_xy=(64, 48))
    assert np.array_equal(mask, m[int(np.argmax(s))])
    with pytest.raises(ValueError, match="box_xyxy"):
        mask_from_prompt(predictor, emb, box_xyxy=(40, 30, 200, 70))
    with pytest.raises(ValueError, match="point_xy"):
        mask_from_prompt(predictor, emb, point_xy=(128, 10))
    with pytest.raises(ValueError, match="exactly one"):
        mask_from_prompt(predictor, emb)


def test_no_warnings_on_a_normal_run(persam, target_image):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        persam.segment(target_image)


def test_cascade_on_a_caller_given_similarity_map(persam, target_image):
    """The seam for multi-instance search: suppress the found object in the map and run again."""
    from persam_dreambooth.segmentation.cascade import persam_cascade

    emb = persam.encode(target_image)
    first = persam.segment_embedding(emb)
    sim = torch.from_numpy(first.similarity.copy())
    x, y = first.points_xy[0]
    sim[max(0, y - 5) : y + 6, max(0, x - 5) : x + 6] = -1.0  # suppress around the first positive point
    second = persam_cascade(persam.predictor, emb, persam.reference.target, similarity=sim)
    assert np.array_equal(second.similarity, sim.numpy())
    assert tuple(second.points_xy[0]) != (x, y)
    assert second.similarity[second.points_xy[0][1], second.points_xy[0][0]] == sim.max()
    with pytest.raises(ValueError, match=r"`similarity` must have shape \(H, W\) == \(80, 120\)"):
        persam_cascade(persam.predictor, emb, persam.reference.target, similarity=sim[:-1])
