"""TrainConfig: field checks, relations, auto values, YAML + flags, resolved-config round trip."""

import argparse

import pytest
import yaml

from persam_dreambooth.config import ConfigError, dump_config, from_dict, load_config_file
from persam_dreambooth.training import TrainConfig
from persam_dreambooth.training.args import add_train_arguments, config_from_args

REQUIRED = {"pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "a photo of sks dog",
            "output_dir": "o"}


def make(**kw):
    return TrainConfig(**{**REQUIRED, **kw})


def test_auto_values_are_resolved():
    cfg = make(mask_dir="masks")
    assert cfg.mask_source == "dir" and cfg.learning_rate == 1e-4 and cfg.lora_alpha == 4.0
    assert cfg.pre_compute_text_embeddings is True and cfg.cache_latents is False  # random crop by default
    cfg = make(reference_image="r.jpg", reference_box=[1, 2, 30, 40], train_mode="full", center_crop=True)
    assert cfg.mask_source == "persam" and cfg.mask_method == "persam" and cfg.learning_rate == 5e-6
    assert cfg.cache_latents is True
    cfg = make(reference_image="r.jpg", reference_point=[3, 4], mask_method="persam_f", train_text_encoder=True)
    assert cfg.mask_source == "persam_f" and cfg.pre_compute_text_embeddings is False
    assert make(mask_source="none").uses_masks is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "No masks: give `mask_dir`"),
        ({"mask_source": "none", "pre_compute_text_embeddings": True, "train_text_encoder": True},
         "`pre_compute_text_embeddings` cannot be combined with `train_text_encoder`"),
        ({"mask_source": "none", "with_prior_preservation": True}, "needs `class_data_dir` and `class_prompt`"),
        ({"mask_source": "none", "with_prior_preservation": True, "class_data_dir": "c"}, "needs `class_prompt`"),
        ({"mask_source": "none", "cache_latents": True}, "`cache_latents` needs a deterministic"),
        ({"mask_source": "none", "mask_dir": "m"}, "contradicts `mask_dir`"),
        ({"reference_image": "r.jpg"}, "exactly one of `reference_mask`, `reference_box` or `reference_point`"),
        ({"reference_image": "r", "reference_box": [5, 5, 1, 9]}, "x0 < x1"),
        ({"reference_image": "r", "reference_point": [1]}, "`reference_point` must be 2 numbers x,y"),
        ({"mask_source": "persam_f", "mask_method": "persam", "reference_image": "r", "reference_point": [1, 2]},
         "contradicts `mask_source`"),
        ({"mask_dir": "m", "reference_image": "r", "reference_point": [1, 2]}, "either `mask_dir` or"),
        ({"mask_dir": "m", "resolution": 0}, "`resolution` must be >= 1"),
        ({"mask_dir": "m", "mask_background_weight": 2.0}, r"`mask_background_weight` must be in \[0, 1\]"),
        ({"mask_dir": "m", "lora_dropout": 1.0}, "`lora_dropout`"),
        ({"mask_dir": "m", "snr_gamma": 0.0}, "`snr_gamma` must be > 0"),
        ({"mask_dir": "m", "lora_target_modules": []}, "`lora_target_modules`"),
        ({"mask_dir": "m", "instance_prompt": " "}, "`instance_prompt` must not be empty"),
    ],
)
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make(**kwargs)


def _parse(argv):
    return config_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "mask_dir": "masks", "rank": 8, "learning_rate": "1e-4",
                                    "lora_target_modules": ["to_q", "to_v"], "mask_normalize": "batch"}))
    cfg = _parse(["--config", str(path), "--rank", "16", "--random_flip", "--mask_dir", "other"])
    assert cfg.rank == 16 and cfg.random_flip is True and cfg.mask_dir == "other"
    assert cfg.learning_rate == 1e-4 and cfg.lora_target_modules == ["to_q", "to_v"]
    assert cfg.mask_normalize == "batch" and cfg.lora_alpha == 16.0


def test_unknown_and_badly_typed_keys_are_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "mask_dir": "m", "learnig_rate": 1e-4}))
    with pytest.raises(ConfigError, match="Unknown config key `learnig_rate`.*Did you mean `learning_rate`"):
        _parse(["--config", str(path)])
    with pytest.raises(ConfigError, match="`mask_normalize` must be one of"):
        from_dict(TrainConfig, {**REQUIRED, "mask_dir": "m", "mask_normalize": "area"})
    with pytest.raises(SystemExit):
        _parse(["--config", str(path), "--rank", "four"])


def test_resolved_config_round_trip(tmp_path):
    cfg = make(reference_image="r.jpg", reference_box=[1.0, 2.0, 30.0, 40.0], seed=3, snr_gamma=5.0)
    dump_config(cfg, tmp_path / "config.resolved.yaml", extra={"versions": {"persam_dreambooth": "x"}})
    data = load_config_file(tmp_path / "config.resolved.yaml")
    assert data.pop("_meta") == {"versions": {"persam_dreambooth": "x"}}
    assert from_dict(TrainConfig, data) == cfg


@pytest.mark.parametrize("name", ["dreambooth_lora", "dreambooth_full", "dreambooth_vanilla"])
def test_example_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = from_dict(TrainConfig, load_config_file(path))
    assert cfg.train_mode == ("full" if name == "dreambooth_full" else "lora")
    assert (cfg.mask_source == "none") == (name == "dreambooth_vanilla")


@pytest.mark.parametrize(
    ("box", "point"),
    [
        (["60,40,420,470"], ["5,6"]),  # the `persam-dreambooth segment --ref-box` form
        (["60", "40", "420", "470"], ["5", "6"]),
        (["60, 40,", "420,470"], ["5 , 6"]),
    ],
)
def test_reference_box_and_point_flags_take_comma_or_space_separated_numbers(tmp_path, box, point):
    path = tmp_path / "ref.yaml"
    # the YAML holds a list; the flag replaces it
    path.write_text(yaml.safe_dump({**REQUIRED, "reference_image": "r.jpg", "reference_box": [1, 2, 3, 4]}))
    assert _parse(["--config", str(path)]).reference_box == [1.0, 2.0, 3.0, 4.0]
    assert _parse(["--config", str(path), "--reference_box", *box]).reference_box == [60.0, 40.0, 420.0, 470.0]
    path.write_text(yaml.safe_dump({**REQUIRED, "reference_image": "r.jpg"}))
    assert _parse(["--config", str(path), "--reference_point", *point]).reference_point == [5.0, 6.0]


def test_reference_flags_reject_bad_numbers(tmp_path, capsys):
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "reference_image": "r.jpg"}))
    with pytest.raises(SystemExit):
        _parse(["--config", str(path), "--reference_box", "60,40,x,470"])
    assert "`--reference_box` must be numbers x0,y0,x1,y1 (comma- or space-separated), got '60,40,x,470'" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"`reference_box` must be 4 numbers x0,y0,x1,y1.*\[60\.0, 40\.0, 420\.0\]"):
        _parse(["--config", str(path), "--reference_box", "60,40,420"])
    with pytest.raises(SystemExit):
        _parse(["--config", str(path), "--reference_point", "nan,4"])
