"""Aspect-ratio bucketing: parsing, the nearest bucket, masks that follow the image exactly, one-bucket batches, and
training runs (SDXL's crop conditioning uses the real crop and the bucket as target size; resume stays exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from persam_dreambooth import testing as tiny
from persam_dreambooth.config import ConfigError
from persam_dreambooth.testing.families import save_tiny_sdxl
from persam_dreambooth.training import TrainConfig, loop, train
from persam_dreambooth.training.buckets import BucketBatchSampler, BucketTransform, nearest_bucket, parse_buckets
from persam_dreambooth.training.dataset import DreamBoothDataset, make_dataloader

BUCKETS = "32,32;32,48;48,32"


def test_parse_and_nearest_bucket():
    assert parse_buckets(" 32,32; 32 ,48;48,32;32,32") == [(32, 32), (32, 48), (48, 32)]
    for bad in ("32x32", "32,32;", "0,32", "a,b"):
        with pytest.raises(ValueError, match="`aspect_ratio_buckets` must be 'height,width' pairs"):
            parse_buckets(bad)
    with pytest.raises(ConfigError, match="aspect_ratio_buckets"):
        TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="i", instance_prompt="p", output_dir="o",
                    mask_source="none", aspect_ratio_buckets="32;32")
    buckets = parse_buckets(BUCKETS)
    assert [nearest_bucket(hw, buckets) for hw in ((48, 64), (64, 48), (50, 50), (100, 400))] == [1, 2, 0, 1]


@pytest.mark.parametrize(("center_crop", "random_flip"), [(True, False), (False, True)])
def test_the_mask_follows_the_image_exactly(center_crop, random_flip):
    """The photo's red channel *is* its mask: after resize, crop and flip they still agree pixel for pixel."""
    rng = np.random.default_rng(0)
    mask = np.zeros((61, 90), np.float32)
    mask[10:40, 20:70] = 1.0
    mask[rng.random(mask.shape) < 0.05] = 1.0  # texture, so a shifted crop would not match
    image = Image.fromarray(np.stack([mask * 255, np.zeros_like(mask), np.zeros_like(mask)], -1).astype(np.uint8))
    transform = BucketTransform(center_crop=center_crop, random_flip=random_flip)
    for seed in range(6):
        out_image, out_mask, params = transform(image, mask, (32, 48), np.random.default_rng(seed))
        assert out_image.size == (48, 32) and out_mask.shape == (32, 48)
        assert params.crop.height == 32 and params.crop.width == 48
        assert params.resized_hw[0] >= 32 and params.resized_hw[1] >= 48
        red = np.asarray(out_image, dtype=np.float32)[..., 0] / 255.0
        assert np.abs(red - out_mask).max() <= 1.0 / 255.0 + 1e-6


def test_batches_hold_one_bucket_and_depend_only_on_seed_and_epoch():
    buckets_of = [0, 1, 2, 1, 1, 0, 2, 2, 1, 0, 1]
    sampler = BucketBatchSampler(buckets_of, batch_size=2, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2 + 3 + 2  # ceil(3/2) + ceil(5/2) + ceil(3/2)
        assert all(len({buckets_of[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(buckets_of)))
        epochs.append(batches)
    again = BucketBatchSampler(buckets_of, batch_size=2, seed=3)
    again.set_epoch(1)
    assert list(again) == epochs[1] and epochs[0] != epochs[1]


def _photos(folder):
    """Two landscape (48x64) and one portrait (64x48) photo with masks."""
    masks = tiny.write_instance_dir(folder / "instance", n=3)
    image = Image.open(folder / "instance" / "02.jpg").transpose(Image.Transpose.ROTATE_90)
    image.save(folder / "instance" / "02.jpg")
    masks["02"] = np.rot90(masks["02"])
    (folder / "masks").mkdir()
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}.png")
    return folder / "instance", folder / "masks"


def test_dataset_items_take_their_photos_bucket(tmp_path):
    instance, masks = _photos(tmp_path)
    dataset = DreamBoothDataset(sorted(instance.iterdir()), sorted(masks.iterdir()), resolution=32,
                                latent_hw=(16, 16), center_crop=True, buckets=parse_buckets(BUCKETS),
                                loss_grid_factor=2, crop_conditioning=True)
    shapes = [(tuple(item["instance_pixel_values"].shape), tuple(item["instance_latent_mask"].shape),
               item["instance_target_size"].tolist()) for item in (dataset[i] for i in range(3))]
    assert shapes == [((3, 32, 48), (1, 16, 24), [32, 48])] * 2 + [((3, 48, 32), (1, 24, 16), [48, 32])]
    config = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="i", instance_prompt="p",
                         output_dir="o", mask_source="none", train_batch_size=2, aspect_ratio_buckets=BUCKETS)
    loader, sampler = make_dataloader(config, dataset, seed=0)
    assert isinstance(sampler, BucketBatchSampler) and len(loader) == 2
    assert sorted(tuple(batch["instance_pixel_values"].shape) for batch in loader) == [(1, 3, 48, 32),
                                                                                        (2, 3, 32, 48)]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


def _kwargs(model_dir, tmp_path, **overrides):
    instance, masks = _photos(tmp_path)
    return {"pretrained_model_name_or_path": str(model_dir), "instance_data_dir": str(instance),
            "mask_dir": str(masks), "instance_prompt": "a photo of sks dog", "output_dir": str(tmp_path / "out"),
            "resolution": 32, "max_train_steps": 3, "learning_rate": 1e-2, "seed": 0, "report_to": "none",
            "aspect_ratio_buckets": BUCKETS, **overrides}


def test_sdxl_trains_in_buckets_with_the_real_crop_and_the_bucket_as_target(sdxl_dir, tmp_path, monkeypatch):
    seen = []
    real_step = loop.training_step

    def spy(batch, models, config, generator):
        handle = models.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()),
            with_kwargs=True)
        try:
            return real_step(batch, models, config, generator)
        finally:
            handle.remove()

    monkeypatch.setattr(loop, "training_step", spy)
    train(TrainConfig(**_kwargs(sdxl_dir, tmp_path, center_crop=True)))  # cached latents, per bucket
    rows = sorted(row for step in seen for row in step)
    # landscape 48x64 -> covers 32x48 at 36x48 (shorter side 36), crop top 2; portrait 64x48 -> 48x36, crop left 2
    assert rows == [[48, 64, 2, 0, 32, 48]] * 2 + [[64, 48, 0, 2, 48, 32]]


def test_resume_in_buckets_is_exact_and_bad_buckets_fail_first(sdxl_dir, tmp_path, crash_at_step):
    common = _kwargs(sdxl_dir, tmp_path, max_train_steps=4, checkpointing_steps=2, random_flip=True,
                     with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                     class_prompt="a photo of dog", num_class_images=2, class_generation_steps=2)
    straight = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "straight")}))
    crash_at_step(3)
    interrupted = {**common, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**interrupted))
    resumed = train(TrainConfig(**{**interrupted, "resume_from_checkpoint": "latest"}))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bad = {**common, "output_dir": str(tmp_path / "bad"), "aspect_ratio_buckets": "32,32;33,48"}
    with pytest.raises(ValueError, match=r"`aspect_ratio_buckets`: bucket 33,48 \(height,width\) must have both "
                                         r"sides multiples of 2.*\(try 34,48\)"):
        train(TrainConfig(**bad))
    assert not (tmp_path / "bad").exists()
