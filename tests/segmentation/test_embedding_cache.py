"""The on-disk embedding cache: keys, hits and misses (counted encoder calls), corruption, concurrent writers."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from persam_dreambooth import PerSAM
from persam_dreambooth import testing as tiny
from persam_dreambooth.albums import embedding_cache as ec
from persam_dreambooth.albums.batch_encoder import BatchEncoder
from persam_dreambooth.albums.embedding_cache import (
    EmbeddingCache,
    EncoderIdentity,
    checkpoint_sha256,
    pixels_sha256,
    state_dict_sha256,
    weights_sha256,
)
from persam_dreambooth.segmentation.predictor import ImageEmbedding


def identity(sam, dtype="float32", model_type="tiny"):
    return EncoderIdentity(model_type=model_type, weights_sha256=state_dict_sha256(sam),
                           img_size=int(sam.image_encoder.img_size), encoder_dtype=dtype)


class EncoderCalls:
    """Counts forward calls of a SAM's image encoder (a forward hook on the real module)."""

    def __init__(self, sam):
        self.count = 0
        self.handle = sam.image_encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.count += 1

    def close(self):
        self.handle.remove()


@pytest.fixture
def photos():
    return [tiny.synthetic_subject(48, 64, box_yx=(8 + i, 10 + 2 * i, 40, 50), seed=i)[0] for i in range(3)]


def test_pixels_digest_depends_on_pixels_and_shape():
    image = np.zeros((4, 6, 3), np.uint8)
    assert pixels_sha256(image) == pixels_sha256(image.copy())
    assert pixels_sha256(image) != pixels_sha256(np.zeros((6, 4, 3), np.uint8))  # same bytes, other shape
    other = image.copy()
    other[0, 0, 0] = 1
    assert pixels_sha256(image) != pixels_sha256(other)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        pixels_sha256(np.zeros((4, 6), np.uint8))


def test_second_run_skips_the_encoder_and_gives_identical_embeddings(tmp_path, tiny_sam_model, photos):
    cache = EmbeddingCache(tmp_path / "cache", identity(tiny_sam_model))
    persam = PerSAM(tiny_sam_model)
    calls = EncoderCalls(tiny_sam_model)
    try:
        first = BatchEncoder(persam.predictor, cache=cache).encode_images(photos)
        assert calls.count == 1 and (cache.misses, cache.hits, cache.writes) == (3, 0, 3)
        again = BatchEncoder(persam.predictor, cache=cache)
        second = [again.encode(batch)[0] for batch in again.iter_batches(photos, batch_size=1)]
        assert calls.count == 1, "the encoder ran on cached photos"
        assert again.encoder_calls == 0 and cache.hits == 3
    finally:
        calls.close()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.features.cpu(), b.features) and b.features.dtype == torch.float32
        assert (a.original_size, a.input_size) == (b.original_size, b.input_size)
    assert (cache.folder / "model.json").is_file()


def test_key_changes_with_model_weights_dtype_and_size(tmp_path, tiny_sam_model):
    base = identity(tiny_sam_model)
    digest = pixels_sha256(np.zeros((8, 8, 3), np.uint8))
    path = EmbeddingCache(tmp_path, base).path(digest)
    variants = [
        replace(base, model_type="vit_b"),
        replace(base, weights_sha256=state_dict_sha256(tiny.tiny_sam(seed=1))),
        replace(base, encoder_dtype="bfloat16"),
        replace(base, img_size=128),
    ]
    paths = {EmbeddingCache(tmp_path, v).path(digest) for v in variants}
    assert path not in paths and len(paths) == len(variants)
    assert EmbeddingCache(tmp_path, replace(base)).path(digest) == path  # same identity, same file


def test_weights_identity(tmp_path, tiny_sam_model, monkeypatch):
    assert state_dict_sha256(tiny_sam_model) == state_dict_sha256(tiny.tiny_sam())  # same seed, same weights
    assert state_dict_sha256(tiny_sam_model) != state_dict_sha256(tiny.tiny_sam(seed=1))
    assert weights_sha256(official_type="vit_h") == ec.SAM_BUILDERS["vit_h"].checksum  # verified by load_sam
    with pytest.raises(ValueError, match="no published checkpoint"):
        weights_sha256(official_type="tiny" if "tiny" in ec.SAM_BUILDERS else "nope")

    ckpt = tmp_path / "w.pth"
    torch.save(tiny_sam_model.state_dict(), ckpt)
    hashed = []
    real = ec.file_sha256
    monkeypatch.setattr(ec, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = checkpoint_sha256(ckpt)
    assert first == real(ckpt) and len(hashed) == 1
    assert weights_sha256(checkpoint=ckpt) == first and len(hashed) == 1, "re-hashed an unchanged checkpoint"
    torch.save(tiny.tiny_sam(seed=1).state_dict(), ckpt)  # new content (size/mtime change)
    assert checkpoint_sha256(ckpt) != first and len(hashed) == 2


def _stored(tmp_path, sam, image):
    cache = EmbeddingCache(tmp_path / "cache", identity(sam))
    encoder = BatchEncoder(PerSAM(sam).predictor, cache=cache)
    embedding = encoder.encode_images([image])[0]
    return cache, encoder, pixels_sha256(image), embedding


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_data_byte", "empty"])
def test_damaged_entry_is_discarded_logged_and_recomputed(tmp_path, tiny_sam_model, photos, caplog, damage):
    cache, encoder, digest, embedding = _stored(tmp_path, tiny_sam_model, photos[0])
    path = cache.path(digest)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "flip_data_byte":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])  # tensor bytes, header intact
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="persam_dreambooth.albums.embedding_cache"):
        assert cache.get(digest) is None
    assert "discarding unreadable entry" in caplog.text and cache.discarded == 1
    assert not path.exists()
    calls_before = encoder.encoder_calls
    again = encoder.encode_images([photos[0]])[0]  # recomputed and stored again
    assert encoder.encoder_calls == calls_before + 1 and path.is_file()
    assert torch.equal(again.features, embedding.features)
    assert torch.equal(cache.get(digest).features, embedding.features.cpu())


def test_entry_of_another_image_or_model_is_not_used(tmp_path, tiny_sam_model, photos):
    cache, _, digest, _ = _stored(tmp_path, tiny_sam_model, photos[0])
    other = pixels_sha256(photos[1])
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(other).write_bytes(cache.path(digest).read_bytes())  # a file copied under the wrong key
    assert cache.get(other) is None and cache.discarded == 1


def test_concurrent_writers_of_one_key(tmp_path, tiny_sam_model, photos):
    cache = EmbeddingCache(tmp_path / "cache", identity(tiny_sam_model))
    digest = pixels_sha256(photos[0])
    features = torch.randn(32, 4, 4)
    embedding = ImageEmbedding(features, (48, 64), (48, 64))
    seen, errors = [], []

    def writer():
        for _ in range(15):
            assert cache.put(digest, embedding)

    def reader():
        for _ in range(40):
            try:
                got = cache.get(digest)
                if got is not None:
                    seen.append(torch.equal(got.features, features))
            except Exception as exc:  # noqa: BLE001 - any exception is a failure of the test
                errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(seen)
    assert cache.discarded == 0, "a reader saw a half-written file"
    assert torch.equal(cache.get(digest).features, features)
    leftovers = [p.name for p in cache.path(digest).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_unwritable_cache_warns_and_continues(tmp_path, tiny_sam_model, photos, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = EmbeddingCache(blocker / "cache", identity(tiny_sam_model))  # parent is a file: cannot create
    encoder = BatchEncoder(PerSAM(tiny_sam_model).predictor, cache=cache)
    with caplog.at_level(logging.WARNING):
        embedding = encoder.encode_images([photos[0]])[0]
    assert embedding.features.shape == (32, 4, 4) and "could not write" in caplog.text and cache.writes == 0


def test_encoder_refuses_a_cache_of_another_dtype(tmp_path, tiny_sam_model):
    cache = EmbeddingCache(tmp_path, identity(tiny_sam_model, dtype="bfloat16"))
    with pytest.raises(ValueError, match="encoder dtype 'bfloat16'"):
        BatchEncoder(PerSAM(tiny_sam_model).predictor, "float32", cache)
