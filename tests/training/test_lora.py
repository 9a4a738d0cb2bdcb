"""LoRA files in diffusers' format: keys, and the scale alpha / rank surviving ``pipe.load_lora_weights``."""

import re

import pytest
import torch
from safetensors import safe_open

from persam_dreambooth.training import TrainConfig
from persam_dreambooth.training.components import inspect_base_model, load_components
from persam_dreambooth.training.families.stable_diffusion import (
    LORA_CLIP_TARGETS,
    LORA_UNET_TARGETS,
    StableDiffusionFamily,
)
from persam_dreambooth.training.lora import (
    LORA_WEIGHT_NAME,
    add_denoiser_lora,
    add_text_encoder_lora,
    load_lora,
    save_lora,
)

SD = StableDiffusionFamily()


def _components(tiny_sd_dir):
    config = TrainConfig(pretrained_model_name_or_path=str(tiny_sd_dir), instance_data_dir="x", output_dir="o",
                         instance_prompt="a photo of sks dog", mask_source="none", resolution=32)
    return config, load_components(config, inspect_base_model(config))


def _with_adapters(tiny_sd_dir, rank, alpha, seed=0):
    """Base components with LoRA on the UNet and the text encoder, B randomised so the adapters do something."""
    config, comps = _components(tiny_sd_dir)
    torch.manual_seed(seed)
    unet_lora = add_denoiser_lora(comps.unet, rank, alpha, 0.0, LORA_UNET_TARGETS)
    te_lora = add_text_encoder_lora(comps.text_encoder, rank, alpha, 0.0, LORA_CLIP_TARGETS)
    with torch.no_grad():
        for name, param in [*comps.unet.named_parameters(), *comps.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return comps, unet_lora, te_lora


def _forward(unet, text_encoder, tokenizer):
    """UNet prediction ``(1, 4, 16, 16)`` and prompt states ``(1, 77, D)`` on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    ids = tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids)[0]
        return unet(latents, torch.tensor([10]), states).sample, states


@pytest.mark.parametrize(("rank", "alpha"), [(4, 16.0), (2, 2.0)])
def test_fresh_pipeline_reproduces_the_trained_adapters(tiny_sd_dir, tmp_path, rank, alpha):
    from diffusers import StableDiffusionPipeline

    comps, unet_lora, te_lora = _with_adapters(tiny_sd_dir, rank, alpha)
    path = save_lora(tmp_path, SD, comps.unet, {"text_encoder": comps.text_encoder}, unet_lora,
                     {"text_encoder": te_lora})
    assert path == tmp_path / LORA_WEIGHT_NAME and [p.name for p in tmp_path.iterdir()] == [LORA_WEIGHT_NAME]
    with safe_open(path, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
        metadata = handle.metadata()
    # diffusers' key format, as its own DreamBooth LoRA script writes it
    unet_keys = [k for k in tensors if re.fullmatch(r"unet\..+\.to_(q|k|v|out\.0)\.lora\.(down|up)\.weight", k)]
    te_keys = [k for k in tensors
               if re.fullmatch(r"text_encoder\..+\.(q|k|v|out)_proj\.lora_linear_layer\.(down|up)\.weight", k)]
    assert unet_keys and te_keys and len(unet_keys) + len(te_keys) == len(tensors)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert metadata and any(str(alpha) in value for value in metadata.values())  # alpha travels in the file

    trained_pred, trained_states = _forward(comps.unet, comps.text_encoder, comps.tokenizer)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    base_pred, _ = _forward(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(tmp_path)  # diffusers' loader, unchanged
    loaded_pred, loaded_states = _forward(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (trained_pred - base_pred).abs().max() > 1e-2  # the adapters matter, so a wrong scale would show
    assert torch.allclose(loaded_states, trained_states, atol=1e-5)
    assert torch.allclose(loaded_pred, trained_pred, atol=1e-5)


def test_load_lora_restores_weights_into_existing_adapters(tiny_sd_dir, tmp_path):
    comps, unet_lora, te_lora = _with_adapters(tiny_sd_dir, 4, 8.0, seed=0)
    save_lora(tmp_path, SD, comps.unet, {"text_encoder": comps.text_encoder}, unet_lora, {"text_encoder": te_lora})
    expected = _forward(comps.unet, comps.text_encoder, comps.tokenizer)
    other, _, _ = _with_adapters(tiny_sd_dir, 4, 8.0, seed=1)
    assert not torch.allclose(_forward(other.unet, other.text_encoder, other.tokenizer)[0], expected[0])
    load_lora(tmp_path, SD, other.unet, {"text_encoder": other.text_encoder})
    got = _forward(other.unet, other.text_encoder, other.tokenizer)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    wrong_rank, _, _ = _with_adapters(tiny_sd_dir, 2, 8.0)
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        load_lora(tmp_path, SD, wrong_rank.unet)
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_lora(tmp_path / "nowhere", SD, other.unet)
