"""Per-family options: validation guidance defaults, SD3's ``precondition_outputs``, FLUX.2's
``text_encoder_out_layers`` flag, and the QLoRA wiring of the flow families (bitsandbytes is not installed here:
the config / preflight path and the loading hooks are what can be tested on a CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flow_helpers import flow_config
from safetensors.torch import load_file

from persam_dreambooth import testing as tiny
from persam_dreambooth.config import ConfigError
from persam_dreambooth.testing.families import save_tiny_sdxl
from persam_dreambooth.testing.flow_families import save_tiny_flux2_klein
from persam_dreambooth.training import TrainConfig, train
from persam_dreambooth.training.args import add_train_arguments, config_from_args
from persam_dreambooth.training.components import inspect_base_model, load_components
from persam_dreambooth.training.families import get_family
from persam_dreambooth.training.families.flow import FlowMatchingFamily

#: The pipelines' own ``guidance_scale`` defaults (``__call__`` signatures, diffusers 0.42).
PIPELINE_DEFAULTS = {"sd3": 7.0, "flux_dev": 3.5, "flux_schnell": 3.5, "flux2_klein": 4.0, "z_image": 5.0,
                     "qwen_image": None}


def _instance(tmp_path):
    tiny.write_instance_dir(tmp_path / "instance", n=2)
    return str(tmp_path / "instance")


def test_validation_guidance_defaults_to_the_family_pipelines(flow_pipeline_dirs, tmp_path):
    import inspect

    for key, expected in PIPELINE_DEFAULTS.items():
        config = flow_config(flow_pipeline_dirs[key], tmp_path)
        assert config.validation_guidance_scale is None
        info = inspect_base_model(config)
        family = get_family(info.family)
        kwargs = family.validation_call_kwargs(config, info)
        assert kwargs.get("guidance_scale") == expected, key
        signature = inspect.signature(family.pipeline_class().__call__).parameters["guidance_scale"]
        assert signature.default == expected, key  # the table above is the pipeline's default
        assert kwargs["max_sequence_length"] == 48
        assert family.validation_call_kwargs(config.replace(validation_guidance_scale=2.5), info)[
            "guidance_scale"] == 2.5


def test_validation_guidance_defaults_of_the_unet_families(tmp_path):
    sd = tiny.save_tiny_sd(tmp_path / "sd")
    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    for folder, expected in ((sd, 7.5), (sdxl, 5.0)):
        config = TrainConfig(pretrained_model_name_or_path=str(folder), instance_data_dir=_instance(tmp_path),
                             instance_prompt="a photo of sks dog", output_dir=str(tmp_path / "out"),
                             mask_source="none", resolution=32)
        info = inspect_base_model(config)
        assert get_family(info.family).validation_call_kwargs(config, info) == {"guidance_scale": expected}


def test_distilled_flux2_klein_validates_without_guidance(tmp_path):
    folder = save_tiny_flux2_klein(tmp_path / "klein-distilled", is_distilled=True)
    config = flow_config(folder, tmp_path)
    info = inspect_base_model(config)
    assert get_family("flux2_klein").validation_call_kwargs(config, info)["guidance_scale"] == 1.0


def test_validation_guidance_scale_is_checked():
    with pytest.raises(ConfigError, match=r"`validation_guidance_scale` must be >= 0 .* got -1.0"):
        TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="i", instance_prompt="p", output_dir="o",
                    mask_source="none", validation_guidance_scale=-1.0)


def _parse(argv):
    parser = add_train_arguments(argparse.ArgumentParser())
    return config_from_args(parser.parse_args(argv))


def test_diffusers_flags_of_sd3_and_flux2(tmp_path):
    """``--precondition_outputs 0`` (an int in diffusers' SD3 script) and ``--text_encoder_out_layers 10 20 30``
    (nargs in the FLUX.2 script) parse as in diffusers."""
    common = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "i", "--instance_prompt", "p",
              "--output_dir", "o", "--mask_source", "none"]
    config = _parse([*common, "--precondition_outputs", "0", "--text_encoder_out_layers", "10", "20", "30"])
    assert config.precondition_outputs == 0 and config.text_encoder_out_layers == [10, 20, 30]
    assert _parse(common).precondition_outputs == 1
    with pytest.raises(ConfigError, match=r"`precondition_outputs` must be 0 or 1, got 2"):
        _parse([*common, "--precondition_outputs", "2"])


def test_sd3_precondition_outputs_changes_the_training(flow_pipeline_dirs, tmp_path):
    tiny.write_instance_dir(tmp_path / "instance", n=2)
    kwargs = {"instance_data_dir": str(tmp_path / "instance"), "max_train_steps": 2, "learning_rate": 1e-2}
    on = train(flow_config(flow_pipeline_dirs["sd3"], tmp_path, output_dir=str(tmp_path / "on"), **kwargs))
    off = train(flow_config(flow_pipeline_dirs["sd3"], tmp_path, output_dir=str(tmp_path / "off"),
                            precondition_outputs=0, **kwargs))
    a, b = (load_file(Path(o) / "pytorch_lora_weights.safetensors") for o in (on, off))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "precondition_outputs: 0" in (Path(off) / "config.resolved.yaml").read_text()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_on_flow_families_reaches_the_bitsandbytes_check(flow_pipeline_dirs, tmp_path):
    """Every flow family accepts a quantized base (it is not refused as unsupported): the preflight then asks for
    bitsandbytes, naming the flag, before anything is written."""
    quant = tmp_path / "q.json"
    quant.write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}))
    tiny.write_instance_dir(tmp_path / "instance", n=2)
    for key, folder in flow_pipeline_dirs.items():
        assert get_family(inspect_base_model(flow_config(folder, tmp_path)).family).supports_quantized_base
        out = tmp_path / f"out-{key}"
        config = flow_config(folder, tmp_path, instance_data_dir=str(tmp_path / "instance"), output_dir=str(out),
                             bnb_quantization_config_path=str(quant))
        with pytest.raises(ValueError, match=r"`bnb_quantization_config_path` needs bitsandbytes: `pip install"):
            train(config)
        assert not out.exists(), key


def test_flow_families_load_the_transformer_through_the_qlora_hooks(flow_pipeline_dirs, tmp_path, monkeypatch):
    """``load_components`` passes ``denoiser_load_kwargs`` to the transformer's ``from_pretrained`` and hands the
    loaded model to ``prepare_quantized`` (as the UNet families do); the hooks are spied on, the loading is real."""
    calls = []
    marker = {"low_cpu_mem_usage": True}  # a real from_pretrained argument standing in for quantization_config

    def load_kwargs(config, weight_dtype):
        calls.append(("load_kwargs", config.bnb_quantization_config_path, weight_dtype))
        return dict(marker)

    def prepare(denoiser, config):
        calls.append(("prepare", type(denoiser).__name__))
        return denoiser

    monkeypatch.setattr(FlowMatchingFamily, "denoiser_load_kwargs", staticmethod(load_kwargs))
    monkeypatch.setattr(FlowMatchingFamily, "prepare_quantized", staticmethod(prepare))
    config = flow_config(flow_pipeline_dirs["flux_dev"], tmp_path, bnb_quantization_config_path="q.json")
    comps = load_components(config, inspect_base_model(config), torch.bfloat16)
    assert calls == [("load_kwargs", "q.json", torch.bfloat16), ("prepare", "FluxTransformer2DModel")]
    assert type(comps.denoiser).__name__ == "FluxTransformer2DModel"
