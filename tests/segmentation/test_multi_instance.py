"""Several instances: the suppress-and-repeat search on planted copies, its stopping rules, and the default path.

Random tiny-SAM weights give masks with no relation to the image, so the search logic is tested with the real
PerSAM/PerSAM-F classes whose cascade is replaced by a controlled one (the mask is the high-similarity blob around the
positive point), on hand-built embeddings where two places have exactly the target's feature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persam_dreambooth import PerSAM, PerSAMF, Segmentation
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.multi_instance import (
    DEFAULT_OVERLAP_IOU,
    DEFAULT_SIMILARITY_THRESHOLD,
    find_instances,
    union_mask,
)
from persam_dreambooth.segmentation.predictor import ImageEmbedding
from persam_dreambooth.utils.mask_geometry import mask_iou

C, GRID, SIZE = 32, 4, 64  # the tiny SAM: 32 channels, 4x4 grid, 64-px frame (16 px per cell)
TARGET = torch.zeros(C)
TARGET[0] = 1.0


def planted(copies, seed=0, size=(SIZE, SIZE)):
    """An embedding whose cells ``copies`` hold exactly (a multiple of) the target feature; others are unrelated."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(C, GRID, GRID, generator=g)
    features[0] = 0.2 * features[0]  # background: low cosine with the target
    for row, col in copies:
        features[:, row, col] = 4.0 * TARGET
    return ImageEmbedding(features, size, size)


def blob_segmentation(similarity: torch.Tensor, level: float = 0.5) -> Segmentation:
    """A controlled 'cascade': the 4-connected region of ``similarity > level`` around the arg-max pixel."""
    sim = similarity.cpu().numpy()
    y, x = np.unravel_index(int(np.argmax(sim)), sim.shape)
    above = sim > level
    mask = np.zeros_like(above)
    if above[y, x]:
        stack = [(y, x)]
        mask[y, x] = True
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < sim.shape[0] and 0 <= cc < sim.shape[1] and above[rr, cc] and not mask[rr, cc]:
                    mask[rr, cc] = True
                    stack.append((rr, cc))
    return Segmentation(mask=mask, score=1.0, points_xy=np.array([[x, y]]), point_labels=np.array([1]),
                        similarity=sim.copy(), stage_logits=np.zeros((3, 16, 16), np.float32),
                        stage_scores=np.ones(3, np.float32))


def controlled(cls):
    """The real class, with its cascade replaced by :func:`blob_segmentation` (records every call)."""

    class Controlled(cls):
        calls: list[int]

        def _cascade_batch(self, embeddings, similarities=None):
            self.calls.append(len(embeddings))
            sims = similarities or [None] * len(embeddings)
            return [blob_segmentation(self.similarity(e) if s is None else s)
                    for e, s in zip(embeddings, sims, strict=True)]

    return Controlled


def reference_mask():
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[16:32, 16:48] = True  # cells (1, 1) and (1, 2)
    return mask


@pytest.mark.parametrize("cls", [PerSAM, PerSAMF])
def test_finds_two_planted_copies_and_stops(sam, cls):
    model = controlled(cls)(sam) if cls is PerSAM else controlled(cls)(sam, steps=5)
    model.calls = []
    model.set_reference_embedding(planted([(1, 1), (1, 2)]), reference_mask())
    emb = planted([(0, 0), (3, 2)], seed=1)
    found = model.segment_embedding(emb, max_instances=5)
    assert isinstance(found, list) and len(found) == 2
    # the positive points are in the planted cells, first the one found first in row-major order
    cells = [(int(s.points_xy[0][1]) // 16, int(s.points_xy[0][0]) // 16) for s in found]
    assert cells == [(0, 0), (3, 2)]
    assert found[0].similarity.max() == pytest.approx(1.0, abs=1e-5)
    assert mask_iou(found[0].mask, found[1].mask) == 0.0
    # the second search ran on the suppressed map: the first mask is at the map's minimum there
    assert np.all(found[1].similarity[found[0].mask] == found[0].similarity.min())
    # the third candidate (the copies' halo) was below the threshold: no third cascade ran
    assert model.calls == [1, 1]
    halo = found[1].similarity.copy()
    halo[found[1].mask] = halo.min()
    assert halo.max() < DEFAULT_SIMILARITY_THRESHOLD


def test_threshold_and_max_instances_bound_the_search(sam):
    model = controlled(PerSAM)(sam)
    model.calls = []
    model.set_reference_embedding(planted([(1, 1), (1, 2)]), reference_mask())
    emb = planted([(0, 0), (3, 2), (2, 0)], seed=2)
    assert len(model.segment_embedding(emb, max_instances=2)) == 2 and model.calls == [1, 1]
    assert len(model.segment_embedding(emb, max_instances=10)) == 3
    # a threshold above every cosine: only the (unconditional) first instance
    assert len(model.segment_embedding(emb, max_instances=10, similarity_threshold=1.01)) == 1
    # a threshold below every cosine: the halo becomes a candidate; the search still ends (each round suppresses)
    model.calls = []
    many = model.segment_embedding(emb, max_instances=50, similarity_threshold=-1.0)
    assert 3 <= len(many) <= 50 and len(model.calls) <= 50
    assert union_mask(many).sum() == sum(int(s.mask.sum()) for s in many)  # disjoint masks


def test_duplicates_are_dropped_and_stop_the_search():
    emb = planted([(0, 0), (3, 2)], seed=1)
    sim_map = torch.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE)
    first = np.zeros((SIZE, SIZE), dtype=bool)
    first[40:, 40:] = True
    masks = {"calls": 0}

    def cascade(embeddings, similarities, second=None):
        masks["calls"] += 1
        mask = first if masks["calls"] == 1 else second
        return [Segmentation(mask=mask.copy(), score=1.0, points_xy=np.zeros((1, 2), np.int64),
                             point_labels=np.ones(1, np.int64), similarity=similarities[0].numpy(),
                             stage_logits=np.zeros((3, 16, 16), np.float32), stage_scores=np.ones(3, np.float32))]

    def run(second, overlap_iou=DEFAULT_OVERLAP_IOU):
        masks["calls"] = 0
        return find_instances(lambda e, s: cascade(e, s, second), lambda e: sim_map.clone(), [emb], 4,
                              similarity_threshold=0.0, overlap_iou=overlap_iou)[0]

    near_copy = first.copy()
    near_copy[38:40, 40:] = True  # IoU 576/624 = 0.92 with the first
    assert len(run(near_copy)) == 1 and masks["calls"] == 2  # rejected, and the search stopped
    inside = np.zeros_like(first)
    inside[50:54, 50:54] = True  # no pixel outside the first: a duplicate whatever its IoU
    assert len(run(inside)) == 1
    half = np.zeros_like(first)
    half[40:, 32:56] = True  # IoU with the first = 384 / 768 = 0.5
    assert mask_iou(half, first) == pytest.approx(0.5)
    assert len(run(half, overlap_iou=0.8)) == 2 and masks["calls"] == 3  # accepted; then nothing new: stop
    assert len(run(half, overlap_iou=0.4)) == 1  # rejected at a stricter threshold
    assert len(run(np.zeros_like(first))) == 1  # an empty candidate stops the search


def test_default_path_and_one_instance_are_the_single_result(sam):
    """No max_instances: one Segmentation, bit-identical to the cascade; max_instances=1: a list of that result."""
    image, mask = tiny.synthetic_subject()
    target_image = tiny.synthetic_subject(80, 120, box_yx=(20, 50, 60, 100), seed=3)[0]
    for cls in (PerSAM, PerSAMF):
        model = cls(sam) if cls is PerSAM else cls(sam, steps=20)
        model.set_reference(image, mask)
        single = model.segment(target_image)
        assert isinstance(single, Segmentation)
        for k in (1, 3):
            found = model.segment(target_image, max_instances=k)
            assert isinstance(found, list) and 1 <= len(found) <= k
            first = found[0]
            assert np.array_equal(first.stage_logits, single.stage_logits)
            assert np.array_equal(first.mask, single.mask) and np.array_equal(first.points_xy, single.points_xy)
            assert np.array_equal(first.similarity, single.similarity) and first.score == single.score
            for i, later in enumerate(found[1:], start=1):  # later instances start outside the earlier masks
                x, y = later.points_xy[0]
                assert not union_mask(found[:i])[y, x]
                assert all(mask_iou(later.mask, prev.mask) <= DEFAULT_OVERLAP_IOU for prev in found[:i])


def test_argument_checks_and_union(sam):
    model = PerSAM(sam)
    model.set_reference_embedding(planted([(1, 1), (1, 2)]), reference_mask())
    emb = planted([(0, 0)])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`max_instances`"):
            model.segment_embedding(emb, max_instances=bad)
    with pytest.raises(ValueError, match="`overlap_iou`"):
        model.segment_embedding(emb, max_instances=2, overlap_iou=1.5)
    with pytest.raises(ValueError, match="`similarity_threshold`"):
        model.segment_embedding(emb, max_instances=2, similarity_threshold=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        union_mask([])
    one = model.segment_embedding(emb)
    assert np.array_equal(union_mask(one), one.mask) and union_mask(one) is not one.mask
