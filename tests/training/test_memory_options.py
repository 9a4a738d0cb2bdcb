"""Memory options: ``offload`` (frozen text encoders / VAE leave the device between uses) and QLoRA through
``bnb_quantization_config_path`` (checked before anything is written)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persam_dreambooth.config import ConfigError
from persam_dreambooth.training import TrainConfig, train, trainable


def test_offload_trains_the_same_weights_and_moves_the_frozen_parts(train_kwargs, tmp_path, monkeypatch):
    kwargs = {**train_kwargs, "center_crop": True, "validation_prompt": "a photo of sks dog",
              "num_validation_images": 1, "validation_inference_steps": 2, "validation_steps": 1}
    plain = train(TrainConfig(**{**kwargs, "output_dir": str(tmp_path / "plain")}))
    moved = []
    real = trainable.offload_frozen

    def spy(config, comps):
        real(config, comps)
        if config.offload:
            moved.append({next(m.parameters()).device.type for m in (comps.vae, *comps.text_encoders.values())})

    monkeypatch.setattr("persam_dreambooth.training.recipe.offload_frozen", spy)
    offloaded = train(TrainConfig(**{**kwargs, "offload": True, "output_dir": str(tmp_path / "offloaded")}))
    assert moved == [{"cpu"}]  # after the prompts were encoded and the latents cached
    a = load_file(plain / "pytorch_lora_weights.safetensors")
    b = load_file(offloaded / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(offloaded) / "validation" / "final.png").is_file()


def test_qlora_config_is_checked_before_anything_is_written(train_kwargs, tmp_path):
    with pytest.raises(ConfigError, match="`bnb_quantization_config_path` quantizes a frozen base for LoRA"):
        TrainConfig(**{**train_kwargs, "bnb_quantization_config_path": "q.json", "train_mode": "full"})
    missing = {**train_kwargs, "bnb_quantization_config_path": str(tmp_path / "q.json")}
    with pytest.raises(FileNotFoundError, match="`bnb_quantization_config_path` file .*q.json' does not exist"):
        train(TrainConfig(**missing))
    (tmp_path / "q.json").write_text(json.dumps({"bnb_4bit_quant_type": "nf4"}))
    with pytest.raises(ValueError, match='must hold a JSON object .* "load_in_4bit": true'):
        train(TrainConfig(**missing))
    (tmp_path / "q.json").write_text("{load_in_4bit: true")
    with pytest.raises(ValueError, match="is not valid JSON"):
        train(TrainConfig(**missing))
    assert not Path(train_kwargs["output_dir"]).exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_names_the_flag(train_kwargs, tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}))
    with pytest.raises(ValueError, match=r"`bnb_quantization_config_path` needs bitsandbytes: `pip install"):
        train(TrainConfig(**{**train_kwargs, "bnb_quantization_config_path": str(tmp_path / "q.json")}))
    assert not Path(train_kwargs["output_dir"]).exists()
