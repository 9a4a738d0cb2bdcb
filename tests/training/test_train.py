"""End-to-end runs of ``train(config)`` on the tiny Stable Diffusion (CPU, 32 px, a few steps each)."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from persam_dreambooth import testing as tiny
from persam_dreambooth.config import from_dict, load_config_file
from persam_dreambooth.training import TrainConfig, TrainingDivergedError, loop, train


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_masked_lora_run_outputs(train_kwargs, tiny_sd_dir, tmp_path):
    config = TrainConfig(**{
        **train_kwargs, "max_train_steps": 3, "checkpointing_steps": 1, "checkpoints_total_limit": 2,
        "resume_from_checkpoint": "latest", "report_to": "tensorboard", "mask_dilate_px": 1,
        "validation_prompt": "a photo of sks dog", "validation_steps": 2, "num_validation_images": 2,
        "validation_inference_steps": 2,
    })
    out = train(config)
    names = {p.name for p in out.iterdir()}
    assert {"config.resolved.yaml", "masks", "pytorch_lora_weights.safetensors", "README.md", "logs",
            "validation", "checkpoint-2", "checkpoint-3"} <= names
    assert "checkpoint-1" not in names and not [n for n in names if n.startswith(".")]  # rotated; no temp files
    resolved = load_config_file(out / "config.resolved.yaml")
    assert resolved.pop("_meta")["versions"]["persam_dreambooth"]
    # the resolved file rebuilds the run's config, with the auto values filled in (seed given; precision of the run)
    assert from_dict(TrainConfig, resolved) == config.replace(mixed_precision="no")
    assert resolved["mask_source"] == "dir" and resolved["learning_rate"] == 1e-2 and resolved["lora_alpha"] == 4.0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00.png", "01.png", "02.png", "masks.json",
                                                                  "masks_grid.jpg"]
    assert json.loads((out / "masks" / "masks.json").read_text())["source"] == "dir"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final.png", "step-000002.png"]
    # 2 images of 32 px side by side with 4-px padding (persam_dreambooth.utils.grids.tile_grid)
    assert Image.open(out / "validation" / "final.png").size == (2 * 32 + 3 * 4, 32 + 2 * 4)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "![masks](masks/masks_grid.jpg)" in card and "validation/final.png" in card and "load_lora_weights" in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert len(links) == 3 and all(not Path(link).is_absolute() and (out / link).is_file() for link in links)
    assert card.index("validation/step-000002.png") < card.index("validation/final.png")
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    pipe = _pipe(tiny_sd_dir)
    before = _sample(pipe)
    pipe.load_lora_weights(out)  # diffusers' own loader, unchanged
    assert np.abs(_sample(pipe) - before).max() > 1e-4


def test_full_fine_tune_saves_a_loadable_pipeline(train_kwargs, tiny_sd_dir):
    out = train(TrainConfig(**{**train_kwargs, "train_mode": "full", "learning_rate": 1e-3}))
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    tuned, base = _pipe(out), _pipe(tiny_sd_dir)
    assert np.abs(_sample(tuned) - _sample(base)).max() > 1e-4
    assert "DreamBooth for" in (out / "README.md").read_text()


def test_text_encoder_lora_with_gradient_checkpointing(train_kwargs, tiny_sd_dir):
    out = train(TrainConfig(**{**train_kwargs, "train_text_encoder": True, "gradient_checkpointing": True,
                               "rank": 2, "lora_alpha": 8.0}))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as handle:  # alpha != rank travels in the file
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == metadata["text_encoder.r"] == 2
    assert metadata["unet.lora_alpha"] == metadata["text_encoder.lora_alpha"] == 8.0
    te_up = [v for k, v in weights.items() if k.startswith("text_encoder.") and ".up." in k]
    assert te_up and max(v.abs().max().item() for v in te_up) > 0  # lora B starts at zero: it was trained
    pipe = _pipe(tiny_sd_dir)
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(out)
        assert (pipe.text_encoder(ids)[0] - before).abs().max() > 1e-6  # the text-encoder LoRA is loaded too


def test_vanilla_with_cached_latents_and_prior_preservation(train_kwargs, tmp_path):
    class_dir = tmp_path / "class"
    kwargs = {**train_kwargs, "mask_dir": None, "mask_source": "none", "center_crop": True,
              "with_prior_preservation": True, "class_data_dir": str(class_dir), "class_prompt": "a photo of dog",
              "num_class_images": 2, "sample_batch_size": 2, "class_generation_steps": 2, "snr_gamma": 5.0,
              "offset_noise": True}
    out = train(TrainConfig(**kwargs))
    first = sorted(class_dir.iterdir())
    assert len(first) == 2 and all(p.suffix == ".jpg" for p in first)
    assert Image.open(first[0]).size == (32, 32)
    assert not (out / "masks").exists()
    assert "vanilla DreamBooth" in (out / "README.md").read_text()
    assert "cache_latents: true" in (out / "config.resolved.yaml").read_text()

    # only the shortfall is generated: the two existing images stay untouched
    from accelerate import PartialState

    from persam_dreambooth.training.class_images import ensure_class_images

    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    paths = ensure_class_images(TrainConfig(**{**kwargs, "num_class_images": 3}), PartialState(), seed=0)
    assert len(paths) == 3 and {p.name: p.stat().st_mtime_ns for p in first} == stamps
    assert ensure_class_images(TrainConfig(**{**kwargs, "num_class_images": 3}), PartialState(), seed=0) == paths
    # an interrupted (multi-process) generation leaves a gap: the gap is filled with the very image it lacked
    paths[1].unlink()
    again = ensure_class_images(TrainConfig(**{**kwargs, "num_class_images": 3}), PartialState(), seed=0)
    assert [p.name for p in again] == [p.name for p in paths] and [p.name[:5] for p in again] == ["00000", "00001",
                                                                                                   "00002"]


def test_resume_after_interruption_ends_with_the_same_weights(train_kwargs, tmp_path, crash_at_step, caplog):
    common = {**train_kwargs, "max_train_steps": 4, "checkpointing_steps": 2, "random_flip": True,
              "lora_dropout": 0.1, "unmasked_probability": 0.5, "lr_scheduler": "cosine", "lr_warmup_steps": 1,
              "gradient_accumulation_steps": 1}
    straight = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "straight")}))

    calls = crash_at_step(3)  # after checkpoint-2, in the middle of epoch 0 (3 images, batch 1)
    interrupted = {**common, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**interrupted))
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    calls["n"] = -100  # count the resumed run's steps, without crashing
    resumed = train(TrainConfig(**{**interrupted, "resume_from_checkpoint": "latest"}))
    assert calls["n"] == -100 + 2  # steps 3 and 4 only: it started from checkpoint-2

    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(v.abs().max().item() for k, v in a.items() if ".up." in k) > 1e-3  # it did train

    # a damaged newest checkpoint (truncated optimizer.bin): `latest` falls back to the newest intact one, warns
    # naming the damaged one, and the run still ends on the uninterrupted run's weights
    calls = crash_at_step(4)  # after checkpoint-3
    damaged = {**common, "checkpointing_steps": 1, "output_dir": str(tmp_path / "damaged")}
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**damaged))
    assert sorted(p.name for p in (tmp_path / "damaged").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    optimizer_file = tmp_path / "damaged" / "checkpoint-3" / "optimizer.bin"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    calls["n"] = -100
    with caplog.at_level(logging.WARNING):
        fallback = train(TrainConfig(**{**damaged, "resume_from_checkpoint": "latest"}))
    assert calls["n"] == -100 + 2  # steps 3 and 4 only: it started from checkpoint-2
    assert any("checkpoint-3" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    c = load_file(fallback / "pytorch_lora_weights.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_kwargs, monkeypatch):
    real_step, calls = loop.training_step, {"n": 0}

    def nan_on_third(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "training_step", nan_on_third)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3.*checkpoint-2"):
        train(TrainConfig(**{**train_kwargs, "max_train_steps": 4, "checkpointing_steps": 1}))
    out = train_kwargs["output_dir"]
    names = sorted(p.name for p in __import__("pathlib").Path(out).iterdir())
    assert "checkpoint-2" in names and "checkpoint-3" not in names
    assert "pytorch_lora_weights.safetensors" not in names and "README.md" not in names


def test_persam_masks_made_before_training(train_kwargs, dreambooth_data, tiny_sam_checkpoint):
    tiny.register_tiny_sam()
    out = train(TrainConfig(**{
        **train_kwargs, "mask_dir": None, "reference_image": str(dreambooth_data["instance"] / "00.jpg"),
        "reference_mask": str(dreambooth_data["masks"] / "00.png"), "sam_model_type": "tiny",
        "sam_checkpoint": str(tiny_sam_checkpoint), "max_train_steps": 1,
        "accept_masks": True,  # the tiny SAM has random weights: its masks are implausible, and that is expected
    }))
    record = json.loads((out / "masks" / "masks.json").read_text())
    assert record["method"] == "persam" and record["sam_model_type"] == "tiny" and len(record["images"]) == 3
    assert (out / "masks" / "masks_grid.jpg").is_file()


def test_bf16_keeps_trainable_lora_in_fp32_and_does_not_leak_into_the_next_run(train_kwargs, tmp_path, monkeypatch):
    from persam_dreambooth.training import recipe

    seen = []

    def spy(config, comps, device, dtype):
        trained = real_prepare(config, comps, device, dtype)
        seen.append(({p.dtype for p in trained.parameters()},
                     {p.dtype for p in comps.unet.parameters() if not p.requires_grad},
                     {p.dtype for p in comps.text_encoder.parameters() if not p.requires_grad}))
        return trained

    real_prepare = recipe.prepare_models
    monkeypatch.setattr(recipe, "prepare_models", spy)
    out = train(TrainConfig(**{**train_kwargs, "mixed_precision": "bf16", "train_text_encoder": True,
                               "validation_prompt": "a photo of sks dog", "num_validation_images": 1,
                               "validation_inference_steps": 2}))
    assert seen[0] == ({torch.float32}, {torch.bfloat16}, {torch.bfloat16})
    assert "mixed_precision: bf16" in (out / "config.resolved.yaml").read_text()
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(k.startswith("text_encoder.") for k in weights) and (out / "validation" / "final.png").is_file()
    # the next in-process run without `mixed_precision` runs in fp32 (accelerate's process-wide state is not reused)
    train(TrainConfig(**{**train_kwargs, "output_dir": str(tmp_path / "after"), "max_train_steps": 1}))
    assert seen[1][0] == {torch.float32} and seen[1][1] == {torch.float32}
    assert "mixed_precision: 'no'" in (tmp_path / "after" / "config.resolved.yaml").read_text()
