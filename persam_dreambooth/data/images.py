"""Reading photos and masks the way users have them.

* :func:`load_image` returns an ``(H, W, 3)`` uint8 RGB array with the EXIF orientation applied. Grayscale, RGBA,
  palette, CMYK, 1-bit and 16-bit inputs all work (16-bit values are scaled to 8 bits, not clipped).
* :func:`load_mask` returns an ``(H, W)`` bool array, foreground = nonzero, from a path, a PIL image or an array:
  bool, 0/1, 0/255, L, P (palette *index* nonzero), RGB (any channel nonzero), RGBA/LA (the alpha channel, unless
  it is fully opaque everywhere, in which case the colour channels decide), 16-bit and float masks.
* :func:`list_images` lists the image files of a folder (or checks a list of files), sorted by name.
* :func:`check_unique_stems` checks that photos have distinct file stems (outputs and masks are matched by stem).

Every error names the argument and the value (``FileNotFoundError`` / ``ValueError``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLike",
    "MaskLike",
    "list_images",
    "load_image",
    "load_mask",
    "open_image",
    "check_same_size",
    "check_unique_stems",
    "find_mask_for",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

logger = logging.getLogger(__name__)

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray
MaskLike = str | os.PathLike[str] | Image.Image | np.ndarray


def open_image(path: str | os.PathLike[str], arg_name: str = "image") -> Image.Image:
    """Open ``path`` with PIL and apply its EXIF orientation (the pixels are decoded here).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an image PIL can read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"`{arg_name}` file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"`{arg_name}` must be an image file, but {str(path)!r} is a folder.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return ImageOps.exif_transpose(img) if _has_orientation(img) else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"`{arg_name}` file {str(path)!r} is not a readable image: {exc}") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"`{arg_name}` file {str(path)!r} is larger than PIL's safety limit ({exc}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from exc


def _has_orientation(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (None, 1)
    except Exception:  # malformed EXIF: keep the pixels as stored
        return False


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Integer or float pixel values to uint8 (16-bit and wider are scaled by their range, floats by 255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(finite * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        # uint16 is a 16-bit image whatever its values; other integer arrays are 8-bit unless they exceed 255
        if arr.dtype != np.uint16 and arr.max(initial=0) <= 255:
            return np.clip(arr, 0, 255).astype(np.uint8)
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported pixel dtype {arr.dtype}")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = _scale_to_uint8(np.clip(arr, 0, 65535).astype(np.uint16))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = _scale_to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_image(image: ImageLike, arg_name: str = "image") -> np.ndarray:
    """Load ``image`` as an ``(H, W, 3)`` uint8 RGB array (EXIF orientation applied for files).

    Accepts a path, a PIL image (any mode) or an array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``
    (alpha dropped) of uint8, uint16 or float in [0, 1].
    """
    if isinstance(image, str | os.PathLike):
        return _pil_to_rgb(open_image(image, arg_name))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(
                f"`{arg_name}` must be an array of shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(image.shape)}."
            )
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"`{arg_name}` is empty: shape {tuple(image.shape)}.")
        return np.ascontiguousarray(_scale_to_uint8(arr[:, :, :3]))
    raise TypeError(f"`{arg_name}` must be a path, a PIL image or a numpy array, got {type(image).__name__}.")


def _pil_mask(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min(initial=255) < 255:  # a real alpha channel: it is the mask
            return alpha > 0
        base = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}[mode]
        img = img.convert(base) if base != "P" else img.convert("P")
        mode = img.mode
    if mode == "P":  # a label map: palette index 0 is background, whatever its colour
        return np.asarray(img) != 0
    if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.asarray(img) != 0
    if mode in ("RGB", "YCbCr", "LAB", "HSV", "CMYK"):
        arr = np.asarray(img.convert("RGB"))
        return arr.any(axis=2)
    return np.asarray(img.convert("L")) != 0


def _warn_lossy_mask(img: Image.Image, path: str | os.PathLike[str], arg_name: str) -> None:
    """Log a warning when a JPEG mask holds faint values: compression noise that counts as foreground."""
    gray = np.asarray(img.convert("L"))
    faint = int(np.count_nonzero((gray > 0) & (gray < 128)))
    if faint:
        logger.warning(
            "`%s` %r is a JPEG: lossy compression leaves faint nonzero pixels (%d here, values 1-127) around the "
            "object, and every nonzero pixel counts as foreground. Save masks as PNG.", arg_name, os.fspath(path),
            faint,
        )


def load_mask(mask: MaskLike, arg_name: str = "mask") -> np.ndarray:
    """Load ``mask`` as an ``(H, W)`` bool array, foreground = nonzero (see the module docstring for formats)."""
    if isinstance(mask, str | os.PathLike):
        img = open_image(mask, arg_name)
        if img.format == "JPEG" or Path(mask).suffix.lower() in (".jpg", ".jpeg"):
            _warn_lossy_mask(img, mask, arg_name)
        return _pil_mask(img)
    if isinstance(mask, Image.Image):
        return _pil_mask(mask)
    if isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 3 and arr.shape[2] in (2, 4):
            alpha = arr[:, :, -1]
            full = 1.0 if np.issubdtype(arr.dtype, np.floating) and alpha.max(initial=0) <= 1.0 else (
                np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else 255
            )
            if arr.dtype == bool or alpha.min(initial=full) < full:
                return np.asarray(alpha != 0)
            arr = arr[:, :, :-1]
        if arr.ndim == 3:
            return np.asarray((arr != 0).any(axis=2))
        if arr.ndim == 2:
            return np.asarray(arr != 0)
        raise ValueError(
            f"`{arg_name}` must be an array of shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(mask.shape)}."
        )
    raise TypeError(f"`{arg_name}` must be a path, a PIL image or a numpy array, got {type(mask).__name__}.")


def check_same_size(
    image_hw: Sequence[int], mask_hw: Sequence[int], image_arg: str = "image", mask_arg: str = "mask"
) -> None:
    """Raise ``ValueError`` naming both sizes when a mask's (H, W) differs from its image's (never resized)."""
    if tuple(image_hw[:2]) != tuple(mask_hw[:2]):
        raise ValueError(
            f"`{mask_arg}` has size (H, W) = {tuple(mask_hw[:2])} but `{image_arg}` has {tuple(image_hw[:2])}; "
            "a mask must have exactly its image's size (it is not resized silently)."
        )


def list_images(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], arg_name: str = "images"
) -> list[Path]:
    """The image files in a folder (sorted by name, hidden files skipped), or the given files checked one by one.

    Raises:
        FileNotFoundError: the folder or a listed file does not exist.
        ValueError: the folder holds no image (extensions: ``IMAGE_EXTENSIONS``).
    """
    if isinstance(source, str | os.PathLike):
        sources = [Path(source)]
    else:
        sources = [Path(s) for s in source]
    if not sources:
        raise ValueError(f"`{arg_name}` is empty: give a folder or at least one image file.")
    out: list[Path] = []
    for src in sources:
        if not src.exists():
            raise FileNotFoundError(f"`{arg_name}`: {str(src)!r} does not exist.")
        if src.is_dir():
            files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if skipped:
                logger.info("`%s`: skipped %d file(s) in %s that are not images (%s): %s", arg_name, len(skipped),
                            src, ", ".join(IMAGE_EXTENSIONS), ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5
                                                                                       else ""))
            if not found:
                raise ValueError(
                    f"`{arg_name}`: folder {str(src)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})."
                )
            out.extend(found)
        else:
            out.append(src)
    return out


def check_unique_stems(
    paths: Sequence[str | os.PathLike[str]], arg_name: str = "images", reserved: Iterable[str] = ()
) -> list[str]:
    """The file stems of ``paths``, checked to be distinct (case-insensitively) and not ``reserved``.

    Outputs (and masks) are matched to photos by stem, so ``a.jpg`` and ``a.png`` (or ``A.jpg`` on a
    case-insensitive disk) would overwrite each other.

    Raises:
        ValueError: two paths share a stem, or a stem is reserved; the message names the files.
    """
    seen: dict[str, Path] = {}
    reserved_cf = {r.casefold(): r for r in reserved}
    stems = []
    for raw in paths:
        path = Path(raw)
        key = path.stem.casefold()
        if key in reserved_cf:
            raise ValueError(
                f"`{arg_name}`: {str(path)!r} would be saved as {path.stem!r}, a name this command uses for its own "
                f"output ({reserved_cf[key]!r}); rename the file."
            )
        if key in seen:
            raise ValueError(
                f"`{arg_name}`: {str(seen[key])!r} and {str(path)!r} have the same name stem {path.stem!r}; outputs "
                "are named by stem and would overwrite each other. Rename one, or run them separately."
            )
        seen[key] = path
        stems.append(path.stem)
    return stems


def find_mask_for(image_path: str | os.PathLike[str], mask_dir: str | os.PathLike[str]) -> Path | None:
    """The mask in ``mask_dir`` with the same stem as ``image_path`` (any image extension), or ``None``."""
    stem = Path(image_path).stem
    mask_dir = Path(mask_dir)
    for ext in (".png", *[e for e in IMAGE_EXTENSIONS if e != ".png"]):
        for cand in (mask_dir / f"{stem}{ext}", mask_dir / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None
