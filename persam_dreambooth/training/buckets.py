"""Aspect-ratio bucketing (``aspect_ratio_buckets``, diffusers' spelling): each photo trains at the bucket
``(H, W)`` nearest its aspect ratio instead of a centre square, so a tall or wide subject is not cut.

* :func:`parse_buckets` reads ``"h1,w1;h2,w2;..."`` (diffusers' ``parse_buckets_string`` format) and
  :func:`nearest_bucket` picks a photo's bucket with diffusers' rule (smallest ``|h * W - w * H|``; the last of equal
  ones).
* :class:`BucketTransform` resizes a photo and its mask together so that they cover the bucket (``resize_pair``:
  the same bilinear filter for both), crops both to ``(H, W)`` (centre or random) and flips both: the mask follows
  the image exactly, and the crop corner it reports is the real one (SDXL's ``crop_top_left``).
* :class:`BucketBatchSampler` makes batches of one bucket each, a pure function of ``(seed, epoch)`` like
  :class:`~persam_dreambooth.training.dataset.EpochSampler`, so a resumed run sees the same batches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from persam_dreambooth.data.transforms import CropBox, PairParams, crop_pair, hflip_pair, resize_pair
from persam_dreambooth.training.rng import derive_seed

__all__ = ["parse_buckets", "nearest_bucket", "BucketTransform", "BucketBatchSampler"]

_PAIR = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")


def parse_buckets(text: str, arg_name: str = "aspect_ratio_buckets") -> list[tuple[int, int]]:
    """``"1024,1024;768,1360"`` -> ``[(1024, 1024), (768, 1360)]`` (height, width), distinct, in order.

    Raises:
        ValueError: naming ``arg_name``, the bad pair and the expected form.
    """
    buckets: list[tuple[int, int]] = []
    for part in str(text).strip().split(";"):
        match = _PAIR.match(part)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ValueError(
                f"`{arg_name}` must be 'height,width' pairs of positive integers separated by ';' (e.g. "
                f"'1024,1024;768,1344;1344,768'), got {part.strip()!r} in {text!r}."
            )
        bucket = (int(match.group(1)), int(match.group(2)))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def nearest_bucket(hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest ``hw``: minimal ``|h * W - w * H|`` (diffusers' rule, ties
    to the later bucket)."""
    h, w = hw
    best, best_metric = 0, float("inf")
    for i, (bh, bw) in enumerate(buckets):
        metric = abs(h * bw - w * bh)
        if metric <= best_metric:
            best, best_metric = i, metric
    return best


def _cover_side(hw: tuple[int, int], target: tuple[int, int]) -> int:
    """The smallest shorter-side length for ``resize_pair`` whose result covers ``target`` ``(H, W)``."""
    h, w = hw
    th, tw = target
    short, long = (h, w) if h <= w else (w, h)
    need_short, need_long = (th, tw) if h <= w else (tw, th)
    size = max(need_short, -(-need_long * short // long))
    while int(size * long / short) < need_long:  # resize_pair truncates the longer side
        size += 1
    return size


class BucketTransform:
    """DreamBooth's instance transform for a bucket ``(H, W)``: resize to cover, crop, optional flip, applied to an
    image and its mask together.

    Args:
        center_crop: centre crop; otherwise a random crop. random_flip: flip left-right with probability 0.5.

    Like :class:`~persam_dreambooth.data.transforms.PairTransform`, the work splits into :meth:`resize`
    (deterministic, cacheable) and :meth:`augment` (draws the crop offsets, then the flip, from ``rng``).
    """

    def __init__(self, center_crop: bool = False, random_flip: bool = False) -> None:
        self.center_crop = center_crop
        self.random_flip = random_flip

    @property
    def is_random(self) -> bool:
        return not self.center_crop or self.random_flip

    def resize(self, image: Image.Image, mask: np.ndarray,
               bucket: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
        """The pair resized (aspect kept) so that it covers ``bucket``; ``(H', W')`` with ``H' >= H, W' >= W``."""
        return resize_pair(image, mask, _cover_side((image.height, image.width), bucket))

    def augment(self, image: Image.Image, mask: np.ndarray, bucket: tuple[int, int],
                rng: np.random.Generator | None = None) -> tuple[Image.Image, np.ndarray, PairParams]:
        """Crop a resized pair to ``bucket`` ``(H, W)`` and optionally flip it. Returns ``(image (H, W), mask (H, W)
        float32, params)``."""
        if self.is_random and rng is None:
            raise ValueError("`rng` is required for a random crop or flip.")
        hw = (image.height, image.width)
        th, tw = bucket
        if self.center_crop:
            top, left = int(round((hw[0] - th) / 2.0)), int(round((hw[1] - tw) / 2.0))
        else:
            top, left = int(rng.integers(0, hw[0] - th + 1)), int(rng.integers(0, hw[1] - tw + 1))
        box = CropBox(top=top, left=left, height=th, width=tw)
        image, mask = crop_pair(image, mask, box)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        if flipped:
            image, mask = hflip_pair(image, mask)
        return image, mask, PairParams(resized_hw=hw, crop=box, flipped=flipped)

    def __call__(self, image: Image.Image, mask: np.ndarray, bucket: tuple[int, int],
                 rng: np.random.Generator | None = None) -> tuple[Image.Image, np.ndarray, PairParams]:
        image, mask = self.resize(image, mask, bucket)
        return self.augment(image, mask, bucket, rng)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket.

    Per epoch: the indices in the order of a ``(seed, epoch)`` permutation, split by bucket (keeping that order),
    cut into batches of ``batch_size`` (the last of a bucket may be short), and the batches shuffled with another
    ``(seed, epoch)`` permutation. The number of batches is the same every epoch.

    Args:
        buckets_of: the bucket index of each dataset index. batch_size: samples per batch. seed: base seed.
    """

    def __init__(self, buckets_of: Sequence[int], batch_size: int, seed: int) -> None:
        self.buckets_of = list(buckets_of)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A3))
        order = torch.randperm(len(self.buckets_of), generator=generator).tolist()
        by_bucket: dict[int, list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.buckets_of[index], []).append(index)
        batches = [group[i: i + self.batch_size] for _, group in sorted(by_bucket.items())
                   for i in range(0, len(group), self.batch_size)]
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0xB0C))
        return [batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for bucket in self.buckets_of:
            counts[bucket] = counts.get(bucket, 0) + 1
        return sum(-(-n // self.batch_size) for n in counts.values())
