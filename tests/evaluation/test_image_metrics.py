"""DINO / CLIP-I / CLIP-T / masked DINO / background leakage: pure functions on hand-made inputs, and the embedders
on tiny CLIP and ViT models saved to folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from persam_dreambooth import testing as tiny
from persam_dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder, MetricModelError
from persam_dreambooth.evaluation.image_metrics import (
    FILL,
    background_dilation_px,
    background_only,
    cosine_matrix,
    mean_pairwise_cosine,
    paired_cosine,
    subject_only,
)
from persam_dreambooth.evaluation.prompts import PromptSpec
from persam_dreambooth.evaluation.scoring import RealImages, Scorer, aggregate


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_cosines_on_known_angles():
    a = torch.tensor([_unit(0), _unit(90)])  # N = 2
    b = torch.tensor([_unit(0), _unit(60), [0.0, -5.0]])  # M = 3; the scale of an embedding does not matter
    sim = cosine_matrix(a, b)
    expected = torch.tensor([[1.0, 0.5, 0.0], [0.0, math.sqrt(3) / 2, -1.0]])
    torch.testing.assert_close(sim, expected, atol=1e-6, rtol=0)
    # DreamBooth's DINO / CLIP-I: the mean over all N x M pairs
    assert mean_pairwise_cosine(a, b) == pytest.approx(float(expected.mean()), abs=1e-6)
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + 0.5 + 0 + 0 + math.sqrt(3) / 2 - 1) / 6, abs=1e-6)
    # CLIP-T: text i against image i only
    torch.testing.assert_close(paired_cosine(a, torch.tensor([_unit(60), _unit(180)])),
                               torch.tensor([0.5, 0.0]), atol=1e-6, rtol=0)


def test_cosine_input_checks():
    with pytest.raises(ValueError, match="same embedding size"):
        cosine_matrix(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"shape \(N, D\) with N >= 1, got \(0, 3\)"):
        mean_pairwise_cosine(torch.ones(0, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        paired_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_subject_only_crops_a_square_around_the_mask_and_fills_the_rest():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:] = (10, 200, 10)  # green background
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 30:50] = True  # 10 x 20 subject
    image[mask] = (250, 0, 0)
    crop = subject_only(image, mask, margin=0.0)
    assert crop.shape == (20, 20, 3)  # square of the longer side
    red = (crop == (250, 0, 0)).all(axis=2)
    assert red.sum() == 200 and red[5:15].all()  # the subject, vertically centred
    assert (crop[~red] == FILL).all()  # no green left: the background is the constant fill
    assert subject_only(image, np.zeros_like(mask)) is None


def test_subject_only_at_the_border_pads_with_fill():
    image = np.full((20, 20, 3), 77, dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:4, 0:12] = True
    crop = subject_only(image, mask, margin=0.0)
    assert crop.shape == (12, 12, 3)
    assert (crop == 77).all(axis=2).sum() == 48  # every subject pixel kept although the square leaves the image


def test_background_only_removes_the_dilated_subject():
    image = np.full((50, 50, 3), 200, dtype=np.uint8)
    mask = np.zeros((50, 50), dtype=bool)
    mask[20:30, 20:30] = True
    out = background_only(image, mask, dilate_px=2)
    filled = (out == FILL).all(axis=2)
    assert filled[18:32, 20:30].all() and filled[20:30, 18:32].all()  # grown by 2 px
    assert not filled[:16].any() and filled.sum() < 14 * 14 + 1
    assert (background_only(image, np.zeros_like(mask)) == image).all()  # no subject: the whole image
    assert background_dilation_px(512, 768) == 15 and background_dilation_px(10, 10) == 1
    with pytest.raises(ValueError, match=r"`mask` must have shape \(H, W\) == image \(50, 50\), got \(50, 49\)"):
        background_only(image, mask[:, :49])


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return DinoEmbedder(str(tiny.save_tiny_dino(root / "dino"))), ClipEmbedder(str(tiny.save_tiny_clip(root / "clip")))


def test_embedders_on_tiny_models(embedders):
    dino, clip = embedders
    images = [tiny.synthetic_subject(40, 50, box_yx=(5, 5, 30, 40), seed=i)[0] for i in range(3)]
    d = dino.embed(images)
    assert d.shape == (3, 16) and d.dtype == torch.float32
    torch.testing.assert_close(dino.embed(images[:1]), d[:1])  # deterministic, batch-independent
    assert clip.embed_images(images).shape == (3, 8)
    t = clip.embed_texts(["a dog in the snow", "a red dog"])
    assert t.shape == (2, 8) and not torch.allclose(t[0], t[1])


def test_missing_metric_model_has_an_offline_hint(tmp_path):
    """The embedders name the model; ``compare`` adds its flag (``MetricModelError.naming``, tested in
    test_compare.py::test_bad_input_fails_before_generation)."""
    with pytest.raises(MetricModelError, match=r"DINO model 'not-a-real/model'.*hf download not-a-real/model") as err:
        DinoEmbedder("not-a-real/model")
    assert err.value.model_id == "not-a-real/model" and err.value.kind == "DINO"
    with pytest.raises(MetricModelError, match=r"`--dino-model not-a-real/model`.*hf download not-a-real/model"):
        raise err.value.naming("--dino-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MetricModelError, match=r"CLIP model .*pass a local folder"):
        ClipEmbedder(str(empty))
    with pytest.raises(FileNotFoundError, match=r"CLIP model folder '/no/such/clip' does not exist"):
        ClipEmbedder("/no/such/clip")


def test_scorer_real_images_score_like_themselves(embedders):
    """A generated image identical to a real one: its DINO row equals that real image's row of real-vs-real."""
    dino, clip = embedders
    pairs = [tiny.synthetic_subject(48, 64, box_yx=(8 + 3 * i, 10 + 4 * i, 36, 50), seed=i) for i in range(3)]
    real = RealImages(paths=[], images=[p[0] for p in pairs], masks=[p[1] for p in pairs])
    masks = {id(p[0]): p[1] for p in pairs}
    scorer = Scorer(dino, clip, real, segmenter=lambda im: masks[id(im)])
    rows = scorer.score([pairs[0][0]], ["a dog"])
    sims = cosine_matrix(dino.embed(real.images), dino.embed(real.images))
    assert rows[0]["dino"] == pytest.approx(float(sims[0].mean()), abs=1e-5)
    assert rows[0]["subject_found"] is True and rows[0]["subject_area"] == pytest.approx(pairs[0][1].mean())
    assert -1 <= rows[0]["clip_t"] <= 1 and rows[0]["masked_dino"] is not None
    ref = scorer.real_vs_real()
    assert ref["dino"] == pytest.approx(float((sims.sum() - sims.diagonal().sum()) / 6), abs=1e-5)
    assert ref["clip_t"] is None


def test_scorer_without_subject_leaves_masked_dino_out(embedders):
    dino, clip = embedders
    image, mask = tiny.synthetic_subject(48, 64, box_yx=(8, 10, 36, 50))
    scorer = Scorer(dino, clip, RealImages(paths=[], images=[image], masks=[mask]),
                    segmenter=lambda im: np.zeros(im.shape[:2], dtype=bool))
    row = scorer.score([image], ["a dog"])[0]
    assert row["masked_dino"] is None and row["subject_found"] is False and row["background_leakage"] is not None
    no_bg = Scorer(dino, clip, RealImages(paths=[], images=[image]), segmenter=None).score([image], ["a dog"])[0]
    assert no_bg["background_leakage"] is None and no_bg["masked_dino"] is None


def test_background_clip_t_scores_the_background_only_image_against_the_context(embedders):
    """Background CLIP-T: CLIP of the background-only image (subject filled as for leakage) vs the context text."""
    dino, clip = embedders
    image, mask = tiny.synthetic_subject(48, 64, box_yx=(8, 10, 36, 50))
    scorer = Scorer(dino, clip, RealImages(paths=[], images=[image], masks=[mask]), segmenter=lambda im: mask)
    rows = scorer.score([image, image], ["a dog on the beach", "a red dog"], ["the beach", None])
    expected = paired_cosine(clip.embed_texts(["the beach"]), clip.embed_images([background_only(image, mask)]))
    assert rows[0]["background_clip_t"] == pytest.approx(float(expected[0]), abs=1e-6)
    whole = paired_cosine(clip.embed_texts(["the beach"]), clip.embed_images([image]))
    assert rows[0]["background_clip_t"] != pytest.approx(float(whole[0]), abs=1e-6)  # the subject is filled
    assert rows[1]["background_clip_t"] is None  # a property prompt asks nothing of the background
    assert scorer.score([image], ["a dog"])[0]["background_clip_t"] is None  # no texts given
    with pytest.raises(ValueError, match=r"`background_texts` must have one entry per image \(1\), got 2"):
        scorer.score([image], ["a dog"], ["x", "y"])


def test_aggregate_means_per_group_and_prompt():
    specs = [PromptSpec(0, "a {}", "g1", "a sks dog", "a dog"), PromptSpec(1, "b {}", "g2", "b sks dog", "b dog")]
    base = {"clip_i": 0.0, "clip_t": 0.0, "background_leakage": None, "subject_found": None}
    rows = [
        {**base, "prompt_index": 0, "group": "g1", "dino": 0.2, "masked_dino": 0.5, "subject_found": True},
        {**base, "prompt_index": 0, "group": "g1", "dino": 0.4, "masked_dino": None, "subject_found": False},
        {**base, "prompt_index": 1, "group": "g2", "dino": 0.9, "masked_dino": 0.7, "subject_found": True},
    ]
    agg = aggregate(rows, specs)
    assert agg["overall"]["dino"] == pytest.approx(0.5)
    assert agg["overall"]["masked_dino"] == pytest.approx(0.6)  # images without a subject are left out
    assert agg["overall"]["subject_found_rate"] == pytest.approx(2 / 3)
    assert agg["groups"]["g1"]["dino"] == pytest.approx(0.3) and agg["groups"]["g2"]["num_images"] == 1
    assert agg["overall"]["background_leakage"] is None
    assert [p["dino"] for p in agg["prompts"]] == pytest.approx([0.3, 0.9])


def test_dino_embedding_is_the_cls_token_of_the_final_layer_norm(embedders, tmp_path):
    """DINO's feature is ``norm(x)[:, 0]``; ViTModel's ``pooler_output`` would add a dense + tanh DINO never had."""
    from transformers import ViTImageProcessor, ViTModel

    dino, _ = embedders
    assert getattr(dino.model, "pooler", None) is None
    images = [tiny.synthetic_subject(40, 50, box_yx=(5, 5, 30, 40), seed=i)[0] for i in range(2)]
    folder = tmp_path / "vit-with-pooler"  # a checkpoint that has pooler weights: they must not be used either
    torch.manual_seed(1)
    with_pooler = ViTModel(dino.model.config, add_pooling_layer=True).eval()
    with_pooler.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    pixels = ViTImageProcessor(size={"height": 32, "width": 32})(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = with_pooler(pixel_values=pixels)
    embedded = DinoEmbedder(str(folder)).embed(images)
    torch.testing.assert_close(embedded, out.last_hidden_state[:, 0])  # (B, 1 + tokens, D) -> CLS (B, D)
    assert not torch.allclose(embedded, out.pooler_output, atol=1e-3)


def test_clip_embeddings_are_the_projected_features(embedders):
    """CLIP-I / CLIP-T compare CLIP's projected embeddings (``projection_dim``), not the encoders' hidden states."""
    _, clip = embedders
    image = tiny.synthetic_subject(40, 50, box_yx=(5, 5, 30, 40))[0]
    pixels = clip.processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = clip.model.vision_model(pixel_values=pixels).pooler_output  # (1, hidden 16)
        expected = clip.model.visual_projection(vision)  # (1, projection 8)
    torch.testing.assert_close(clip.embed_images([image]), expected)
    tokens = clip.processor(text=["a red dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        text = clip.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        expected_t = clip.model.text_projection(text.pooler_output)
    torch.testing.assert_close(clip.embed_texts(["a red dog"]), expected_t)


def test_empty_instance_mask_is_named(embedders):
    dino, clip = embedders
    image, mask = tiny.synthetic_subject(48, 64, box_yx=(8, 10, 36, 50))
    real = RealImages(paths=[Path("a.jpg"), Path("b.jpg")], images=[image, image], masks=[mask, np.zeros_like(mask)])
    with pytest.raises(ValueError, match=r"The mask of instance image 'b.jpg' is empty.*--no-background-metrics"):
        Scorer(dino, clip, real, segmenter=lambda im: mask)


def test_real_images_fingerprint_sees_one_pixel():
    image, mask = tiny.synthetic_subject(48, 64, box_yx=(8, 10, 36, 50))
    real = RealImages(paths=[], images=[image], masks=[mask])
    edited = mask.copy()
    edited[0, 0] = not edited[0, 0]
    assert real.fingerprint() == RealImages(paths=[], images=[image.copy()], masks=[mask.copy()]).fingerprint()
    assert real.fingerprint() != RealImages(paths=[], images=[image], masks=[edited]).fingerprint()
