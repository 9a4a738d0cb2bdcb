"""Batched encoding (fp32 / autocast), background loading and batched decoding in ``segment_images``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from persam_dreambooth import PerSAM
from persam_dreambooth import testing as tiny
from persam_dreambooth.albums.batch_encoder import BatchEncoder, check_encoder_dtype
from persam_dreambooth.albums.embedding_cache import EmbeddingCache, EncoderIdentity, state_dict_sha256
from persam_dreambooth.albums.segment_photos import AlbumOptions, segment_images


@pytest.fixture
def album(tmp_path):
    folder = tmp_path / "photos"
    tiny.write_instance_dir(folder, n=5)
    return sorted(folder.iterdir())


def same_result(a, b):
    assert np.array_equal(a.mask, b.mask)
    assert a.score == b.score
    assert np.array_equal(a.points_xy, b.points_xy)
    assert np.array_equal(a.similarity, b.similarity)
    assert np.array_equal(a.stage_logits, b.stage_logits)


def test_batch_of_one_fp32_is_bit_identical_to_segment(persam, album):
    encoder = BatchEncoder(persam.predictor)
    got = []
    for batch in encoder.iter_batches(album, batch_size=1, prefetch=2):
        got.append(persam.segment_embedding(encoder.encode(batch)[0]))
    assert encoder.encoder_calls == len(album)
    for path, result in zip(album, got, strict=True):
        same_result(persam.segment(path), result)


def test_batched_fp32_matches_single_within_tolerance(persam, album):
    single = [persam.encode(p) for p in album]
    encoder = BatchEncoder(persam.predictor)
    batched = [e for b in encoder.iter_batches(album, batch_size=3) for e in encoder.encode(b)]
    assert encoder.encoder_calls == 2  # 3 + 2 photos
    same_points = 0
    for a, b in zip(single, batched, strict=True):
        assert b.features.dtype == torch.float32 and a.original_size == b.original_size
        torch.testing.assert_close(b.features, a.features, rtol=1e-5, atol=1e-5)
        ra, rb = persam.segment_embedding(a), persam.segment_embedding(b)
        np.testing.assert_allclose(rb.similarity, ra.similarity, rtol=0, atol=1e-5)
        # The tiny SAM's 4x4 grid makes the upscaled similarity map flat in places, so float rounding may move the
        # arg-max/arg-min to another pixel of (nearly) the same value: compare the values, then the cascades.
        for (xa, ya), (xb, yb) in zip(ra.points_xy, rb.points_xy, strict=True):
            assert abs(ra.similarity[ya, xa] - ra.similarity[yb, xb]) < 1e-5
        if np.array_equal(ra.points_xy, rb.points_xy):
            same_points += 1
            np.testing.assert_allclose(rb.stage_logits, ra.stage_logits, rtol=1e-4, atol=1e-4)
        assert (ra.mask != rb.mask).mean() < 0.02
    assert same_points >= 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_encoder_returns_float32_close_to_fp32(persam, album, dtype):
    exact = BatchEncoder(persam.predictor).encode_images(album[:2])
    low = BatchEncoder(persam.predictor, dtype).encode_images(album[:2])
    for a, b in zip(exact, low, strict=True):
        assert b.features.dtype == torch.float32
        assert not torch.equal(a.features, b.features), "autocast had no effect"
        torch.testing.assert_close(b.features, a.features, rtol=0.1, atol=0.1)
    assert all(p.dtype == torch.float32 for p in persam.sam.parameters()), "the model itself was cast"


def test_dtype_names_are_checked():
    assert check_encoder_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match=r"`--dtype` must be one of \['float32', 'bfloat16', 'float16'\], got 'fp8'"):
        check_encoder_dtype("fp8", "--dtype")


def test_prefetch_keeps_order_and_batches(persam, album):
    encoder = BatchEncoder(persam.predictor)
    threaded = list(encoder.iter_batches(album, batch_size=2, prefetch=3))
    inline = list(encoder.iter_batches(album, batch_size=2, prefetch=0))
    assert [[i.index for i in b] for b in threaded] == [[0, 1], [2, 3], [4]]
    for a, b in zip(threaded, inline, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.source == y.source and np.array_equal(x.pixels, y.pixels)
            assert torch.equal(x.prepared, y.prepared)
    with pytest.raises(ValueError, match="batch_size"):
        list(encoder.iter_batches(album, batch_size=0))


def test_loader_error_reaches_the_caller(persam, album, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 nope")
    encoder = BatchEncoder(persam.predictor)
    with pytest.raises(ValueError, match="not a readable image"):
        list(encoder.iter_batches([album[0], bad], batch_size=1))


class CountingBatchedPerSAM(PerSAM):
    """PerSAM with a ``segment_embeddings`` entry point that records its calls (to test the dispatch only)."""

    calls: list[int]

    def segment_embeddings(self, embeddings, **kwargs):
        self.calls.append(len(embeddings))
        return [self.segment_embedding(e, **kwargs) for e in embeddings]


def test_segment_images_batches_decoding_and_matches_one_at_a_time(tiny_sam_model, album, tmp_path):
    ref = tiny.synthetic_subject()
    one = PerSAM(tiny_sam_model)
    one.set_reference(*ref)
    many = CountingBatchedPerSAM(tiny_sam_model)
    many.calls = []
    many.set_reference(*ref)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows_one = segment_images(one, album, tmp_path / "a", progress=False)
    rows_many = segment_images(many, album, tmp_path / "b", options=AlbumOptions(batch_size=2, progress=False))
    assert many.calls == [2, 2]  # the last batch of one photo is decoded on its own
    for a, b in zip(rows_one, rows_many, strict=True):
        assert a["stem"] == b["stem"] and a["points_xy"][0] == b["points_xy"][0]  # positive point
        if a["points_xy"] == b["points_xy"]:  # else a near-tie moved the negative point (see the test above)
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        m_a = np.asarray(Image.open(tmp_path / "a" / f"{a['stem']}.png")) > 0
        m_b = np.asarray(Image.open(tmp_path / "b" / f"{b['stem']}.png")) > 0
        assert (m_a != m_b).mean() < 0.02
    lines = (tmp_path / "b" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["stem"] for x in lines] == [p.stem for p in album]


def test_segment_images_with_cache_is_bit_identical(tiny_sam_model, persam, album, tmp_path):
    ident = EncoderIdentity(model_type="tiny", weights_sha256=state_dict_sha256(tiny_sam_model), img_size=64,
                            encoder_dtype="float32")
    rows = {}
    for name in ("cold", "warm"):
        (tmp_path / name).mkdir()
        encoder = BatchEncoder(persam.predictor, cache=EmbeddingCache(tmp_path / "cache", ident))
        rows[name] = segment_images(persam, album, tmp_path / name, encoder=encoder,
                                    options=AlbumOptions(progress=False))
        assert encoder.encoder_calls == (len(album) if name == "cold" else 0)
    assert [r["cached"] for r in rows["cold"]] == [False] * 5 and [r["cached"] for r in rows["warm"]] == [True] * 5
    for a, b in zip(rows["cold"], rows["warm"], strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "cached")} == \
            {k: v for k, v in b.items() if k not in ("seconds", "cached")}
        assert (tmp_path / "cold" / f"{a['stem']}.png").read_bytes() == (tmp_path / "warm" / f"{a['stem']}.png"
                                                                         ).read_bytes()


def test_album_options_validation():
    with pytest.raises(ValueError, match="batch_size"):
        AlbumOptions(batch_size=0)
    with pytest.raises(ValueError, match="max_instances"):
        AlbumOptions(max_instances=0)
    with pytest.raises(ValueError, match="only with `max_instances`"):
        AlbumOptions(overlap_iou=0.5)
    assert AlbumOptions().instance_kwargs() == {}
    assert AlbumOptions(max_instances=3, overlap_iou=0.5).instance_kwargs() == {"max_instances": 3,
                                                                                "overlap_iou": 0.5}
