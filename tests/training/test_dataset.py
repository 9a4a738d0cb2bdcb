"""The dataset keeps masks aligned with images, is deterministic per (seed, epoch, index), never masks class images."""

import numpy as np
import pytest
import torch
from PIL import Image

from persam_dreambooth.masks import to_latent_resolution
from persam_dreambooth.training.dataset import DreamBoothDataset, EpochSampler, collate_examples


@pytest.fixture
def planted(tmp_path):
    """Two 40x56 images, grey with a white square, and the square's mask."""
    paths, masks = [], []
    for i, (y0, x0) in enumerate([(5, 8), (20, 30)]):
        image = np.full((40, 56, 3), 30, dtype=np.uint8)
        image[y0: y0 + 12, x0: x0 + 14] = 255
        mask = np.zeros((40, 56), dtype=np.uint8)
        mask[y0: y0 + 12, x0: x0 + 14] = 255
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        paths.append(tmp_path / f"{i}.png")
        masks.append(tmp_path / f"{i}_mask.png")
    return paths, masks


def test_latent_mask_follows_random_crop_and_flip(planted):
    images, masks = planted
    dataset = DreamBoothDataset(images, masks, resolution=32, latent_hw=(8, 8), random_flip=True, seed=5)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(2):
            item = dataset[index]
            pixels, latent_mask = item["instance_pixel_values"], item["instance_latent_mask"]
            assert pixels.shape == (3, 32, 32) and latent_mask.shape == (1, 8, 8)
            assert -1.0 <= pixels.min() and pixels.max() <= 1.0
            bright = ((pixels.mean(0) + 1) / 2 - 30 / 255) / (1 - 30 / 255)  # (32, 32): 1 on the square
            assert torch.allclose(to_latent_resolution(bright, (8, 8)), latent_mask[0], atol=0.03)


def test_items_are_a_function_of_seed_epoch_and_index(planted):
    images, masks = planted
    make = lambda seed: DreamBoothDataset(images, masks, resolution=32, latent_hw=(8, 8), random_flip=True,  # noqa: E731
                                          seed=seed)
    a, b = make(1), make(1)
    assert torch.equal(a[1]["instance_pixel_values"], b[1]["instance_pixel_values"])
    seen = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        seen.add(a[0]["instance_latent_mask"].numpy().tobytes())
    assert len(seen) > 1  # crop/flip vary by epoch
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(EpochSampler(10, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_vanilla_dilation_and_class_images(planted):
    images, masks = planted
    vanilla = DreamBoothDataset(images, None, resolution=32, latent_hw=(8, 8), center_crop=True)
    assert torch.equal(vanilla[0]["instance_latent_mask"], torch.ones(1, 8, 8))
    plain = DreamBoothDataset(images, masks, resolution=32, latent_hw=(8, 8), center_crop=True)
    grown = DreamBoothDataset(images, masks, resolution=32, latent_hw=(8, 8), center_crop=True, mask_dilate_px=2)
    assert grown[0]["instance_latent_mask"].sum() > plain[0]["instance_latent_mask"].sum()
    with_class = DreamBoothDataset(images, masks, resolution=32, latent_hw=(8, 8), center_crop=True,
                                   class_images=images * 2)
    assert len(with_class) == 4
    item = with_class[3]
    assert set(item) == {"instance_pixel_values", "instance_latent_mask", "class_pixel_values"}
    batch = collate_examples([with_class[0], with_class[1]])
    assert batch["class_pixel_values"].shape == (2, 3, 32, 32) and batch["instance_latent_mask"].shape == (2, 1, 8, 8)
