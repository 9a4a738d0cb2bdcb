"""Location prior: pure tensor functions on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.location_prior import (
    attention_prior,
    box_from_mask,
    content_grid_size,
    select_point_prompts,
    similarity_map,
    target_embedding,
    upscale_to_original,
)


def test_points_are_column_row_on_a_non_square_map():
    sim = torch.zeros(3, 5)  # H=3 rows, W=5 columns
    sim[2, 4] = 1.0  # max at row 2, col 4
    sim[0, 1] = -1.0  # min at row 0, col 1
    points, labels = select_point_prompts(sim, topk=1)
    assert points.tolist() == [[4, 2], [1, 0]]  # (x, y) = (col, row)
    assert labels.tolist() == [1, 0]
    assert points.dtype == labels.dtype == torch.int64


def test_points_on_a_tall_map_and_topk_order():
    sim = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)  # W=2: max at (row 6, col 1)
    points, labels = select_point_prompts(sim, topk=2)
    assert points.tolist() == [[1, 6], [0, 6], [0, 0], [1, 0]]
    assert labels.tolist() == [1, 1, 0, 0]
    pos_only, pos_labels = select_point_prompts(sim, topk=1, negative=False)
    assert pos_only.tolist() == [[1, 6]] and pos_labels.tolist() == [1]


def test_single_point_ties_go_to_the_first_pixel_row_major():
    sim = torch.zeros(4, 6)
    sim[1, 5] = sim[3, 0] = 2.0  # two maxima: (row 1, col 5) comes first
    sim[2, 2] = sim[0, 4] = -2.0  # two minima: (row 0, col 4) comes first
    points, _ = select_point_prompts(sim, topk=1)
    assert points.tolist() == [[5, 1], [4, 0]]


@pytest.mark.parametrize("bad", [0, 16])
def test_points_reject_bad_topk(bad):
    with pytest.raises(ValueError, match="topk"):
        select_point_prompts(torch.zeros(3, 5), topk=bad)


def test_similarity_map_is_cosine_and_peaks_on_planted_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 3, 5, generator=g)
    target = torch.randn(8, generator=g)
    feats[:, 1, 3] = target * 7.0  # same direction, other length
    sim = similarity_map(target, feats)
    assert sim.shape == (3, 5)
    want = F.cosine_similarity(feats.reshape(8, -1), target[:, None], dim=0).reshape(3, 5)
    torch.testing.assert_close(sim, want, rtol=1e-5, atol=1e-6)
    assert divmod(int(sim.argmax()), 5) == (1, 3)
    assert float(sim.max()) == pytest.approx(1.0, abs=1e-6)


def test_target_embedding_pooling():
    feats = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # C=2, h=2, w=3
    cells = torch.tensor([[True, False, False], [False, False, True]])
    mean = target_embedding(feats, cells)
    assert mean.tolist() == [(0 + 5) / 2, (6 + 11) / 2]
    max_mean = target_embedding(feats, cells, pooling="max_mean")
    assert max_mean.tolist() == [(5 + 2.5) / 2, (11 + 8.5) / 2]
    with pytest.raises(ValueError, match="selects no cell"):
        target_embedding(feats, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        target_embedding(feats, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="pooling"):
        target_embedding(feats, cells, pooling="max")


@pytest.mark.parametrize("original", [(96, 128), (128, 40), (64, 64), (7, 300)])
def test_upscale_matches_sams_postprocess_geometry(original):
    sam = tiny.tiny_sam()
    from segment_anything.utils.transforms import ResizeLongestSide

    frame = sam.image_encoder.img_size
    input_size = ResizeLongestSide.get_preprocess_shape(*original, frame)
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(*sam.prompt_encoder.image_embedding_size, generator=g)
    got = upscale_to_original(grid, sam.prompt_encoder.mask_input_size, frame, input_size, original)
    x4 = F.interpolate(grid[None, None], scale_factor=4, mode="bilinear", align_corners=False)  # published x4 step
    want = sam.postprocess_masks(x4, input_size, original)[0, 0]
    assert got.shape == original
    assert torch.equal(got, want)


def _published_attn_sim(sim: torch.Tensor, grid: int) -> torch.Tensor:
    """docs/design/persam_method.md §3: z-score at full resolution, bilinear to the whole grid, sigmoid, flatten."""
    z = (sim - sim.mean()) / torch.std(sim)
    z = F.interpolate(z[None, None], size=(grid, grid), mode="bilinear")
    return torch.sigmoid(z).reshape(1, 1, 1, grid * grid)


@pytest.mark.parametrize("size,grid,frame", [(96, 4, 64), (1282, 64, 1024), (300, 16, 256)])
def test_attention_prior_equals_published_on_square_images(size, grid, frame):
    g = torch.Generator().manual_seed(size)
    sim = F.interpolate(torch.rand(1, 1, 9, 9, generator=g), size=(size, size), mode="bilinear")[0, 0] * 2 - 1
    got = attention_prior(sim, (grid, grid), frame, (frame, frame))
    want = _published_attn_sim(sim, grid)
    assert got.shape == (1, 1, 1, grid * grid)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_attention_prior_fills_only_content_cells_on_non_square_images():
    # a 1000 x 400 photo in a 1024 frame -> resized 1024 x 410 -> content 64 x ceil(64*410/1024) = 64 x 26 cells
    sim = torch.linspace(-1, 1, 1000 * 400).reshape(1000, 400)
    assert content_grid_size((64, 64), 1024, (1024, 410)) == (64, 26)
    prior = attention_prior(sim, (64, 64), 1024, (1024, 410)).reshape(64, 64)
    assert torch.all(prior[:, 26:] == 0)
    assert torch.all(prior[:, :26] > 0) and torch.all(prior[:, :26] < 1)
    # rows increase down the image in the map, so the prior increases down the content grid
    assert torch.all(prior[1:, 0] > prior[:-1, 0])
    # wide image: padding rows at the bottom
    wide = attention_prior(sim.T.contiguous(), (4, 4), 64, (26, 64)).reshape(4, 4)
    assert content_grid_size((4, 4), 64, (26, 64)) == (math.ceil(4 * 26 / 64), 4) == (2, 4)
    assert torch.all(wide[2:] == 0) and torch.all(wide[:2] > 0)


def test_attention_prior_on_a_constant_or_one_pixel_map_is_finite():
    prior = attention_prior(torch.full((10, 10), 0.3), (4, 4), 64, (64, 64))
    assert torch.isfinite(prior).all()
    assert torch.allclose(prior, torch.full_like(prior, 0.5))
    one = attention_prior(torch.full((1, 1), 0.3), (4, 4), 64, (64, 64))
    assert torch.allclose(one, torch.full_like(one, 0.5))


def test_box_from_mask_is_inclusive_column_row():
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[2:5, 3:8] = True  # rows 2..4, cols 3..7
    assert box_from_mask(mask).tolist() == [3, 2, 7, 4]
    assert box_from_mask(torch.zeros(6, 9, dtype=torch.bool)) is None
    single = torch.zeros(6, 9, dtype=torch.bool)
    single[5, 0] = True
    assert box_from_mask(single).tolist() == [0, 5, 0, 5]
