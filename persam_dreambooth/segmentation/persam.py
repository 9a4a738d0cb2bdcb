"""PerSAM: training-free one-shot personalised segmentation with SAM (docs/design/persam_method.md §3, Decisions 1-5).

    persam = PerSAM(sam)
    persam.set_reference(ref_image, ref_mask)   # encodes the reference once (or lists: several shots)
    result = persam.segment(image)               # -> Segmentation
    found = persam.segment(image, max_instances=3)   # -> list[Segmentation], one per instance

The pieces are separate so that callers can reuse them: :class:`~.predictor.GuidedSamPredictor` encodes images into
:class:`~.predictor.ImageEmbedding` values and decodes prompts; :meth:`PerSAM.set_reference_embedding`,
:meth:`PerSAM.segment_embedding` and :meth:`PerSAM.segment_embeddings` accept embeddings computed elsewhere (cached,
batched); :func:`~.cascade.persam_cascade` runs the three decoder passes for one embedding and one target vector,
optionally on a caller-given similarity map, and :func:`~.cascade.persam_cascade_batch` runs each pass for several
images in one decoder call. Several instances: :mod:`~.multi_instance`. PerSAM-F (same interface): :mod:`~.persam_f`.
A reference marked by a box or a click instead of a mask: :mod:`~.reference_prompt`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
from segment_anything.modeling import Sam
from torch import Tensor

from persam_dreambooth.data.images import ImageLike, MaskLike, check_same_size, load_image, load_mask
from persam_dreambooth.segmentation.cascade import (
    Segmentation,
    location_confidence,
    persam_cascade_batch,
)
from persam_dreambooth.segmentation.location_prior import target_embedding
from persam_dreambooth.segmentation.multi_instance import (
    DEFAULT_OVERLAP_IOU,
    DEFAULT_SIMILARITY_THRESHOLD,
    find_instances,
)
from persam_dreambooth.segmentation.predictor import GuidedSamPredictor, ImageEmbedding
from persam_dreambooth.segmentation.reference_mask import ReferenceCells, reference_cells

__all__ = ["PerSAM", "PerSAMReference", "ReferenceShot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceShot:
    """One reference image, encoded.

    Attributes:
        embedding: the reference image's :class:`ImageEmbedding`.
        mask: ``(H, W)`` bool reference mask.
        cells: the mask on the embedding grid (:func:`~.reference_mask.reference_cells`).
    """

    embedding: ImageEmbedding
    mask: np.ndarray
    cells: ReferenceCells


@dataclass(frozen=True)
class PerSAMReference:
    """The reference (one or several shots), encoded once.

    Attributes:
        shots: the reference images in the order given (one for the paper's one-shot setting).
        target: ``(C,)`` raw target vector pooled over all shots' cells (mean for PerSAM; un-normalised: the semantic
            prompt uses it as is, the similarity its normalised copy).
    """

    shots: tuple[ReferenceShot, ...]
    target: Tensor

    @property
    def embedding(self) -> ImageEmbedding:
        """The first shot's embedding (the only one in the one-shot setting)."""
        return self.shots[0].embedding

    @property
    def mask(self) -> np.ndarray:
        """The first shot's ``(H, W)`` bool mask."""
        return self.shots[0].mask

    @property
    def cells(self) -> ReferenceCells:
        """The first shot's grid cells."""
        return self.shots[0].cells


def _reference_pairs(image: Any, mask: Any) -> tuple[list[Any], list[Any], list[tuple[str, str]], bool]:
    """Split ``set_reference``'s arguments into shots: ``(images, masks, [(image_name, mask_name)], several)``."""
    several = isinstance(image, (list, tuple))
    if not several:
        if isinstance(mask, (list, tuple)):
            raise TypeError("`mask` is a list but `image` is not: give one image and one mask, or two lists.")
        return [image], [mask], [("image", "mask")], False
    if not isinstance(mask, (list, tuple)):
        raise TypeError(f"`image` is a list of {len(image)}, so `mask` must be a list of as many masks, got "
                        f"{type(mask).__name__}.")
    if len(image) != len(mask) or not image:
        raise ValueError(f"`image` and `mask` must be lists of the same length >= 1, got {len(image)} images and "
                         f"{len(mask)} masks.")
    names = [(f"image[{i}]", f"mask[{i}]") for i in range(len(image))]
    return list(image), list(mask), names, True


class PerSAM:
    """Personalised SAM: find the reference object in new images (training-free).

    Args:
        sam: any ``segment_anything.modeling.Sam`` (any size) on its device, in eval mode. It is not modified.

    Example::

        persam = PerSAM(load_sam("vit_h"))
        persam.set_reference(ref_image, ref_mask)
        result = persam.segment(image)   # result.mask: (H, W) bool
    """

    #: how the reference cells are pooled into the target (:func:`~.location_prior.target_embedding`)
    pooling: Literal["mean", "max_mean"] = "mean"

    def __init__(self, sam: Sam) -> None:
        self.predictor = GuidedSamPredictor(sam)
        self._reference: PerSAMReference | None = None  # set by set_reference

    @property
    def sam(self) -> Sam:
        return self.predictor.sam

    @property
    def reference(self) -> PerSAMReference:
        """The current reference; ``RuntimeError`` before :meth:`set_reference`."""
        if self._reference is None:
            raise RuntimeError("Call `set_reference(image, mask)` before `segment`.")
        return self._reference

    def encode(self, image: ImageLike, arg_name: str = "image") -> ImageEmbedding:
        """Encode an image with SAM's image encoder (see :meth:`GuidedSamPredictor.encode`)."""
        return self.predictor.encode(image, arg_name)

    def set_reference(
        self, image: ImageLike | Sequence[ImageLike], mask: MaskLike | Sequence[MaskLike]
    ) -> PerSAMReference:
        """Encode the reference image(s) and pool the features inside the mask(s) into the target vector.

        Args:
            image: ``(H, W, 3)`` uint8 RGB array, PIL image or path (EXIF orientation applied); or a list/tuple of
                them for several reference shots.
            mask: ``(H, W)`` bool, 0/1, 0/255 array, PIL L/P/RGB/RGBA (alpha) image or path; foreground = nonzero.
                A list/tuple of as many masks when ``image`` is a list.

        Several shots: the target is pooled over all shots' target cells together (see
        :func:`~.location_prior.target_embedding`); one shot in a list gives exactly the one-shot result.

        Raises:
            ValueError: a mask's size differs from its image's (both are named, with the shot index), a mask is
                empty, or the lists differ in length. TypeError: one argument is a list and the other is not.
        """
        images, masks, names, several = _reference_pairs(image, mask)
        arrays, bool_masks = [], []
        for img, msk, (image_name, mask_name) in zip(images, masks, names, strict=True):
            array = load_image(img, image_name)
            bool_mask = load_mask(msk, mask_name)
            check_same_size(array.shape, bool_mask.shape, image_name, mask_name)
            if not bool_mask.any():
                raise ValueError(
                    f"`{mask_name}` is empty: it has no foreground pixel, so there is no reference object."
                )
            arrays.append(array)
            bool_masks.append(bool_mask)
        # every shot is validated before the encoder runs on any
        embeddings = [self.predictor.encode(array, name) for array, (name, _) in zip(arrays, names, strict=True)]
        del arrays
        if several:
            return self.set_reference_embedding(embeddings, bool_masks)
        return self.set_reference_embedding(embeddings[0], bool_masks[0])

    def set_reference_embedding(
        self, embedding: ImageEmbedding | Sequence[ImageEmbedding], mask: MaskLike | Sequence[MaskLike]
    ) -> PerSAMReference:
        """Like :meth:`set_reference` for images already encoded by this PerSAM's SAM (one, or a list of shots)."""
        embeddings, masks, names, several = _reference_pairs(embedding, mask)
        shots = []
        for emb, msk, (image_name, mask_name) in zip(embeddings, masks, names, strict=True):
            if not isinstance(emb, ImageEmbedding):
                raise TypeError(f"`{image_name.replace('image', 'embedding')}` must be an ImageEmbedding, got "
                                f"{type(emb).__name__}.")
            bool_mask = load_mask(msk, mask_name)
            check_same_size(emb.original_size, bool_mask.shape, image_name, mask_name)
            cells = reference_cells(bool_mask, self.predictor.frame_size, self.predictor.grid_size, arg_name=mask_name)
            shots.append(ReferenceShot(embedding=emb, mask=bool_mask, cells=cells))
        features = [shot.embedding.features.to(self.predictor.device) for shot in shots]
        cell_masks = [shot.cells.cells.to(self.predictor.device) for shot in shots]
        if several:
            target = target_embedding(features, cell_masks, pooling=self.pooling)  # (C,), all shots' cells pooled
        else:
            target = target_embedding(features[0], cell_masks[0], pooling=self.pooling)  # (C,)
        self._reference = self._make_reference(tuple(shots), target)
        return self._reference

    def _make_reference(self, shots: tuple[ReferenceShot, ...], target: Tensor) -> PerSAMReference:
        """Build the reference object (PerSAM-F overrides this to fit its weights)."""
        return PerSAMReference(shots=shots, target=target)

    # ------------------------------------------------------------------------------------------------ segmenting
    def similarity(self, embedding: ImageEmbedding) -> Tensor:
        """The location confidence ``(H, W)`` of the reference in an encoded image (on the model's device)."""
        return location_confidence(self.predictor, embedding, self.reference.target)

    def _cascade_batch(
        self, embeddings: Sequence[ImageEmbedding], similarities: Sequence[Tensor | None] | None = None
    ) -> list[Segmentation]:
        """The method's cascade on several embeddings (one decoder call per stage)."""
        return persam_cascade_batch(self.predictor, embeddings, self.reference.target, similarities)

    @overload
    def segment_embedding(self, embedding: ImageEmbedding, max_instances: None = None, *,
                          similarity_threshold: float = ..., overlap_iou: float = ...) -> Segmentation: ...

    @overload
    def segment_embedding(self, embedding: ImageEmbedding, max_instances: int, *,
                          similarity_threshold: float = ..., overlap_iou: float = ...) -> list[Segmentation]: ...

    def segment_embedding(
        self,
        embedding: ImageEmbedding,
        max_instances: int | None = None,
        *,
        similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
        overlap_iou: float = DEFAULT_OVERLAP_IOU,
    ) -> Segmentation | list[Segmentation]:
        """Segment the reference object in an already-encoded image (no encoder call).

        ``max_instances=None``: one :class:`Segmentation` (the paper's single-instance result). An int ``k >= 1``: a
        list of 1..k instances in the order found (:func:`~.multi_instance.find_instances` explains the search and
        ``similarity_threshold`` / ``overlap_iou``).
        """
        if max_instances is None:
            return self._cascade_batch([embedding])[0]
        return self.segment_embeddings(
            [embedding], max_instances, similarity_threshold=similarity_threshold, overlap_iou=overlap_iou
        )[0]

    def segment_embeddings(
        self,
        embeddings: Sequence[ImageEmbedding],
        max_instances: int | None = None,
        *,
        similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
        overlap_iou: float = DEFAULT_OVERLAP_IOU,
    ) -> list[Segmentation] | list[list[Segmentation]]:
        """:meth:`segment_embedding` for several images, each cascade stage one decoder call for all of them.

        Results agree with :meth:`segment_embedding` image by image to float rounding (the fp32 one-image path stays
        the reference). Returns one entry per embedding: a :class:`Segmentation`, or with ``max_instances`` a list.
        """
        embeddings = list(embeddings)
        if not embeddings:
            return []
        if max_instances is None:
            return self._cascade_batch(embeddings)
        return find_instances(
            self._cascade_batch, self.similarity, embeddings, max_instances,
            similarity_threshold=similarity_threshold, overlap_iou=overlap_iou,
        )

    @overload
    def segment(self, image: ImageLike, max_instances: None = None, *,
                similarity_threshold: float = ..., overlap_iou: float = ...) -> Segmentation: ...

    @overload
    def segment(self, image: ImageLike, max_instances: int, *,
                similarity_threshold: float = ..., overlap_iou: float = ...) -> list[Segmentation]: ...

    def segment(
        self,
        image: ImageLike,
        max_instances: int | None = None,
        *,
        similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
        overlap_iou: float = DEFAULT_OVERLAP_IOU,
    ) -> Segmentation | list[Segmentation]:
        """Segment the reference object in ``image`` (path, PIL image or ``(H, W, 3)`` uint8 array).

        The reference embedding is reused: only ``image`` is encoded. Never raises on an empty intermediate mask
        (see :class:`Segmentation`.fallbacks). ``max_instances``: see :meth:`segment_embedding`; with it, each
        instance's ``seconds`` is its own cascade and the first one's also covers the encoding.
        """
        self.reference  # noqa: B018  (raises before encoding when no reference is set)
        start = time.perf_counter()
        embedding = self.predictor.encode(image, "image")
        encoded = time.perf_counter() - start
        result = self.segment_embedding(
            embedding, max_instances, similarity_threshold=similarity_threshold, overlap_iou=overlap_iou
        )
        if isinstance(result, Segmentation):
            result.seconds = time.perf_counter() - start
        elif result:
            result[0].seconds += encoded
        return result
