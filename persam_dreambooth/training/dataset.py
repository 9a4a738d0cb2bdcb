"""The DreamBooth dataset with masks: instance images + their masks (+ unmasked class images).

Every random choice is a pure function of ``(seed, epoch, index)``: the data order comes from
:class:`EpochSampler` and each sample's crop/flip from a ``numpy`` generator seeded with the triple. A run resumed
from a checkpoint therefore sees exactly the batches an uninterrupted run sees, with any number of workers.

Item layout (``H = W = resolution``, or the item's bucket ``(H, W)`` with ``aspect_ratio_buckets``; ``h, w`` the
loss grid):

* ``instance_pixel_values``: ``(3, H, W)`` float32 in [-1, 1];
* ``instance_latent_mask``: ``(1, h, w)`` float32 in [0, 1], the mask after the image's transforms, dilation and
  feathering, area-averaged to the latent grid (all ones for vanilla DreamBooth);
* ``class_pixel_values``: ``(3, H, W)`` when prior preservation is on (class images are never masked);
* with ``crop_conditioning`` (SDXL's ``add_time_ids``), ``instance_original_size`` / ``class_original_size``: ``(2,)``
  int64, the photo's ``(height, width)`` before any resize, and ``instance_crop_top_left`` / ``class_crop_top_left``:
  ``(2,)`` int64, the ``(top, left)`` of the crop window in the resized image (after a flip, the window of the
  flipped image, as diffusers' SDXL script flips before cropping), and ``*_target_size``: ``(2,)`` int64, ``(H, W)``.

With buckets (:mod:`.buckets`) item ``i`` trains at the bucket of its instance photo, and its class image is resized
and cropped into the same bucket (instance and class samples share one denoiser batch); batches then come from a
:class:`~.buckets.BucketBatchSampler`.

Also here: :func:`build_dataset`, :func:`cache_latents` (VAE posteriors once, for deterministic transforms) and
:func:`make_dataloader`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from persam_dreambooth.data.images import load_image, load_mask
from persam_dreambooth.data.transforms import PairParams, PairTransform
from persam_dreambooth.masks.ops import dilate, feather, to_latent_resolution
from persam_dreambooth.masks.store import read_image_hw
from persam_dreambooth.training.buckets import BucketBatchSampler, BucketTransform, nearest_bucket, parse_buckets
from persam_dreambooth.training.rng import derive_seed

if TYPE_CHECKING:
    from persam_dreambooth.training.config import TrainConfig
    from persam_dreambooth.training.families import ModelFamily

logger = logging.getLogger(__name__)

__all__ = ["EpochSampler", "DreamBoothDataset", "CachedLatentsDataset", "collate_examples", "image_to_tensor",
           "build_dataset", "cache_latents", "make_dataloader"]


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
        crop_conditioning: add each sample's original size, crop corner and target size (SDXL).
        buckets: aspect-ratio buckets ``[(H, W), ...]``, or None for ``resolution`` squares.
        loss_grid_factor: image pixels per loss-grid cell, for the mask grid of each bucket (with ``buckets``).

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
        crop_conditioning: bool = False,
        buckets: Sequence[tuple[int, int]] | None = None,
        loss_grid_factor: int | None = None,
    ) -> None:
        if not instance_images:
            raise ValueError("`instance_images` is empty.")
        if instance_masks is not None and len(instance_masks) != len(instance_images):
            raise ValueError(f"{len(instance_masks)} masks for {len(instance_images)} instance images.")
        self.instance_images = [Path(p) for p in instance_images]
        self.instance_masks = None if instance_masks is None else [Path(p) for p in instance_masks]
        self.class_images = [Path(p) for p in class_images] if class_images else []
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        if self.buckets is not None:
            if not loss_grid_factor:
                raise ValueError("`loss_grid_factor` is required with `buckets`.")
            self.transform: PairTransform | BucketTransform = BucketTransform(center_crop, random_flip)
            self.instance_buckets = [nearest_bucket(read_image_hw(p), self.buckets) for p in self.instance_images]
        else:
            self.transform = PairTransform(resolution, center_crop=center_crop, random_flip=random_flip)
            self.instance_buckets = [0] * len(self.instance_images)
        self.resolution = resolution
        self.loss_grid_factor = loss_grid_factor
        self.latent_hw = tuple(latent_hw)
        self.seed = seed
        self.mask_dilate_px = mask_dilate_px
        self.mask_feather_px = mask_feather_px
        self.crop_conditioning = crop_conditioning
        self.epoch = 0
        self._resized: dict[int, tuple[Image.Image, np.ndarray]] = {}
        self._original_hw: dict[int, tuple[int, int]] = {}

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
            self._original_hw[k] = (image.height, image.width)
            if self.instance_masks is None:
                mask = np.ones((image.height, image.width), dtype=np.float32)
            else:
                mask = load_mask(self.instance_masks[k], arg_name="mask").astype(np.float32)
            if self.buckets is not None:
                image, mask = self.transform.resize(image, mask, self.buckets[self.instance_buckets[k]])
            else:
                image, mask = self.transform.resize(image, mask)
            mask = feather(dilate(mask, self.mask_dilate_px), self.mask_feather_px)
            self._resized[k] = (image, mask)
        return self._resized[k]

    def rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of item ``index`` in the current epoch."""
        return np.random.default_rng(derive_seed(self.seed, self.epoch, index))

    def bucket_of_item(self, index: int) -> int:
        """The bucket index of dataset item ``index`` (its instance photo's; 0 without buckets)."""
        return self.instance_buckets[index % len(self.instance_images)]

    def _geometry(self, prefix: str, original_hw: tuple[int, int], params: PairParams) -> dict[str, torch.Tensor]:
        """``{prefix}_original_size``, ``{prefix}_crop_top_left`` and ``{prefix}_target_size``, ``(2,)`` int64
        each (empty without ``crop_conditioning``)."""
        if not self.crop_conditioning:
            return {}
        box = params.crop
        left = params.resized_hw[1] - box.left - box.width if params.flipped else box.left
        return {f"{prefix}_original_size": torch.tensor(original_hw, dtype=torch.int64),
                f"{prefix}_crop_top_left": torch.tensor((box.top, left), dtype=torch.int64),
                f"{prefix}_target_size": torch.tensor((box.height, box.width), dtype=torch.int64)}

    def _grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The loss grid of an ``(H, W)`` crop."""
        if self.buckets is None:
            return self.latent_hw
        return hw[0] // self.loss_grid_factor, hw[1] // self.loss_grid_factor

    def instance_item(self, k: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        image, mask = self.resized_instance(k)
        if self.buckets is not None:
            image, mask, params = self.transform.augment(image, mask, self.buckets[self.instance_buckets[k]], rng)
        else:
            image, mask, params = self.transform.augment(image, mask, rng)
        grid = self._grid((image.height, image.width))
        latent_mask = to_latent_resolution(torch.from_numpy(mask)[None], grid)  # (1, H, W) -> (1, h, w)
        return {"instance_pixel_values": image_to_tensor(image), "instance_latent_mask": latent_mask,
                **self._geometry("instance", self._original_hw[k], params)}

    def class_item(self, j: int, rng: np.random.Generator | None, bucket: int = 0) -> dict[str, torch.Tensor]:
        """Class image ``j`` with the instances' geometry (in bucket ``bucket`` with buckets); no mask is used."""
        image = Image.fromarray(load_image(self.class_images[j], arg_name="class image"))
        original_hw = (image.height, image.width)
        ones = np.ones((image.height, image.width), dtype=np.float32)
        if self.buckets is not None:
            image, _, params = self.transform(image, ones, self.buckets[bucket], rng)
        else:
            image, _, params = self.transform(image, ones, rng)
        return {"class_pixel_values": image_to_tensor(image), **self._geometry("class", original_hw, params)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        k = index % len(self.instance_images)
        item = self.instance_item(k, rng)
        if self.class_images:
            item.update(self.class_item(index % len(self.class_images), rng, self.instance_buckets[k]))
        return item


class CachedLatentsDataset(Dataset):
    """The same items as a deterministic :class:`DreamBoothDataset`, with VAE posteriors instead of pixels.

    ``instance_latent_dist`` / ``class_latent_dist`` hold the VAE's diagonal Gaussian parameters ``(2C, h, w)``
    (mean and log-variance), sampled afresh every step exactly as the uncached path samples them.
    """

    def __init__(
        self,
        base: DreamBoothDataset,
        instance_dists: Sequence[torch.Tensor],
        instance_masks: Sequence[torch.Tensor],
        class_dists: Mapping[tuple[int, int], torch.Tensor] | None = None,
        instance_geometry: Sequence[dict[str, torch.Tensor]] | None = None,
        class_geometry: Mapping[tuple[int, int], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        if base.transform.is_random:
            raise ValueError("cached latents need a deterministic transform (center_crop and no random_flip).")
        self.base = base
        self.instance_dists = instance_dists  # N_instance x (2C, h, w)
        self.instance_masks = instance_masks  # N_instance x (1, h, w)
        self.class_dists = class_dists  # {(class image, bucket): (2C, h, w)} or None
        # the deterministic geometry of each image (SDXL conditioning), without loading pixels again per item
        self.instance_geometry = instance_geometry
        self.class_geometry = class_geometry

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = index % len(self.instance_dists)
        item = {"instance_latent_dist": self.instance_dists[k], "instance_latent_mask": self.instance_masks[k]}
        if self.instance_geometry is not None:
            item.update(self.instance_geometry[k])
        if self.class_dists is not None:
            key = (index % len(self.base.class_images), self.base.instance_buckets[k])
            item["class_latent_dist"] = self.class_dists[key]
            if self.class_geometry is not None:
                item.update(self.class_geometry[key])
        return item

    def bucket_of_item(self, index: int) -> int:
        return self.base.bucket_of_item(index)


def collate_examples(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack each key over the batch: ``(3, H, W)`` -> ``(B, 3, H, W)``, ``(1, h, w)`` -> ``(B, 1, h, w)``."""
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}


def build_dataset(
    config: TrainConfig, instance_images: list[Path], mask_files: list[Path] | None, class_images: list[Path] | None,
    latent_hw: tuple[int, int], seed: int, crop_conditioning: bool = False, loss_grid_factor: int | None = None,
) -> DreamBoothDataset:
    """The run's :class:`DreamBoothDataset` (``latent_hw``: the family's loss grid at ``resolution``; with
    ``aspect_ratio_buckets``, each bucket's grid is its side // ``loss_grid_factor``)."""
    buckets = parse_buckets(config.aspect_ratio_buckets) if config.aspect_ratio_buckets else None
    return DreamBoothDataset(
        instance_images, mask_files, resolution=config.resolution, latent_hw=latent_hw,
        center_crop=config.center_crop, random_flip=config.random_flip, seed=seed,
        mask_dilate_px=config.mask_dilate_px, mask_feather_px=config.mask_feather_px, class_images=class_images,
        crop_conditioning=crop_conditioning, buckets=buckets, loss_grid_factor=loss_grid_factor,
    )


@torch.no_grad()
def cache_latents(
    dataset: DreamBoothDataset, family: ModelFamily, vae: torch.nn.Module, batch_size: int, device: torch.device,
    dtype: torch.dtype,
) -> CachedLatentsDataset:
    """Encode every distinct instance (and class) image once; keep the posteriors ``(N, 2C, h, w)`` on the CPU."""

    def encode(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Posteriors ``(2C, h, w)`` of ``(3, H, W)`` images, in chunks of ``batch_size`` images of one shape."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(pixels):
            j = i + 1
            while j < len(pixels) and j - i < batch_size and pixels[j].shape == pixels[i].shape:
                j += 1
            chunk = torch.stack(pixels[i:j]).to(device, dtype)  # (b, 3, H, W)
            out.extend(family.encode_posterior(vae, chunk).cpu())  # (b, 2C, h, w) -> b x (2C, h, w)
            i = j
        return out

    def geometry(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in item.items() if k.endswith(("_original_size", "_crop_top_left", "_target_size"))}

    instance = [dataset.instance_item(k, None) for k in range(dataset.num_instance_images)]
    instance_dists = encode([item["instance_pixel_values"] for item in instance])
    instance_masks = [item["instance_latent_mask"] for item in instance]  # N x (1, h, w)
    class_dists = class_geometry = None
    if dataset.with_class_images:  # each class image in every bucket its instances use
        keys = sorted({(j, dataset.instance_buckets[i % dataset.num_instance_images])
                       for i in range(len(dataset)) for j in [i % len(dataset.class_images)]})
        items = [dataset.class_item(j, None, bucket) for j, bucket in keys]
        class_dists = dict(zip(keys, encode([item["class_pixel_values"] for item in items]), strict=True))
        class_geometry = {key: geometry(item) for key, item in zip(keys, items, strict=True)}
    logger.info("Cached %d instance and %d class latents", len(instance_dists),
                0 if class_dists is None else len(class_dists))
    crop = dataset.crop_conditioning
    return CachedLatentsDataset(dataset, instance_dists, instance_masks, class_dists,
                                [geometry(item) for item in instance] if crop else None,
                                class_geometry if crop else None)


def make_dataloader(config: TrainConfig, dataset: DreamBoothDataset | CachedLatentsDataset,
                    seed: int) -> tuple[DataLoader, EpochSampler | BucketBatchSampler]:
    """A loader over ``dataset`` in the order of an :class:`EpochSampler`, or of a :class:`BucketBatchSampler` with
    aspect-ratio buckets (call its ``set_epoch``)."""
    base = dataset.base if isinstance(dataset, CachedLatentsDataset) else dataset
    if base.buckets is not None:
        batches = BucketBatchSampler([dataset.bucket_of_item(i) for i in range(len(dataset))],
                                     config.train_batch_size, seed)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_examples,
                            num_workers=config.dataloader_num_workers)
        return loader, batches
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset, batch_size=config.train_batch_size, sampler=sampler, collate_fn=collate_examples,
        num_workers=config.dataloader_num_workers,
    )
    return loader, sampler
