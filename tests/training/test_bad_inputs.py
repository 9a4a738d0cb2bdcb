"""Bad input fails before the first step with a message naming the problem, and writes nothing."""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth.config import ConfigError
from persam_dreambooth.training import TrainConfig, train


def _fails(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train(TrainConfig(**kwargs))


def _nothing_written(kwargs):
    from pathlib import Path

    assert not Path(kwargs["output_dir"]).exists()


def test_no_images(train_kwargs, tmp_path):
    (tmp_path / "empty").mkdir()
    kwargs = {**train_kwargs, "instance_data_dir": str(tmp_path / "empty")}
    _fails(kwargs, ValueError, r"`instance_data_dir`: folder .*empty' holds no image file")
    _nothing_written(kwargs)
    _fails({**kwargs, "instance_data_dir": str(tmp_path / "missing")}, FileNotFoundError, "does not exist")


def test_image_without_mask(train_kwargs, dreambooth_data):
    (dreambooth_data["masks"] / "01.png").unlink()
    _fails(train_kwargs, FileNotFoundError, r"has no mask for instance image .*01\.jpg.*'01\.png'")
    _nothing_written(train_kwargs)


def test_mask_size_mismatch(train_kwargs, dreambooth_data):
    Image.fromarray(np.full((48, 63), 255, dtype=np.uint8)).save(dreambooth_data["masks"] / "02.png")
    _fails(train_kwargs, ValueError, r"02\.png'` has size \(H, W\) = \(48, 63\) but `image .*02\.jpg'` has \(48, 64\)")
    _nothing_written(train_kwargs)


def test_empty_mask(train_kwargs, dreambooth_data):
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(dreambooth_data["masks"] / "00.png")
    _fails(train_kwargs, ValueError, r"00\.png' for image .*00\.jpg' is empty")
    _nothing_written(train_kwargs)


def test_resolution_the_vae_cannot_take(train_kwargs):
    # the tiny VAE has 2 blocks: scale factor 2, so odd sides cannot be encoded exactly
    _fails({**train_kwargs, "resolution": 33}, ValueError,
           r"`resolution` must be a multiple of the VAE's scale factor 2 .* got 33 \(try 32 or 34\)")
    _nothing_written(train_kwargs)


def test_missing_base_model(train_kwargs, tmp_path):
    _fails({**train_kwargs, "pretrained_model_name_or_path": str(tmp_path / "no-model")}, FileNotFoundError,
           r"`pretrained_model_name_or_path` folder .*no-model' does not exist")
    (tmp_path / "not-a-pipeline").mkdir()
    _fails({**train_kwargs, "pretrained_model_name_or_path": str(tmp_path / "not-a-pipeline")}, FileNotFoundError,
           r"is not a diffusers pipeline folder: .*model_index\.json' is missing")
    # a Hub id while offline (the test environment forbids the network)
    _fails({**train_kwargs, "pretrained_model_name_or_path": "someone/no-such-model"}, FileNotFoundError,
           "neither a local folder nor a reachable Hub model")
    _nothing_written(train_kwargs)


def test_output_dir_is_a_file(train_kwargs, tmp_path):
    (tmp_path / "file").write_text("x")
    _fails({**train_kwargs, "output_dir": str(tmp_path / "file")}, NotADirectoryError,
           "`--output_dir` must be a folder, but .* is an existing file")
    _fails({**train_kwargs, "output_dir": str(tmp_path / "file" / "sub")}, NotADirectoryError, "a parent of")


def test_incompatible_flags_fail_at_config_time(train_kwargs):
    with pytest.raises(ConfigError, match="`pre_compute_text_embeddings` cannot be combined with"):
        TrainConfig(**{**train_kwargs, "pre_compute_text_embeddings": True, "train_text_encoder": True})
    with pytest.raises(ConfigError, match="`with_prior_preservation` needs `class_data_dir` and `class_prompt`"):
        TrainConfig(**{**train_kwargs, "with_prior_preservation": True})


def test_missing_checkpoint_and_reference_problems(train_kwargs, dreambooth_data, tmp_path):
    _fails({**train_kwargs, "resume_from_checkpoint": "checkpoint-7"}, FileNotFoundError,
           "`resume_from_checkpoint` 'checkpoint-7' does not exist")
    reference = {**train_kwargs, "mask_dir": None, "reference_image": str(dreambooth_data["instance"] / "00.jpg")}
    _fails({**reference, "reference_box": [10, 10, 80, 40]}, ValueError,
           r"`reference_box` \[10, 10, 80, 40\] must lie inside `reference_image` \(W x H = 64 x 48\)")
    _fails({**reference, "reference_point": [5, 50]}, ValueError, "`reference_point` .* must lie inside")
    _fails({**reference, "reference_mask": str(dreambooth_data["masks"] / "00.png"), "sam_model_type": "vit_zz"},
           ValueError, "`sam_model_type` must be one of")
    _fails({**reference, "reference_mask": str(dreambooth_data["masks"] / "00.png"),
            "sam_checkpoint": str(tmp_path / "sam.pth")}, FileNotFoundError, "`sam_checkpoint` file .* does not exist")
    _nothing_written(train_kwargs)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes(train_kwargs):
    _fails({**train_kwargs, "use_8bit_adam": True}, ValueError,
           r"`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`")
    _nothing_written(train_kwargs)


def test_two_images_with_the_same_stem(train_kwargs, dreambooth_data):
    Image.open(dreambooth_data["instance"] / "01.jpg").save(dreambooth_data["instance"] / "01.png")
    _fails(train_kwargs, ValueError,
           r"`instance_data_dir`: .*01\.(jpg|png)' and .*01\.(jpg|png)' have the same name stem")
    _nothing_written(train_kwargs)


def test_lora_targets_the_model_lacks(train_kwargs):
    _fails({**train_kwargs, "lora_target_modules": ["to_q", "to_qq"]}, ValueError,
           r"`lora_target_modules` names modules the UNet2DConditionModel does not have: \['to_qq'\]")
    _fails({**train_kwargs, "train_text_encoder": True, "text_encoder_lora_target_modules": ["q_proj", "query"]},
           ValueError,
           r"`text_encoder_lora_target_modules` names modules the CLIPTextModel does not have: \['query'\]")
    _nothing_written(train_kwargs)
