"""The UNet families (SD 1.x/2.x and SDXL) end to end on tiny pipelines: masks, LoRA files, resume, bad inputs.

Issue 9's test list, for each family: all-ones mask == ``mask_source: none`` bit for bit, a partial mask trains other
weights; the LoRA file loads with the family's pipeline and changes its output; resume is exact; the supervised
latent positions are the subject's; class images, validation images and ``generate`` run; an unknown family, a VAE
that does not match and a resolution that is not a multiple of the family's factor fail before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from persam_dreambooth import testing as tiny
from persam_dreambooth.testing.families import save_tiny_sdxl, save_tiny_vae
from persam_dreambooth.training import TrainConfig, loop, train
from persam_dreambooth.training.families import UnsupportedModelError, detect_family

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def unet_family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet-families")
    return {"sd": tiny.save_tiny_sd(root / "sd"), "sdxl": save_tiny_sdxl(root / "sdxl")}


@pytest.fixture(params=sorted(PIPELINES))
def family_dir(request, unet_family_dirs):
    return request.param, unet_family_dirs[request.param]


def _write_masks(folder: Path, masks: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{stem}.png")
    return folder


def _kwargs(model_dir, tmp_path, **overrides):
    masks = tiny.write_instance_dir(tmp_path / "instance", n=3)
    kwargs = {
        "pretrained_model_name_or_path": str(model_dir), "instance_data_dir": str(tmp_path / "instance"),
        "mask_dir": str(_write_masks(tmp_path / "masks", masks)), "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "out"), "resolution": 32, "max_train_steps": 2, "learning_rate": 1e-2,
        "seed": 0, "report_to": "none",
    }
    kwargs.update(overrides)
    return kwargs


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "pytorch_lora_weights.safetensors")


def _pipe(name, folder):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=32,
                width=32, output_type="np").images


def test_detect_family_from_model_index(unet_family_dirs):
    assert detect_family(str(unet_family_dirs["sd"])).name == "sd"
    assert detect_family(str(unet_family_dirs["sdxl"])).name == "sdxl"


def test_all_ones_mask_is_vanilla_bit_for_bit_and_a_partial_mask_is_not(family_dir, tmp_path):
    name, model_dir = family_dir
    kwargs = _kwargs(model_dir, tmp_path, random_flip=True)
    ones = _write_masks(tmp_path / "ones", {f"{i:02d}": np.ones((48, 64), bool) for i in range(3)})
    # accept_masks: full-frame masks are "implausible" to the mask review (coverage 1.0), and wanted here.
    all_ones = _weights(train(TrainConfig(**{**kwargs, "mask_dir": str(ones), "output_dir": str(tmp_path / "a"),
                                             "accept_masks": True})))
    vanilla = _weights(train(TrainConfig(**{**kwargs, "mask_dir": None, "mask_source": "none",
                                            "output_dir": str(tmp_path / "b")})))
    partial = _weights(train(TrainConfig(**{**kwargs, "output_dir": str(tmp_path / "c")})))
    assert all_ones.keys() == vanilla.keys() == partial.keys()
    assert all(torch.equal(all_ones[k], vanilla[k]) for k in all_ones)
    assert max((partial[k] - vanilla[k]).abs().max().item() for k in partial) > 1e-4


def test_lora_loads_with_the_family_pipeline_and_changes_its_output(family_dir, tmp_path):
    name, model_dir = family_dir
    out = train(TrainConfig(**_kwargs(model_dir, tmp_path, train_text_encoder=True)))
    weights = _weights(out)
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == ({"unet", "text_encoder"} if name == "sd" else {"unet", "text_encoder", "text_encoder_2"})
    pipe = _pipe(name, model_dir)
    before = _sample(pipe)
    pipe.load_lora_weights(out)  # diffusers' loader of the family's pipeline, unchanged
    assert np.abs(_sample(pipe) - before).max() > 1e-4


def test_resume_gives_the_uninterrupted_weights(family_dir, tmp_path, crash_at_step):
    name, model_dir = family_dir
    common = _kwargs(model_dir, tmp_path, max_train_steps=4, checkpointing_steps=2, random_flip=True,
                     unmasked_probability=0.5, lora_dropout=0.1)
    straight = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "straight")}))
    crash_at_step(3)
    interrupted = {**common, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**interrupted))
    resumed = train(TrainConfig(**{**interrupted, "resume_from_checkpoint": "latest"}))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_latent_positions_are_the_subjects(family_dir, tmp_path, monkeypatch):
    """A square photo whose mask covers its left half: only the left half of the prediction gets a gradient."""
    name, model_dir = family_dir
    (tmp_path / "instance").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "instance" / "00.png")
    half = np.zeros((32, 32), bool)
    half[:, :16] = True
    masks = _write_masks(tmp_path / "masks", {"00": half})
    grads = []
    real_step = loop.training_step

    def spy(batch, models, config, generator):
        def keep(module, args, output):
            output[0].retain_grad()
            grads.append(output[0])

        handle = models.denoiser.register_forward_hook(keep)
        try:
            out = real_step(batch, models, config, generator)
        finally:
            handle.remove()
        return out

    monkeypatch.setattr(loop, "training_step", spy)
    train(TrainConfig(pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(tmp_path / "instance"),
                      mask_dir=str(masks), instance_prompt="a photo of sks dog", output_dir=str(tmp_path / "out"),
                      resolution=32, max_train_steps=1, seed=0, report_to="none", center_crop=True))
    grad = grads[0].grad  # (1, 4, 16, 16): the latent grid of 32-px images (VAE factor 2)
    assert grad.shape == (1, 4, 16, 16)
    assert grad[..., 8:].abs().max() == 0  # the background columns are not supervised
    assert (grad[..., :8].abs() > 0).float().mean() > 0.9  # the subject's columns are


def test_sdxl_time_ids_are_each_samples_real_size_and_crop(unet_family_dirs, tmp_path, monkeypatch):
    """48x64 photos resized to 32x43 and centre-cropped: original (48, 64), crop (0, 5), target (32, 32)."""
    seen = []
    real_step = loop.training_step

    def spy(batch, models, config, generator):
        def keep(module, args, kwargs):
            seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

        handle = models.denoiser.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            return real_step(batch, models, config, generator)
        finally:
            handle.remove()

    monkeypatch.setattr(loop, "training_step", spy)
    kwargs = _kwargs(unet_family_dirs["sdxl"], tmp_path, center_crop=True, max_train_steps=1, train_batch_size=2,
                     with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                     class_prompt="a photo of dog", num_class_images=2, class_generation_steps=2)
    (tmp_path / "class").mkdir()
    for i in range(2):  # class images of another shape: their own size goes into their rows
        Image.fromarray(np.full((40, 32, 3), 100 + i, np.uint8)).save(tmp_path / "class" / f"c{i}.png")
    train(TrainConfig(**kwargs))
    rows = seen[0].tolist()
    assert rows[:2] == [[48, 64, 0, 5, 32, 32]] * 2  # instance samples (cached latents keep the geometry)
    assert rows[2:] == [[40, 32, 4, 0, 32, 32]] * 2  # class samples: 40x32 -> 40x32, crop top 4


def test_sdxl_prior_preservation_validation_generate_and_a_replacement_vae(unet_family_dirs, tmp_path):
    from persam_dreambooth.generation.generate import generate

    model_dir = unet_family_dirs["sdxl"]
    vae_dir = save_tiny_vae(tmp_path / "vae")
    kwargs = _kwargs(model_dir, tmp_path, with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                     class_prompt="a photo of dog", num_class_images=2, sample_batch_size=2,
                     class_generation_steps=2, validation_prompt="a photo of sks dog", num_validation_images=1,
                     validation_inference_steps=2)
    out = train(TrainConfig(**{**kwargs, "pretrained_vae_model_name_or_path": str(vae_dir)}))
    assert len(list((tmp_path / "class").glob("*.jpg"))) == 2  # generated by StableDiffusionXLPipeline
    assert Image.open(out / "validation" / "final.png").size == (32 + 2 * 4, 32 + 2 * 4)
    base_vae = train(TrainConfig(**{**kwargs, "output_dir": str(tmp_path / "base-vae")}))
    a, b = _weights(out), _weights(base_vae)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6  # the replacement VAE's latents were used
    result = generate(pretrained_model_name_or_path=str(model_dir), lora=str(out), prompts=["a photo of sks dog"],
                      num_images=1, seed=0, output_dir=str(tmp_path / "gen"), num_inference_steps=2, height=32,
                      width=32, device="cpu")
    assert result.num_generated == 1
    records = [json.loads(x) for x in (tmp_path / "gen" / "generation.jsonl").read_text().splitlines()]
    assert len(records) == 1


def _fails(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train(TrainConfig(**kwargs))
    assert not Path(kwargs["output_dir"]).exists()


def test_bad_inputs_fail_before_anything_is_written(family_dir, tmp_path):
    name, model_dir = family_dir
    kwargs = _kwargs(model_dir, tmp_path)
    _fails({**kwargs, "resolution": 31}, ValueError,
           r"`resolution` must be a multiple of the VAE's scale factor 2 x .* patch size 1 = 2 .* got 31 "
           r"\(try 30 or 32\)")
    for bad, what in ((save_tiny_vae(tmp_path / "vae8", latent_channels=8), r"latent_channels is 8.* has 4"),
                      (save_tiny_vae(tmp_path / "vae3", blocks=3), r"block_out_channels .* is 3.* has 2")):
        _fails({**kwargs, "pretrained_vae_model_name_or_path": str(bad)}, ValueError,
               rf"`pretrained_vae_model_name_or_path` .* does not match the base model .*{what}")
    _fails({**kwargs, "pretrained_vae_model_name_or_path": str(tmp_path / "no-vae")}, FileNotFoundError,
           r"`pretrained_vae_model_name_or_path` folder .*no-vae' does not exist")


def test_unknown_family_lists_the_supported_ones(unet_family_dirs, tmp_path):
    import shutil

    other = tmp_path / "kandinsky"
    shutil.copytree(unet_family_dirs["sd"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    kwargs = _kwargs(other, tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"`pretrained_model_name_or_path` .*kandinsky' is a "
                       r"KandinskyPipeline model, which no model family trains; supported families .*"
                       r"sd \(StableDiffusionPipeline\), sdxl \(StableDiffusionXLPipeline\)"):
        train(TrainConfig(**kwargs))
    assert not Path(kwargs["output_dir"]).exists()


def test_compare_runs_on_sdxl_lora_runs(unet_family_dirs, tmp_path):
    """``compare`` reads each run's base model from its config and loads it with the family's pipeline."""
    from persam_dreambooth.evaluation.compare import compare

    model_dir = unet_family_dirs["sdxl"]
    runs = {name: train(TrainConfig(**_kwargs(model_dir, tmp_path / name, **extra)))
            for name, extra in (("masked", {}), ("vanilla", {"mask_dir": None, "mask_source": "none"}))}
    ws = tiny.tiny_compare_workspace(tmp_path / "ws")
    compare(progress=False, **tiny.tiny_compare_kwargs(ws, tmp_path / "report",
                                                       runs={k: str(v) for k, v in runs.items()}))
    assert (tmp_path / "report" / "report.html").is_file()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert '"masked"' in text and '"vanilla"' in text
    assert len(list((tmp_path / "report" / "generations").rglob("*.png"))) >= 2 * 3 * 2  # runs x prompts x images
