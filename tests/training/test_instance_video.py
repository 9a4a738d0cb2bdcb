"""DreamBooth from a phone video: the trainer picks K frames with their masks, then trains on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.config import ConfigError
from persam_dreambooth.training import TrainConfig, train
from persam_dreambooth.training.instance_video import frames_per_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "video"))
from helpers import synthetic_video, write_mp4  # noqa: E402


@pytest.fixture
def video_kwargs(train_kwargs, tmp_path, tiny_sam_checkpoint):
    tiny.register_tiny_sam()
    frames, labels = synthetic_video(num_frames=8, height=48, width=64)
    video = write_mp4(tmp_path / "pet.mp4", frames)
    Image.fromarray((labels[0] == 1).astype(np.uint8) * 255).save(tmp_path / "ref.png")
    kwargs = {**train_kwargs, "instance_data_dir": None, "mask_dir": None, "instance_video": [str(video)],
              "reference_mask": str(tmp_path / "ref.png"), "num_instance_frames": 3, "sam_model_type": "tiny",
              "sam_checkpoint": str(tiny_sam_checkpoint),
              "frame_min_score": -1.0,  # the tiny SAM has random weights: its scores mean nothing
              "accept_masks": True}
    return kwargs


def test_frames_per_video_split():
    assert frames_per_video(12, 1) == [12]
    assert frames_per_video(7, 3) == [3, 2, 2] and sum(frames_per_video(12, 5)) == 12


def test_train_from_a_video(video_kwargs):
    out = train(TrainConfig(**video_kwargs))
    frames = sorted(p.name for p in (out / "instance_frames").iterdir())
    assert len(frames) == 3 and all(name.startswith("frame_") for name in frames)
    record = json.loads((out / "masks" / "masks.json").read_text())
    assert sorted(f"{stem}.jpg" for stem in record["images"]) == frames and record["source"] == "video"
    assert all((out / "masks" / f"{Path(f).stem}.png").is_file() for f in frames)
    assert (out / "masks_grid.jpg").is_file() and (out / "frame_selection.json").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_two_videos_merge_and_masks_only(video_kwargs, tmp_path):
    frames, _ = synthetic_video(num_frames=6, height=48, width=64, seed=1)
    second = write_mp4(tmp_path / "pet2.mp4", frames)
    out = train(TrainConfig(**{**video_kwargs, "instance_video": [*video_kwargs["instance_video"], str(second)],
                               "masks_only": True}))
    frames = sorted(p.stem for p in (out / "instance_frames").iterdir())
    assert len(frames) == 3  # K overall: 2 from the first video, 1 from the second
    assert sum(f.startswith("00_pet_") for f in frames) == 2 and sum(f.startswith("01_pet2_") for f in frames) == 1
    assert sorted(json.loads((out / "masks" / "masks.json").read_text())["images"]) == frames
    assert (out / "masks_grid.jpg").is_file() and not (out / "pytorch_lora_weights.safetensors").exists()


def test_flags_parse_repeatable(video_kwargs):
    import argparse

    from persam_dreambooth.training.args import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--output_dir", "o",
                              "--instance_video", "a.mp4", "--instance_video", "b.mp4", "--reference_box",
                              "1,2,30,40", "--reference_frame", "3", "--num_instance_frames", "4"])
    config = config_from_args(args)
    assert config.instance_video == ["a.mp4", "b.mp4"] and config.reference_frame == 3
    assert config.mask_source == "persam" and config.num_instance_frames == 4


def _fails(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train(TrainConfig(**kwargs))
    assert not Path(kwargs["output_dir"]).exists()


def test_bad_video_inputs_fail_before_anything_is_written(video_kwargs, tmp_path, dreambooth_data):
    (tmp_path / "notes.mp4").write_text("not a video")
    _fails({**video_kwargs, "instance_video": [str(tmp_path / "notes.mp4")]}, ValueError, "`--instance_video`")
    _fails({**video_kwargs, "instance_video": [str(tmp_path / "missing.mp4")]}, FileNotFoundError,
           "`--instance_video` .*missing.mp4' does not exist")
    _fails({**video_kwargs, "reference_frame": 8}, ValueError, "`--reference_frame` 8 is out of range")
    Image.fromarray(np.full((40, 64), 255, np.uint8)).save(tmp_path / "small.png")
    _fails({**video_kwargs, "reference_mask": str(tmp_path / "small.png")}, ValueError,
           r"`--reference_mask` has size \(H, W\) = \(40, 64\)")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "empty.png")
    _fails({**video_kwargs, "reference_mask": str(tmp_path / "empty.png")}, ValueError, "`--reference_mask` is empty")
    _fails({**video_kwargs, "reference_mask": None, "reference_box": [10, 10, 90, 40]}, ValueError,
           "`--reference_box` must lie inside")
    _fails({**video_kwargs, "reference_mask": None, "reference_point": [5, 60]}, ValueError,
           "`--reference_point` must lie inside")


def test_bad_video_configs(video_kwargs, dreambooth_data):
    with pytest.raises(ConfigError, match="exactly one of `instance_data_dir`.*got both"):
        TrainConfig(**{**video_kwargs, "instance_data_dir": str(dreambooth_data["instance"])})
    with pytest.raises(ConfigError, match="`instance_video` needs exactly one of `reference_mask`.*got none"):
        TrainConfig(**{**video_kwargs, "reference_mask": None})
    with pytest.raises(ConfigError, match="`num_instance_frames` 1 must be >= the number of `instance_video`"):
        TrainConfig(**{**video_kwargs, "instance_video": ["a.mp4", "b.mp4"], "num_instance_frames": 1})
    with pytest.raises(ConfigError, match="cannot be combined with `mask_dir`"):
        TrainConfig(**{**video_kwargs, "mask_dir": str(dreambooth_data["masks"])})
    with pytest.raises(ConfigError, match="`reference_frame` must be >= 0"):
        TrainConfig(**{**video_kwargs, "reference_frame": -1})
