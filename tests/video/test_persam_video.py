"""PerSAMVideo against an independent re-statement of the published per-frame algorithm (with fixes A-C)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import synthetic_video
from PIL import Image
from reference_impl import reference_track

from persam_dreambooth import PerSAMVideo
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation.persam_video import (
    VIDEO_CELL_THRESHOLD,
    ObjectPasses,
    compose_labels,
    expanded_box,
    video_reference_cells,
)
from persam_dreambooth.segmentation.reference_mask import SmallReferenceWarning

STEPS = 60  # PerSAM-F fit steps in the tests (the method's default is 800; the loop is the same)


@pytest.fixture(scope="module")
def sam():
    return tiny.tiny_sam()


@pytest.fixture(scope="module")
def video():
    return synthetic_video(num_frames=6, tiny_object=True)


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_same_label_maps_as_the_published_algorithm_on_every_frame(sam, video, method):
    frames, labels = video
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallReferenceWarning)
        tracked = list(PerSAMVideo(sam, method, steps=STEPS).iter_track(frames, labels[0]))
        choices: list = []
        reference = reference_track(sam, frames, labels[0], method, steps=STEPS, choices=choices)
    ours = [f.labels for f in tracked]
    assert len(ours) == len(frames)
    # the same output chosen by each decoder pass, frame by frame and object by object (localises a difference)
    assert [[o.choices for o in f.objects] for f in tracked[1:]] == choices
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a.shape == labels[0].shape and a.dtype == labels[0].dtype
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")
    # the run is not trivial: several objects get pixels on later frames
    assert len(set(np.unique(np.concatenate([x.ravel() for x in ours[1:]]))) - {0}) >= 2


def test_frame_zero_is_a_copy_and_the_tiny_object_uses_the_coverage_fallback(sam, video):
    frames, labels = video
    tracker = PerSAMVideo(sam)
    with pytest.warns(SmallReferenceWarning, match="object 3"):
        stream = tracker.iter_track(iter(frames[:2]), labels[0])
        first = next(stream)
    np.testing.assert_array_equal(first.labels, labels[0])
    assert first.labels is not labels[0]
    assert [o.label for o in first.objects] == [1, 2, 3]
    rest = list(stream)
    assert [f.index for f in rest] == [1]
    assert all(o.points_xy.shape == (3, 2) for o in rest[0].objects)  # top-2 points + the box centre


def test_inputs_as_paths_pil_and_arrays_give_the_same_result(sam, video, tmp_path):
    frames, labels = video
    paths = []
    for i, f in enumerate(frames[:3]):
        Image.fromarray(f).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallReferenceWarning)
        a = PerSAMVideo(sam).track(frames[:3], labels[0])
        b = PerSAMVideo(sam).track(paths, labels[0])
        c = PerSAMVideo(sam).track((Image.fromarray(f) for f in frames[:3]), labels[0])
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_video_cells_threshold_and_coverage_fallback():
    mask = np.zeros((64, 64), bool)
    mask[0:16, 0:16] = True  # exactly one 16-px cell of a 64-px frame with a 4x4 grid
    cells, fallback = video_reference_cells(mask, 64, (4, 4))
    assert not fallback and cells.sum() == 1 and cells[0, 0]
    assert VIDEO_CELL_THRESHOLD == pytest.approx(123.675 / 215)
    tiny_mask = np.zeros((64, 64), bool)
    tiny_mask[20:23, 40:42] = True  # 6 pixels in cell (1, 2), away from its centre: zero bilinear samples
    with pytest.warns(SmallReferenceWarning):
        cells, fallback = video_reference_cells(tiny_mask, 64, (4, 4))
    assert fallback and cells.sum() == 1 and cells[1, 2]


def test_expanded_box_clips_like_the_published_code():
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[12:20, 30:45] = True  # rows 12..19, cols 30..44
    assert expanded_box(mask, 10) == (20, 2, 50, 29)  # far side clipped to W (50), not W - 1
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[10:12, 10:12] = True
    assert expanded_box(mask, 10) == (0, 0, 21, 21)  # 10 - 10 = 0 -> 0 (the "<= 0" rule)


def test_composition_background_wins_ties_go_to_the_lower_label():
    a = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 0.5, 3.0]])
    out = compose_labels([a, b], [4, 7], np.uint8)
    np.testing.assert_array_equal(out, [[4, 0, 7, 7]])
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randint(-2, 3, (30, 40), generator=gen).float() for _ in range(3)]  # many exact ties
    stacked = torch.stack([torch.zeros(30, 40), *maps]).argmax(dim=0).numpy()  # the published arg-max
    np.testing.assert_array_equal(compose_labels(maps, [1, 2, 3], np.int64), stacked)


def _silent_sam():
    """The tiny SAM whose mask decoder outputs all-zero logits: every mask is empty (Decision 6 paths)."""
    sam = copy.deepcopy(tiny.tiny_sam())
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    return sam


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_empty_masks_never_raise_and_lost_objects_keep_their_last_box(video, method):
    frames, labels = video
    tracker = PerSAMVideo(_silent_sam(), method, steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallReferenceWarning)
        out = list(tracker.iter_track(frames[:4], labels[0]))
    for frame in out[1:]:
        assert not frame.labels.any()  # every object vanished (zero logits are background)
        assert all(o.events for o in frame.objects)  # the fallback was recorded
        # Fix B: the box prompt still comes from the frame-0 mask of each object
        for obj in frame.objects:
            expected = expanded_box(torch.from_numpy(labels[0] == obj.label), 10)
            assert obj.prompt_box == expected


def test_fix_b_a_vanished_object_keeps_its_slot_and_others_keep_theirs(sam, video):
    frames, labels = video

    class Scripted(PerSAMVideo):
        """Object 1 gets no pixels on frame 1; object 2 gets a fixed square."""

        def _object_logits(self, embedding, obj):
            h, w = embedding.original_size
            logits = torch.full((h, w), -1.0)
            if obj.label == 2:
                logits[5:15, 5:15] = 1.0
            return ObjectPasses(logits, 0.5, np.zeros((0, 2), np.int64), expanded_box(obj.slot, self.box_margin), (),
                                (0, 0, 0))

    tracker = Scripted(sam)
    two = (labels[0] == 1).astype(np.uint8) + 2 * (labels[0] == 2)
    objects = tracker.init_objects(tracker.predictor.encode(frames[0]), two)
    slot1 = objects[0].slot.clone()
    result, _ = tracker.step(tracker.predictor.encode(frames[1]), objects, np.uint8)
    assert not (result == 1).any()
    assert torch.equal(objects[0].slot, slot1)  # object 1 keeps its frame-0 mask (published: dropped/shifted)
    assert objects[1].slot.sum() == 100 and objects[1].slot[5:15, 5:15].all()


@pytest.mark.filterwarnings("ignore::persam_dreambooth.segmentation.reference_mask.SmallReferenceWarning")
def test_bad_inputs_name_the_argument(sam, video):
    frames, labels = video
    tracker = PerSAMVideo(sam)
    with pytest.raises(ValueError, match="`first_labels` is empty"):
        tracker.track(frames, np.zeros_like(labels[0]))
    with pytest.raises(ValueError, match="`first_labels` has size"):
        tracker.track(frames, labels[0][:-1])
    with pytest.raises(ValueError, match="`frames` is empty"):
        tracker.track([], labels[0])
    with pytest.raises(ValueError, match=r"`frames\[1\]` has size"):
        tracker.track([frames[0], frames[1][:-2]], labels[0])
    with pytest.raises(ValueError, match="`method`"):
        PerSAMVideo(sam, "persam-x")
    with pytest.raises(ValueError, match="`topk`"):
        PerSAMVideo(sam, topk=0)


def test_bfloat16_encoder_autocast_runs_and_keeps_float32_features(sam, video):
    frames, labels = video
    tracker = PerSAMVideo(sam, encoder_dtype="bfloat16")
    assert tracker.encode(frames[0]).features.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallReferenceWarning)
        out = tracker.track(frames[:3], labels[0])
    assert len(out) == 3 and all(o.shape == labels[0].shape for o in out)
    with pytest.raises(ValueError, match="`encoder_dtype`"):
        PerSAMVideo(sam, encoder_dtype="int8")


def test_output_labels_are_the_frame_zero_values(sam, video):
    frames, labels = video
    two = np.where(labels[0] == 3, 0, labels[0])
    relabelled = np.select([two == 1, two == 2], [5, 9], 0).astype(np.int32)  # same order, other values
    out = PerSAMVideo(sam).track(frames[:3], relabelled)
    plain = PerSAMVideo(sam).track(frames[:3], two)
    for a, b in zip(out, plain, strict=True):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, np.select([b == 1, b == 2], [5, 9], 0))
