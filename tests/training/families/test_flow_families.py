"""SD3, FLUX.1 [dev] / [schnell], FLUX.2 [klein], Z-Image, Qwen-Image on tiny pipelines: detection, text and latents as
the pipelines compute them, the masked loss on the subject's positions through the packing, LoRA files the pipelines
load."""

import pytest
import torch
from diffusers import DiffusionPipeline
from flow_helpers import flow_config, generator

from persam_dreambooth import testing as tiny
from persam_dreambooth.training.components import check_lora_targets, inspect_base_model, load_components
from persam_dreambooth.training.families import ModelFiles, UnsupportedModelError, detect_family, family_for_class_name
from persam_dreambooth.training.lora import LORA_WEIGHT_NAME, add_denoiser_lora, load_lora, save_lora
from persam_dreambooth.training.step import StepModels, training_step

EXPECTED = {
    "StableDiffusion3Pipeline": ("sd3", False),
    "FluxPipeline": ("flux", True),
    "Flux2KleinPipeline": ("flux2_klein", False),
    "ZImagePipeline": ("z_image", False),
    "QwenImagePipeline": ("qwen_image", False),
}


def _setup(model_dir, tmp_path, lora=True, **overrides):
    """``(family, config, comps, text)``: components loaded, LoRA on the transformer, prompt encoded once."""
    config = flow_config(model_dir, tmp_path, **overrides)
    info = inspect_base_model(config)  # the trainer's preflight: family, configs, resolution, options
    check_lora_targets(config, info)
    comps = load_components(config, info, torch.float32)
    family = comps.family
    if lora:
        torch.manual_seed(0)
        add_denoiser_lora(comps.denoiser, 2, 2, 0.0, family.resolved_lora_targets(config))
    with torch.no_grad():
        text = family.encode_text(comps.text_encoders, family.tokenize(comps, config.instance_prompt, config), config)
    return family, config, comps, text


def _models(comps, text):
    return StepModels(family=comps.family, info=comps.info, denoiser=comps.denoiser, vae=comps.vae,
                      text_encoders=None, noise_scheduler=comps.noise_scheduler, instance_text=text)


def _batch(comps, mask=None, n=2, size=32, seed=1):
    """Pixels ``(n, 3, size, size)`` and a latent mask on the family's loss grid (all ones by default)."""
    grid = size // comps.info.loss_grid_factor
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"instance_pixel_values": pixels,
            "instance_latent_mask": torch.ones(n, 1, grid, grid) if mask is None else mask}


def _lora_params(denoiser):
    return {k: v.detach().clone() for k, v in denoiser.named_parameters() if "lora_" in k}


def _train(comps, text, config, steps, batch=None, lr=1e-2):
    """``steps`` AdamW steps of the masked loss with per-step generators; returns the LoRA weights."""
    params = [p for p in comps.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    models = _models(comps, text)
    for step in range(steps):
        out = training_step(batch or _batch(comps), models, config, generator(100 + step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return _lora_params(comps.denoiser)


# ------------------------------------------------------------------------------------------------ detection
def test_detected_from_model_index(flow_dir):
    index = ModelFiles(str(flow_dir)).model_index()
    name, _ = EXPECTED[index["_class_name"]]
    family = detect_family(str(flow_dir))
    assert family.name == name
    info = family.inspect(ModelFiles(str(flow_dir)), index)
    assert info.prediction_type == "flow_matching"
    assert info.resolution_multiple == 4  # tiny VAE factor 2 x 2x2 patches (8 x 2 = 16 for the real models)
    assert info.loss_grid_factor == (4 if name == "flux2_klein" else 2)


def test_flux_guidance_embedding_is_read_from_the_config(flow_pipeline_dirs):
    for key, expected in (("flux_dev", True), ("flux_schnell", False)):
        files = ModelFiles(str(flow_pipeline_dirs[key]))
        assert detect_family(str(files.name_or_path)).inspect(files, files.model_index()).extra == {
            "guidance_embeds": expected}


def test_unknown_family_lists_the_flow_families():
    with pytest.raises(UnsupportedModelError, match="FooPipeline") as err:
        family_for_class_name("FooPipeline", value="some/model")
    for name in ("sd3 (StableDiffusion3Pipeline)", "flux (FluxPipeline)", "flux2_klein (Flux2KleinPipeline)",
                 "z_image (ZImagePipeline)", "qwen_image (QwenImagePipeline)"):
        assert name in str(err.value)


# ------------------------------------------------------------------------------------- as the pipeline does
def test_text_conditioning_is_the_pipelines(flow_dir, tmp_path):
    """The family's text encoding equals ``pipeline.encode_prompt`` (so training sees what inference feeds)."""
    family, config, comps, text = _setup(flow_dir, tmp_path, lora=False)
    pipe = DiffusionPipeline.from_pretrained(str(flow_dir))
    prompt, length = config.instance_prompt, config.max_sequence_length
    with torch.no_grad():
        if family.name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=length)
            expected = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        elif family.name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=length)
            expected = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        elif family.name == "qwen_image":  # (1, L_prompt, D), mask None when it is all ones
            embeds, mask = pipe.encode_prompt(prompt, max_sequence_length=length)
            valid = text["prompt_mask"][0].bool()
            assert mask is None and int(valid.sum()) == embeds.shape[1]
            assert torch.all(text["prompt_embeds"][0][~valid] == 0)
            text = {"prompt_embeds": text["prompt_embeds"][:, valid]}
            expected = {"prompt_embeds": embeds}
        elif family.name == "z_image":  # a list of unpadded (L_i, D) embeddings
            (embeds,), _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=length)
            text = {"prompt_embeds": text["prompt_embeds"][0][text["prompt_mask"][0].bool()]}
            expected = {"prompt_embeds": embeds}
        else:
            embeds, _ = pipe.encode_prompt(prompt, max_sequence_length=length)
            expected = {"prompt_embeds": embeds}
    assert text.keys() == expected.keys()
    # Bit for bit, except Qwen-Image: its encoder runs on the prompt padded to max_sequence_length (the pipeline on
    # the bare prompt), and the longer masked matmuls round differently (about 1e-7).
    tol = 1e-6 if family.name == "qwen_image" else 0.0
    for key in expected:
        torch.testing.assert_close(text[key], expected[key], rtol=tol, atol=tol)


def test_flux2_latents_are_the_pipelines(flow_pipeline_dirs, tmp_path):
    """Patchified, batch-norm-normalised latents equal ``Flux2KleinPipeline._encode_vae_image``."""
    family, _, comps, _ = _setup(flow_pipeline_dirs["flux2_klein"], tmp_path, lora=False)
    pipe = DiffusionPipeline.from_pretrained(str(flow_pipeline_dirs["flux2_klein"]))
    pixels = _batch(comps)["instance_pixel_values"]
    with torch.no_grad():
        ours = family.sample_latents(family.encode_posterior(comps.vae, pixels), generator(), comps.info)
        theirs = pipe._encode_vae_image(pixels, generator())
    assert ours.shape == (2, 32, 8, 8)
    torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------------------------- the masked loss
def test_all_ones_mask_is_the_diffusers_loss_and_a_partial_mask_differs(flow_dir, tmp_path):
    """All ones: the loss is diffusers' ``mean(weighting * (pred - target)^2)`` of the same draws."""
    family, config, comps, text = _setup(flow_dir, tmp_path, weighting_scheme="cosmap")
    models = _models(comps, text)
    batch = _batch(comps)
    with torch.no_grad():
        masked = training_step(batch, models, config, generator(7)).loss
        # The same draws, in the step's order, then the script's loss formula.
        g = generator(7)
        posterior = family.encode_posterior(comps.vae, batch["instance_pixel_values"])
        latents = family.sample_latents(posterior, g, comps.info)
        noise = torch.randn(latents.shape, generator=g)
        noised = family.add_noise(latents, noise, comps.noise_scheduler, config, g)
        pred = family.predict(comps.denoiser, noised, family.expand_text(text, 2), {}, config, comps.info)
        weighting = noised.weights[:, None, None, None]
        reference = torch.mean((weighting * (pred - noised.target) ** 2).reshape(2, -1), 1).mean()
        torch.testing.assert_close(masked, reference, rtol=1e-6, atol=0)
        half = batch["instance_latent_mask"].clone()
        half[..., half.shape[-1] // 2:] = 0
        partial = training_step({**batch, "instance_latent_mask": half}, models, config, generator(7)).loss
    assert not torch.allclose(partial, masked)


def test_supervised_positions_are_the_subjects(flow_dir, tmp_path):
    """A mask over the left half: the loss reaches exactly the transformer tokens of the left half.

    The gradient of the loss with respect to the transformer's token outputs (``proj_out``, before any unpacking)
    is zero on every token of the right half and non-zero on the left half's, so the 2x2 packing (FLUX.1), the
    patchified loss grid (FLUX.2) and SD3's internal patches all keep the mask on the subject's positions.
    """
    family, config, comps, text = _setup(flow_dir, tmp_path)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["tokens"] = output  # (N, T, D): T tokens, row-major over the token grid

    # The last layer before unpatchifying: proj_out (SD3, FLUX.1, FLUX.2); Z-Image's final layer, whose sequence
    # starts with the image tokens (then the caption's).
    last = comps.denoiser.all_final_layer["2-1"] if family.name == "z_image" else comps.denoiser.proj_out
    handle = last.register_forward_hook(keep)
    batch = _batch(comps)
    half = batch["instance_latent_mask"].clone()
    half[..., half.shape[-1] // 2:] = 0  # subject = left half of the loss grid
    training_step({**batch, "instance_latent_mask": half}, _models(comps, text), config, generator(3)).loss.backward()
    handle.remove()
    side = 8  # 32 px / VAE 2 / patch 2
    grad = captured["tokens"].grad[:, : side * side]  # (N, T, D): the image tokens
    per_token = grad.abs().sum(dim=2).reshape(grad.shape[0], side, side)  # (N, rows, cols)
    assert captured["tokens"].shape[1] == side * side or family.name == "z_image"
    assert torch.all(per_token[:, :, side // 2:] == 0), "the loss reached tokens outside the mask"
    assert torch.all(per_token[:, :, : side // 2] > 0), "a token inside the mask got no gradient"


# ---------------------------------------------------------------------------------------------------- LoRA
def test_lora_file_loads_in_the_pipeline_and_changes_its_output(flow_dir, tmp_path):
    family, config, comps, text = _setup(flow_dir, tmp_path)
    trained = _train(comps, text, config, steps=3)
    out = tmp_path / "lora"
    from persam_dreambooth.training.lora import make_lora_config

    save_lora(out, family, comps.denoiser,
              denoiser_config=make_lora_config(2, 2, 0.0, family.resolved_lora_targets(config)))
    assert (out / LORA_WEIGHT_NAME).is_file()

    pipe = DiffusionPipeline.from_pretrained(str(flow_dir))
    call = {"prompt": config.instance_prompt, "height": 32, "width": 32, "num_inference_steps": 2,
            "output_type": "np", **family.pipeline_kwargs(config)}
    before = pipe(generator=generator(5), **call).images
    pipe.load_lora_weights(str(out))
    after = pipe(generator=generator(5), **call).images
    assert before.shape == after.shape == (1, 32, 32, 3)
    assert abs(after - before).max() > 1e-4
    # The pipeline holds exactly the trained weights.
    loaded = {k.replace(".default_0.", ".default."): v for k, v in _lora_params(pipe.transformer).items()}
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key


def test_saved_lora_restores_the_adapters_exactly(flow_dir, tmp_path):
    """The resume path: the file read back into fresh adapters gives the trained weights bit for bit."""
    family, config, comps, text = _setup(flow_dir, tmp_path)
    trained = _train(comps, text, config, steps=2)
    save_lora(tmp_path / "ckpt", family, comps.denoiser)
    _, _, fresh, _ = _setup(flow_dir, tmp_path)
    assert any(not torch.equal(v, trained[k]) for k, v in _lora_params(fresh.denoiser).items())
    load_lora(tmp_path / "ckpt", family, fresh.denoiser)
    restored = _lora_params(fresh.denoiser)
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[k], trained[k]) for k in trained)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_resolution_not_a_multiple_of_latent_times_patch_is_refused(flow_dir):
    family = detect_family(str(flow_dir))
    files = ModelFiles(str(flow_dir))
    info = family.inspect(files, files.model_index())
    family.check_resolution(36, info)
    with pytest.raises(ValueError, match=r"`resolution` must be a multiple of .*\b4\b.* got 34 \(try 32 or 36\)"):
        family.check_resolution(34, info)


def test_mismatched_vae_is_refused(flow_dir, tmp_path):
    family = detect_family(str(flow_dir))
    files = ModelFiles(str(flow_dir))
    info = family.inspect(files, files.model_index())
    sd_vae = tmp_path / "sd-vae"
    tiny.tiny_vae().save_pretrained(sd_vae)  # 4 latent channels
    vae_files = ModelFiles(str(sd_vae), arg_name="pretrained_vae_model_name_or_path")
    with pytest.raises(ValueError, match="`pretrained_vae_model_name_or_path`.*(latent_channels is 4|z_dim is None)"):
        family.check_vae(vae_files, info)
    own = ModelFiles(str(flow_dir / "vae"), arg_name="pretrained_vae_model_name_or_path")
    family.check_vae(own, info)  # the model's own VAE passes


def test_bad_flow_options_are_refused(flow_pipeline_dirs, tmp_path):
    family = detect_family(str(flow_pipeline_dirs["flux2_klein"]))
    files = ModelFiles(str(flow_pipeline_dirs["flux2_klein"]))
    info = family.inspect(files, files.model_index())
    config = flow_config(flow_pipeline_dirs["flux2_klein"], tmp_path)
    config.text_encoder_out_layers = [9, 18, 40]
    with pytest.raises(ValueError, match=r"`text_encoder_out_layers` \[9, 18, 40\].*\[40\].*28 layers"):
        family.check_config(config, info)
    config = flow_config(flow_pipeline_dirs["flux_schnell"], tmp_path, train_text_encoder=True)
    flux = detect_family(str(flow_pipeline_dirs["flux_schnell"]))
    files = ModelFiles(str(flow_pipeline_dirs["flux_schnell"]))
    flux.check_config(config, flux.inspect(files, files.model_index()))  # FLUX trains CLIP: accepted
    config = flow_config(flow_pipeline_dirs["flux2_klein"], tmp_path, train_text_encoder=True)
    with pytest.raises(ValueError, match="`train_text_encoder` is not supported for FLUX.2"):
        family.check_config(config, info)
