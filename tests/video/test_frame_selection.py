"""The frame-selection rules: sharpness, farthest-point sampling, and the library call the trainer uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import synthetic_video, write_mp4
from PIL import Image, ImageFilter

from persam_dreambooth import testing as tiny
from persam_dreambooth.masks.video_frames import farthest_point_order, laplacian_variance, select_instance_frames


def test_laplacian_variance_ranks_blur():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 64)).astype(np.float64)
    blurred = np.asarray(Image.fromarray(sharp.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)), np.float64)
    assert laplacian_variance(np.full((10, 10), 7.0)) == 0.0
    assert laplacian_variance(sharp) > 10 * laplacian_variance(blurred)
    assert laplacian_variance(np.ones((2, 5))) == 0.0


def test_farthest_point_order_by_hand():
    angles = np.deg2rad([0, 10, 90, 180, 95])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # unit vectors
    # from 0 deg: the farthest is 180; then the one farthest from both {0, 180} is 90 or 95 (90: distance 1 to both)
    assert farthest_point_order(vectors, 3, 0) == [0, 3, 2]
    assert farthest_point_order(vectors, 10, 1)[:1] == [1] and len(farthest_point_order(vectors, 10, 1)) == 5


def test_select_instance_frames_library_call(tmp_path):
    frames, labels = synthetic_video(num_frames=8)
    video = write_mp4(tmp_path / "pet.mp4", frames)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("other files of the run stay")
    selection = select_instance_frames(video, run, reference_mask=labels[0] > 0, num_frames=4, min_score=-1.0,
                                       sam=tiny.tiny_sam(), progress=False, reference_frame=0)
    assert len(selection.chosen) == 4 and selection.chosen == sorted(selection.chosen, key=lambda c: c.index)
    names = sorted(p.stem for p in selection.instance_dir.iterdir())
    assert names == [c.name for c in selection.chosen]
    record = json.loads((selection.mask_dir / "masks.json").read_text())
    assert sorted(record["images"]) == names and record["source"] == "video"
    assert (run / "keep.txt").exists() and selection.grid_path.is_file()
    with pytest.raises(ValueError, match="`--reference_frame` 8 is out of range"):
        select_instance_frames(video, tmp_path / "x", reference_box=(10, 10, 60, 60), reference_frame=8,
                               sam=tiny.tiny_sam(), progress=False, arg_names={"reference_frame": "--reference_frame"})
    with pytest.raises(ValueError, match="exactly one of"):
        select_instance_frames(video, tmp_path / "x", sam=tiny.tiny_sam(), progress=False)
    assert not (tmp_path / "x").exists()
