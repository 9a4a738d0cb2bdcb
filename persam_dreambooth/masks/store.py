"""``MaskSet``: the hand-off between segmentation and training.

A mask set is a folder with one mask per instance image, named with the image's stem (``dog1.jpg`` ->
``dog1.png``), plus ``masks.json``, a record of how the masks were made (method, reference, SAM model, scores).
Hand-drawn masks work the same way: any format :func:`persam_dreambooth.data.images.load_mask` reads, with or
without ``masks.json``. Masks the package writes are 8-bit PNG, 0 = background and 255 = subject.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from persam_dreambooth.data.images import check_same_size, find_mask_for, load_mask
from persam_dreambooth.utils.io import atomic_save_image, atomic_write_json

__all__ = ["MASKS_JSON", "MaskSet", "read_image_hw"]

MASKS_JSON = "masks.json"
RECORD_VERSION = 1


@dataclass
class MaskSet:
    """A folder of masks, one per instance image (same stem), and the record of how they were made.

    Attributes:
        folder: the mask folder.
        record: the contents of ``masks.json`` (an empty dict for a hand-made folder without one).
    """

    folder: Path
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | os.PathLike[str], arg_name: str = "mask_dir") -> MaskSet:
        """Open the mask folder ``folder`` (``masks.json`` is optional).

        Raises:
            FileNotFoundError: the folder does not exist.
            NotADirectoryError: it is a file.
            ValueError: ``masks.json`` is not valid JSON.
        """
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"`{arg_name}` folder {str(folder)!r} does not exist.")
        if not folder.is_dir():
            raise NotADirectoryError(f"`{arg_name}` must be a folder of masks, but {str(folder)!r} is a file.")
        record: dict[str, Any] = {}
        record_path = folder / MASKS_JSON
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"`{arg_name}`: {str(record_path)!r} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ValueError(f"`{arg_name}`: {str(record_path)!r} must hold a JSON object.")
        return cls(folder=folder, record=record)

    def path_for(self, image_path: str | os.PathLike[str]) -> Path | None:
        """The mask file for ``image_path`` (same stem, any image extension), or None."""
        return find_mask_for(image_path, self.folder)

    def load_for(self, image_path: str | os.PathLike[str]) -> np.ndarray:
        """The ``(H, W)`` bool mask of ``image_path``.

        Raises:
            FileNotFoundError: the folder has no mask with the image's stem.
        """
        path = self.path_for(image_path)
        if path is None:
            raise FileNotFoundError(
                f"`mask_dir` {str(self.folder)!r} has no mask for instance image {str(image_path)!r} "
                f"(expected a file named {Path(image_path).stem!r} + an image extension, e.g. "
                f"{Path(image_path).stem + '.png'!r})."
            )
        return load_mask(path, arg_name=f"mask {str(path)!r}")

    def check_images(self, images: Sequence[str | os.PathLike[str]]) -> dict[Path, Path]:
        """Check that every image has a mask of its size with at least one foreground pixel.

        Reads only the image and mask headers for the size check, then decodes each mask once.

        Returns:
            ``{image path: mask path}``.

        Raises:
            FileNotFoundError: an image has no mask.
            ValueError: a mask's size differs from its image's, or a mask is empty.
        """
        pairs: dict[Path, Path] = {}
        for image in images:
            image = Path(image)
            mask_path = self.path_for(image)
            if mask_path is None:
                self.load_for(image)  # raises the FileNotFoundError with the expected name
            assert mask_path is not None
            image_hw = read_image_hw(image)
            mask = load_mask(mask_path, arg_name=f"mask {str(mask_path)!r}")
            check_same_size(image_hw, mask.shape, image_arg=f"image {str(image)!r}",
                            mask_arg=f"mask {str(mask_path)!r}")
            if not mask.any():
                raise ValueError(
                    f"mask {str(mask_path)!r} for image {str(image)!r} is empty (no foreground pixel): the masked "
                    "loss would have nothing to learn from. Fix the mask or remove the image."
                )
            pairs[image] = mask_path
        return pairs

    @classmethod
    def write(
        cls,
        folder: str | os.PathLike[str],
        masks: Mapping[str, np.ndarray],
        record: Mapping[str, Any] | None = None,
    ) -> MaskSet:
        """Write ``{stem: (H, W) bool mask}`` as ``{stem}.png`` (0/255) plus ``masks.json``, each file atomically.

        ``masks.json`` is written last, so a folder with a ``masks.json`` is complete.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stem, mask in masks.items():
            arr = np.asarray(mask)
            if arr.ndim != 2:
                raise ValueError(f"mask {stem!r} must have shape (H, W), got {tuple(arr.shape)}.")
            atomic_save_image(Image.fromarray((arr > 0).astype(np.uint8) * 255), folder / f"{stem}.png")
        full_record = {"version": RECORD_VERSION, **dict(record or {})}
        atomic_write_json(folder / MASKS_JSON, full_record)
        return cls(folder=folder, record=full_record)


def read_image_hw(path: Path) -> tuple[int, int]:
    """The ``(H, W)`` of an image file after its EXIF orientation (reads the header only)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # malformed EXIF: the pixels are used as stored
                orientation = 1
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"instance image {str(path)!r} is not a readable image: {exc}") from exc
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # 90-degree turns swap the sides
