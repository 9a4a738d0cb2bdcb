"""The DreamBooth dataset with masks: instance images + their masks (+ unmasked class images).

Every random choice is a pure function of ``(seed, epoch, index)``: the data order comes from
:class:`EpochSampler` and each sample's crop/flip from a ``numpy`` generator seeded with the triple. A run resumed
from a checkpoint therefore sees exactly the batches an uninterrupted run sees, with any number of workers.

Item layout (``H = W = resolution``, ``h, w`` the latent grid):

* ``instance_pixel_values``: ``(3, H, W)`` float32 in [-1, 1];
* ``instance_latent_mask``: ``(1, h, w)`` float32 in [0, 1], the mask after the image's transforms, dilation and
  feathering, area-averaged to the latent grid (all ones for vanilla DreamBooth);
* ``class_pixel_values``: ``(3, H, W)`` when prior preservation is on (class images are never masked).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from persam_dreambooth.data.images import load_image, load_mask
from persam_dreambooth.data.transforms import PairTransform
from persam_dreambooth.masks.ops import dilate, feather, to_latent_resolution
from persam_dreambooth.training.rng import derive_seed

__all__ = ["EpochSampler", "DreamBoothDataset", "CachedLatentsDataset", "collate_examples", "image_to_tensor"]


class EpochSampler(Sampler[int]):
    """Shuffles ``range(n)`` with a permutation that depends only on ``(seed, epoch)``; call :meth:`set_epoch`."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A3))
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as ``(3, H, W)`` float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


class DreamBoothDataset(Dataset):
    """Instance images with masks (and class images), transformed jointly.

    Args:
        instance_images: the subject's photos.
        instance_masks: one mask file per photo, or None for all-ones masks (vanilla DreamBooth).
        resolution: the square training side.
        latent_hw: the latent grid ``(h, w)`` the masks are area-averaged to.
        center_crop: centre crop (else random crop); random_flip: flip left-right with probability 0.5.
        seed: base seed of the augmentation.
        mask_dilate_px, mask_feather_px: mask growth and edge blur in pixels of the resized image.
        class_images: class (prior) images, or None without prior preservation.

    The deterministic part (resize, dilate, feather) of each instance image is cached in memory the first time it
    is used; the random part (crop, flip) runs per item.
    """

    def __init__(
        self,
        instance_images: Sequence[str | os.PathLike[str]],
        instance_masks: Sequence[str | os.PathLike[str]] | None,
        resolution: int,
        latent_hw: tuple[int, int],
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        mask_dilate_px: int = 0,
        mask_feather_px: int = 0,
        class_images: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        if not instance_images:
            raise ValueError("`instance_images` is empty.")
        if instance_masks is not None and len(instance_masks) != len(instance_images):
            raise ValueError(f"{len(instance_masks)} masks for {len(instance_images)} instance images.")
        self.instance_images = [Path(p) for p in instance_images]
        self.instance_masks = None if instance_masks is None else [Path(p) for p in instance_masks]
        self.class_images = [Path(p) for p in class_images] if class_images else []
        self.transform = PairTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        self.latent_hw = tuple(latent_hw)
        self.seed = seed
        self.mask_dilate_px = mask_dilate_px
        self.mask_feather_px = mask_feather_px
        self.epoch = 0
        self._resized: dict[int, tuple[Image.Image, np.ndarray]] = {}

    @property
    def num_instance_images(self) -> int:
        return len(self.instance_images)

    @property
    def with_class_images(self) -> bool:
        return bool(self.class_images)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resized_instance(self, k: int) -> tuple[Image.Image, np.ndarray]:
        """Instance image ``k`` resized; its mask resized, dilated and feathered: ``(image, (H', W') float32)``."""
        if k not in self._resized:
            image = Image.fromarray(load_image(self.instance_images[k], arg_name="instance image"))
            if self.instance_masks is None:
                mask = np.ones((image.height, image.width), dtype=np.float32)
            else:
                mask = load_mask(self.instance_masks[k], arg_name="mask").astype(np.float32)
            image, mask = self.transform.resize(image, mask)
            mask = feather(dilate(mask, self.mask_dilate_px), self.mask_feather_px)
            self._resized[k] = (image, mask)
        return self._resized[k]

    def rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of item ``index`` in the current epoch."""
        return np.random.default_rng(derive_seed(self.seed, self.epoch, index))

    def instance_item(self, k: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        image, mask = self.resized_instance(k)
        image, mask, _ = self.transform.augment(image, mask, rng)
        latent_mask = to_latent_resolution(torch.from_numpy(mask)[None], self.latent_hw)  # (1, H, W) -> (1, h, w)
        return {"instance_pixel_values": image_to_tensor(image), "instance_latent_mask": latent_mask}

    def class_item(self, j: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        image = Image.fromarray(load_image(self.class_images[j], arg_name="class image"))
        ones = np.ones((image.height, image.width), dtype=np.float32)
        image, _, _ = self.transform(image, ones, rng)  # the same geometry as instances; no mask is used
        return {"class_pixel_values": image_to_tensor(image)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        item = self.instance_item(index % len(self.instance_images), rng)
        if self.class_images:
            item.update(self.class_item(index % len(self.class_images), rng))
        return item


class CachedLatentsDataset(Dataset):
    """The same items as a deterministic :class:`DreamBoothDataset`, with VAE posteriors instead of pixels.

    ``instance_latent_dist`` / ``class_latent_dist`` hold the VAE's diagonal Gaussian parameters ``(2C, h, w)``
    (mean and log-variance), sampled afresh every step exactly as the uncached path samples them.
    """

    def __init__(
        self,
        base: DreamBoothDataset,
        instance_dists: torch.Tensor,
        instance_masks: torch.Tensor,
        class_dists: torch.Tensor | None = None,
    ) -> None:
        if base.transform.is_random:
            raise ValueError("cached latents need a deterministic transform (center_crop and no random_flip).")
        self.base = base
        self.instance_dists = instance_dists  # (N_instance, 2C, h, w)
        self.instance_masks = instance_masks  # (N_instance, 1, h, w)
        self.class_dists = class_dists  # (N_class, 2C, h, w) or None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = index % len(self.instance_dists)
        item = {"instance_latent_dist": self.instance_dists[k], "instance_latent_mask": self.instance_masks[k]}
        if self.class_dists is not None:
            item["class_latent_dist"] = self.class_dists[index % len(self.class_dists)]
        return item


def collate_examples(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack each key over the batch: ``(3, H, W)`` -> ``(B, 3, H, W)``, ``(1, h, w)`` -> ``(B, 1, h, w)``."""
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}
