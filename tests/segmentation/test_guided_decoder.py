"""GuidedMaskDecoder: bit-identical to SAM's decoder with guidance off; PerSAM's exact injections with it on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling.transformer import Attention

from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.guided_decoder import (
    GuidedAttention,
    GuidedMaskDecoder,
    GuidedTwoWayAttentionBlock,
    GuidedTwoWayTransformer,
)


@pytest.fixture(scope="module")
def features(sam):
    image, _ = tiny.synthetic_subject()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor.features  # (1, C, h, w)


def _prompts(sam, layout: str, features):
    """Sparse/dense prompt embeddings for one prompt layout (coordinates in the 64-px input frame)."""
    pts = torch.tensor([[[20.0, 30.0], [50.0, 10.0]]])
    lbl = torch.tensor([[1, 0]])
    box = torch.tensor([[8.0, 12.0, 40.0, 44.0]])
    g = torch.Generator().manual_seed(1)
    mask = torch.randn(1, 1, *sam.prompt_encoder.mask_input_size, generator=g)
    args = {
        "points": {"points": (pts, lbl), "boxes": None, "masks": None},
        "box": {"points": None, "boxes": box, "masks": None},
        "points+box": {"points": (pts, lbl), "boxes": box, "masks": None},
        "points+mask": {"points": (pts, lbl), "boxes": None, "masks": mask},
        "box+mask": {"points": None, "boxes": box, "masks": mask},
        "points+box+mask": {"points": (pts, lbl), "boxes": box, "masks": mask},
    }[layout]
    with torch.no_grad():
        return sam.prompt_encoder(**args)


LAYOUTS = ["points", "box", "points+box", "points+mask", "box+mask", "points+box+mask"]


def test_from_decoder_copies_weights_without_sharing(sam):
    decoder = sam.mask_decoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    guided = GuidedMaskDecoder.from_decoder(decoder)
    assert isinstance(guided.transformer, GuidedTwoWayTransformer)
    assert all(isinstance(layer, GuidedTwoWayAttentionBlock) for layer in guided.transformer.layers)
    assert all(isinstance(layer.cross_attn_token_to_image, GuidedAttention) for layer in guided.transformer.layers)
    assert type(guided.transformer.final_attn_token_to_image) is Attention  # never guided
    assert list(guided.state_dict()) == list(decoder.state_dict())
    theirs = decoder.state_dict()
    for name, value in guided.state_dict().items():
        assert torch.equal(value, theirs[name]), name
        assert value.data_ptr() != theirs[name].data_ptr(), f"{name} shares storage with the user's decoder"
    assert guided.training == decoder.training
    with torch.no_grad():
        for p in guided.parameters():
            p.add_(1.0)
    for name, value in decoder.state_dict().items():
        assert torch.equal(value, before[name]), f"user's decoder changed: {name}"


def test_from_decoder_rejects_other_modules():
    with pytest.raises(TypeError, match="MaskDecoder"):
        GuidedMaskDecoder.from_decoder(torch.nn.Linear(2, 2))


def test_from_decoder_reads_hyper_parameters_from_the_module():
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    decoder = MaskDecoder(
        transformer_dim=48, num_multimask_outputs=2, iou_head_depth=2, iou_head_hidden_dim=20,
        activation=torch.nn.ReLU,
        transformer=TwoWayTransformer(depth=3, embedding_dim=48, mlp_dim=40, num_heads=3, attention_downsample_rate=1),
    )
    guided = GuidedMaskDecoder.from_decoder(decoder)  # strict load: any wrong size would raise
    assert guided.transformer.depth == 3 and guided.num_mask_tokens == 3
    assert guided.transformer.layers[0].cross_attn_token_to_image.internal_dim == 48
    assert type(guided.output_upscaling[2]) is torch.nn.ReLU


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("multimask", [True, False])
def test_guidance_off_is_bit_identical_to_sam(sam, features, layout, multimask):
    guided = GuidedMaskDecoder.from_decoder(sam.mask_decoder)
    sparse, dense = _prompts(sam, layout, features)
    kwargs = {"image_embeddings": features, "image_pe": sam.prompt_encoder.get_dense_pe(),
                  "sparse_prompt_embeddings": sparse, "dense_prompt_embeddings": dense, "multimask_output": multimask}
    with torch.no_grad():
        ref_masks, ref_iou = sam.mask_decoder(**kwargs)
        masks, iou = guided(**kwargs)
        masks2, iou2 = guided(**kwargs, attn_sim=None, target_embedding=None)
    assert masks.shape == ref_masks.shape == (1, 3 if multimask else 1, *sam.prompt_encoder.mask_input_size)
    assert torch.equal(masks, ref_masks) and torch.equal(iou, ref_iou)
    assert torch.equal(masks2, ref_masks) and torch.equal(iou2, ref_iou)


def test_guided_attention_without_bias_is_sams_attention(sam):
    attn = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    rate = attn.embedding_dim // attn.internal_dim
    guided = GuidedAttention(attn.embedding_dim, attn.num_heads, downsample_rate=rate)
    guided.load_state_dict(attn.state_dict())
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(guided(q, k, k), attn(q, k, k))


# ------------------------------------------------------------------ independent, step-by-step reference computation
def _attention(mod, q, k, v, bias=None):
    """SAM attention written out by hand; ``bias`` added to the softmax *probabilities*, then softmax again."""
    heads = mod.num_heads
    q, k, v = mod.q_proj(q), mod.k_proj(k), mod.v_proj(v)
    b, nq, c = q.shape
    nk = k.shape[1]
    qh = q.reshape(b, nq, heads, c // heads).transpose(1, 2)
    kh = k.reshape(b, nk, heads, c // heads).transpose(1, 2)
    vh = v.reshape(b, nk, heads, c // heads).transpose(1, 2)
    logits = torch.einsum("bhqc,bhkc->bhqk", qh, kh) / math.sqrt(c // heads)
    probs = logits.softmax(-1)
    if bias is not None:
        probs = (probs + bias).softmax(-1)
    out = torch.einsum("bhqk,bhkc->bhqc", probs, vh).transpose(1, 2).reshape(b, nq, c)
    return mod.out_proj(out)


def _block(blk, queries, keys, query_pe, key_pe, bias):
    if blk.skip_first_layer_pe:
        queries = _attention(blk.self_attn, queries, queries, queries)
    else:
        queries = queries + _attention(blk.self_attn, queries + query_pe, queries + query_pe, queries)
    queries = blk.norm1(queries)
    queries = blk.norm2(queries + _attention(blk.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys,
                                             bias))
    queries = blk.norm3(queries + blk.mlp(queries))
    keys = blk.norm4(keys + _attention(blk.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries))
    return queries, keys


def _spec_transformer(tr, image, pe, tokens, attn_sim, t):
    """docs/design/persam_method.md §1.1c written out:

    PE = T + t; Q0 = T + t; Q_i = Q_{i-1} + t; q_final = Q + T + 2t.
    """
    img = image.flatten(2).transpose(1, 2)
    img_pe = pe.flatten(2).transpose(1, 2)
    query_pe = tokens + t
    queries, keys = tokens + t, img
    queries, keys = _block(tr.layers[0], queries, keys, query_pe, img_pe, attn_sim)
    queries, keys = _block(tr.layers[1], queries + t, keys, query_pe, img_pe, attn_sim)
    q_final = queries + tokens + 2 * t
    queries = tr.norm_final_attn(queries + _attention(tr.final_attn_token_to_image, q_final, keys + img_pe, keys))
    return queries, keys


def _published_inplace_transformer(tr, image, pe, point_embedding, attn_sim, t):
    """The published code's in-place aliasing, emulated (the numbers the spec's formulas were verified against)."""
    img = image.flatten(2).permute(0, 2, 1)
    img_pe = pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding  # the same tensor object
    keys = img
    for layer in tr.layers:
        queries += t  # in place: the first add also changes point_embedding (the query PE)
        queries, keys = _block(layer, queries, keys, point_embedding, img_pe, attn_sim)
    q = queries + point_embedding
    q += t
    queries = tr.norm_final_attn(queries + _attention(tr.final_attn_token_to_image, q, keys + img_pe, keys))
    return queries, keys


def _decoder_inputs(sam, features, layout="points"):
    sparse, dense = _prompts(sam, layout, features)
    dec = sam.mask_decoder
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)[None].expand(sparse.shape[0], -1, -1)
    tokens = torch.cat([tokens, sparse], 1)
    src = features + dense
    return src, sam.prompt_encoder.get_dense_pe(), tokens


def _guidance(sam, seed=3):
    g = torch.Generator().manual_seed(seed)
    gh, gw = sam.prompt_encoder.image_embedding_size
    attn_sim = torch.rand(1, 1, 1, gh * gw, generator=g) * 2 - 0.5
    t = torch.randn(1, 1, sam.mask_decoder.transformer_dim, generator=g) * 3
    return attn_sim, t


@pytest.mark.parametrize("layout", ["points", "points+box"])
def test_guided_transformer_matches_the_spec_step_by_step(sam, features, layout):
    guided = GuidedMaskDecoder.from_decoder(sam.mask_decoder)
    src, pe, tokens = _decoder_inputs(sam, features, layout)
    attn_sim, t = _guidance(sam)
    with torch.no_grad():
        got_q, got_k = guided.transformer(src, pe, tokens, attn_sim=attn_sim, target_embedding=t)
        want_q, want_k = _spec_transformer(sam.mask_decoder.transformer, src, pe, tokens, attn_sim, t)
        tr = sam.mask_decoder.transformer
        pub_q, pub_k = _published_inplace_transformer(tr, src, pe, tokens.clone(), attn_sim, t)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_q, pub_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, pub_k, rtol=1e-5, atol=1e-5)


def _max_diff(a, b):
    return float((a[0] - b[0]).abs().max().item())


def test_each_injection_changes_the_tokens_and_wrong_variants_are_detectable(sam, features):
    """The spec semantics differ measurably from the plausible mistakes, so the step-by-step test has teeth."""
    tr = sam.mask_decoder.transformer
    src, pe, tokens = _decoder_inputs(sam, features)
    attn_sim, t = _guidance(sam)
    with torch.no_grad():
        spec = _spec_transformer(tr, src, pe, tokens, attn_sim, t)
        plain = _spec_transformer(tr, src, pe, tokens, None, torch.zeros_like(t))
        only_bias = _spec_transformer(tr, src, pe, tokens, attn_sim, torch.zeros_like(t))
        # mistakes: PE without t (no aliasing); final query without the second t (HF); bias before the softmax
        img, img_pe = src.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2)
        q, k = _block(tr.layers[0], tokens + t, img, tokens, img_pe, attn_sim)
        q, k = _block(tr.layers[1], q + t, k, tokens, img_pe, attn_sim)
        no_alias = tr.norm_final_attn(q + _attention(tr.final_attn_token_to_image, q + tokens + t, k + img_pe, k))
    assert _max_diff(spec, plain) > 1e-3
    assert _max_diff(only_bias, plain) > 1e-4
    assert _max_diff(spec, only_bias) > 1e-3
    assert float((spec[0] - no_alias).abs().max()) > 1e-3


def test_guided_decoder_output_matches_spec_through_the_heads(sam, features):
    """Full decoder with both injections == SAM's own heads applied to the spec transformer's output."""
    guided = GuidedMaskDecoder.from_decoder(sam.mask_decoder)
    dec = sam.mask_decoder
    sparse, dense = _prompts(sam, "points", features)
    attn_sim, t = _guidance(sam)
    with torch.no_grad():
        masks, iou = guided(features, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False,
                            attn_sim=attn_sim, target_embedding=t)
        src, pe, tokens = _decoder_inputs(sam, features)
        hs, img = _spec_transformer(dec.transformer, src, pe, tokens, attn_sim, t)
        b, c, h, w = src.shape
        up = dec.output_upscaling(img.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([m(hs[:, 1 + i]) for i, m in enumerate(dec.output_hypernetworks_mlps)], 1)
        all_masks = (hyper @ up.flatten(2)).reshape(b, -1, *up.shape[-2:])
        all_iou = dec.iou_prediction_head(hs[:, 0])
    torch.testing.assert_close(masks, all_masks[:, :1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, all_iou[:, :1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(masks.numpy(), dec(features, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)[0]
                           .detach().numpy(), atol=1e-3)
