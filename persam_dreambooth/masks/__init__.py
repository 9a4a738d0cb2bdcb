"""Mask sets (the hand-off between segmentation and training) and the mask operations training needs.

``MaskSet`` reads/writes a folder of per-image masks plus ``masks.json``; ``ops`` has dilation, feathering,
latent-resolution area averaging, coverage and bounding boxes; ``make`` builds a mask set with PerSAM(-F).
"""

from persam_dreambooth.masks.ops import bbox, coverage, dilate, feather, to_latent_resolution
from persam_dreambooth.masks.store import MASKS_JSON, MaskSet

__all__ = ["MASKS_JSON", "MaskSet", "bbox", "coverage", "dilate", "feather", "to_latent_resolution"]
