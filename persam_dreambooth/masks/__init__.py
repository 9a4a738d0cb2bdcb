"""Mask sets (the hand-off between segmentation and training) and the mask operations training needs.

``MaskSet`` reads/writes a folder of per-image masks plus ``masks.json``; ``ops`` has dilation, feathering,
latent-resolution area averaging and coverage
(``bbox`` comes from ``utils.mask_geometry``); ``make`` builds a mask set with PerSAM(-F).
"""

from persam_dreambooth.masks.ops import coverage, dilate, feather, to_latent_resolution
from persam_dreambooth.masks.store import MASKS_JSON, MaskSet
from persam_dreambooth.utils.mask_geometry import bbox

__all__ = ["MASKS_JSON", "MaskSet", "bbox", "coverage", "dilate", "feather", "to_latent_resolution"]
