"""End-to-end ``train(config)`` on the tiny SD3, FLUX.1 [dev] / [schnell], FLUX.2 [klein], Z-Image and Qwen-Image
pipelines (32 px)."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from flow_helpers import flow_config, generator
from PIL import Image
from safetensors.torch import load_file

from persam_dreambooth import testing as tiny
from persam_dreambooth.training import train


@pytest.fixture
def photos(tmp_path):
    """3 synthetic subject photos, their masks, all-white masks: ``{"instance", "masks", "ones"}`` folders."""
    masks = tiny.write_instance_dir(tmp_path / "instance", n=3)
    for name in ("masks", "ones"):
        (tmp_path / name).mkdir()
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{stem}.png")
        Image.fromarray(np.full(mask.shape, 255, np.uint8)).save(tmp_path / "ones" / f"{stem}.png")
    return {k: tmp_path / k for k in ("instance", "masks", "ones")}


def _config(flow_dir, tmp_path, photos, out, **overrides):
    kwargs = {"instance_data_dir": str(photos["instance"]), "output_dir": str(tmp_path / out), "max_train_steps": 2,
              "learning_rate": 1e-2, "mask_source": None, "mask_dir": str(photos["masks"])}
    kwargs.update(overrides)
    return flow_config(flow_dir, tmp_path, **kwargs)


def _lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_all_ones_mask_trains_the_vanilla_weights_and_a_partial_mask_does_not(flow_dir, tmp_path, photos):
    # accept_masks: full-frame masks are "implausible" to the mask review (coverage 1.0), and wanted here.
    ones = _lora(train(_config(flow_dir, tmp_path, photos, "ones", mask_dir=str(photos["ones"]), accept_masks=True)))
    vanilla = _lora(train(_config(flow_dir, tmp_path, photos, "none", mask_dir=None, mask_source="none")))
    masked = _lora(train(_config(flow_dir, tmp_path, photos, "masked")))
    assert ones.keys() == vanilla.keys() == masked.keys()
    assert all(torch.equal(ones[k], vanilla[k]) for k in ones)
    assert any(not torch.equal(masked[k], vanilla[k]) for k in ones)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in ones)
    assert max(v.abs().max().item() for k, v in masked.items() if ".lora_B." in k) > 1e-4  # it did train


def test_trained_lora_loads_in_the_pipeline_and_changes_its_output(flow_dir, tmp_path, photos):
    out = train(_config(flow_dir, tmp_path, photos, "out", max_train_steps=3))
    pipe = DiffusionPipeline.from_pretrained(str(flow_dir))
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a photo of sks dog", "height": 32, "width": 32, "num_inference_steps": 2,
            "output_type": "np", "max_sequence_length": 48}
    before = pipe(generator=generator(0), **call).images
    pipe.load_lora_weights(str(out))
    after = pipe(generator=generator(0), **call).images
    assert abs(after - before).max() > 1e-4


def test_resume_after_interruption_ends_with_the_same_weights(flow_dir, tmp_path, photos, crash_at_step):
    common = {"max_train_steps": 4, "checkpointing_steps": 2, "random_flip": True, "weighting_scheme": "logit_normal"}
    straight = _lora(train(_config(flow_dir, tmp_path, photos, "straight", **common)))

    calls = crash_at_step(3)  # after checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        train(_config(flow_dir, tmp_path, photos, "resumed", **common))
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    calls["n"] = -100
    resumed = _lora(train(_config(flow_dir, tmp_path, photos, "resumed", resume_from_checkpoint="latest", **common)))
    assert calls["n"] == -100 + 2  # steps 3 and 4 only
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_bad_resolution_fails_before_anything_is_written(flow_dir, tmp_path, photos):
    config = _config(flow_dir, tmp_path, photos, "bad", resolution=34)
    with pytest.raises(ValueError, match=r"`resolution` must be a multiple of .*\b4\b.* got 34"):
        train(config)
    assert not (tmp_path / "bad").exists()


def test_mismatched_vae_fails_before_anything_is_written(flow_dir, tmp_path, photos):
    sd_vae = tmp_path / "sd-vae"
    tiny.tiny_vae().save_pretrained(sd_vae)  # 4 latent channels: SD's latent space, not SD3's / FLUX's
    config = _config(flow_dir, tmp_path, photos, "bad", pretrained_vae_model_name_or_path=str(sd_vae))
    with pytest.raises(ValueError, match="`pretrained_vae_model_name_or_path`.*(latent_channels|z_dim)"):
        train(config)
    assert not (tmp_path / "bad").exists()


def test_config_keys_of_the_diffusers_scripts(flow_pipeline_dirs, tmp_path, photos):
    """``weighting_scheme``, ``logit_mean`` / ``logit_std``, ``guidance_scale``, ``max_sequence_length`` reach the
    run (FLUX.1 [dev]: another guidance value or timestep density trains other weights)."""
    flux_dev = flow_pipeline_dirs["flux_dev"]
    base = _lora(train(_config(flux_dev, tmp_path, photos, "base")))
    guided = _lora(train(_config(flux_dev, tmp_path, photos, "guided", guidance_scale=1.0)))
    shifted = _lora(train(_config(flux_dev, tmp_path, photos, "shifted", weighting_scheme="logit_normal",
                                  logit_mean=1.0, logit_std=0.5)))
    for other in (guided, shifted):
        assert any(not torch.equal(base[k], other[k]) for k in base)
    resolved = (tmp_path / "shifted" / "config.resolved.yaml").read_text()
    assert "weighting_scheme: logit_normal" in resolved and "logit_mean: 1.0" in resolved


def test_flux_schnell_ignores_guidance_scale(flow_pipeline_dirs, tmp_path, photos):
    """[schnell] has no guidance embedding: ``guidance_scale`` changes nothing."""
    schnell = flow_pipeline_dirs["flux_schnell"]
    a = _lora(train(_config(schnell, tmp_path, photos, "a")))
    b = _lora(train(_config(schnell, tmp_path, photos, "b", guidance_scale=1.0)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prior_preservation_and_validation_with_the_family_pipeline(flow_dir, tmp_path, photos):
    """Class images generated by the family's pipeline, then a run with prior preservation and validation."""
    config = _config(flow_dir, tmp_path, photos, "prior", with_prior_preservation=True,
                     class_data_dir=str(tmp_path / "class"), class_prompt="a photo of dog", num_class_images=2,
                     sample_batch_size=2, class_generation_steps=2, validation_prompt="a photo of sks dog",
                     num_validation_images=1, validation_steps=2, validation_inference_steps=2)
    out = train(config)
    class_images = sorted((tmp_path / "class").iterdir())
    assert len(class_images) == 2
    with Image.open(class_images[0]) as first:
        assert first.size == (32, 32)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "validation").glob("*")), "no validation images"


def test_memory_options_run(flow_dir, tmp_path, photos):
    """bf16 weights, gradient checkpointing, cached latents (deterministic transform) and precomputed text
    conditioning all run; LoRA parameters stay float32 and the file is written."""
    out = train(_config(flow_dir, tmp_path, photos, "memory", mixed_precision="bf16", gradient_checkpointing=True,
                        cache_latents=True, center_crop=True))
    weights = _lora(out)
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert "cache_latents: true" in (out / "config.resolved.yaml").read_text()


@pytest.mark.parametrize("key", ["sd3", "flux_dev"])
def test_clip_text_encoder_lora_loads_in_the_pipeline(key, flow_pipeline_dirs, tmp_path, photos):
    """``train_text_encoder`` trains LoRA on the CLIP encoders (both for SD3, CLIP-L for FLUX.1), never on T5, and the
    pipeline loads them."""
    model = flow_pipeline_dirs[key]
    out = train(_config(model, tmp_path, photos, "te", train_text_encoder=True))
    components = {k.split(".")[0] for k in _lora(out)}
    expected = {"transformer", "text_encoder", "text_encoder_2"} if key == "sd3" else {"transformer", "text_encoder"}
    assert components == expected
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(out))
    assert any("lora_" in name for name, _ in pipe.text_encoder.named_parameters())
