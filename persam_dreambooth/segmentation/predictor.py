"""Encode images once, decode prompts many times: a stateless ``SamPredictor`` with the guided decoder.

:class:`GuidedSamPredictor` does what ``segment_anything.SamPredictor`` does (same resize, same normalisation and
padding, same prompt transforms, same post-processing), but the image embedding is a value
(:class:`ImageEmbedding`) you pass to :meth:`~GuidedSamPredictor.predict` rather than hidden state. So embeddings
can be cached, batched or reused for several references, and the decoder accepts PerSAM's ``attn_sim`` and
``target_embedding``. With neither, :meth:`~GuidedSamPredictor.predict` returns exactly ``SamPredictor.predict``'s
numbers.

Shapes: ``C`` channels, ``h, w`` embedding grid, ``h_lr, w_lr`` low-res mask size (4x the grid), ``H, W`` original
image, ``K`` masks per call (3 with ``multimask_output``, else 1), ``N`` points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from persam_dreambooth.data.images import ImageLike, load_image
from persam_dreambooth.segmentation.guided_decoder import GuidedMaskDecoder

__all__ = ["ImageEmbedding", "DecoderOutput", "GuidedSamPredictor"]


@dataclass(frozen=True)
class ImageEmbedding:
    """One encoded image.

    Attributes:
        features: ``(C, h, w)`` image-encoder output (on the model's device unless moved).
        original_size: ``(H, W)`` of the image as given.
        input_size: ``(h', w')`` of the resized image inside SAM's square frame.
    """

    features: Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    def to(self, device: str | torch.device) -> ImageEmbedding:
        """The same embedding with ``features`` on ``device`` (e.g. ``"cpu"`` for a cache)."""
        return ImageEmbedding(self.features.to(device), self.original_size, self.input_size)


@dataclass
class DecoderOutput:
    """What one decoder call returns.

    Attributes:
        low_res_logits: ``(K, h_lr, w_lr)`` mask logits; feed one back as ``mask_input``.
        iou_predictions: ``(K,)`` SAM's predicted IoU of each mask.
        high_res_logits: ``(K, H, W)`` logits at the original resolution if requested, else ``None``.
    """

    low_res_logits: Tensor
    iou_predictions: Tensor
    high_res_logits: Tensor | None = None

    @property
    def best(self) -> int:
        """Index of the mask with the highest predicted IoU (first one on ties)."""
        return int(torch.argmax(self.iou_predictions))


class GuidedSamPredictor:
    """Encode with SAM's image encoder; decode prompts with a guided copy of SAM's mask decoder.

    Args:
        sam: any ``segment_anything.modeling.Sam`` (any size); it is used, not modified. Its decoder weights are
            copied into a :class:`GuidedMaskDecoder` now, so later changes to ``sam.mask_decoder`` are not seen.
    """

    def __init__(self, sam: Sam) -> None:
        if not isinstance(sam, Sam):
            raise TypeError(f"`sam` must be a segment_anything Sam, got {type(sam).__name__}.")
        self.sam = sam
        self.decoder = GuidedMaskDecoder.from_decoder(sam.mask_decoder)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def frame_size(self) -> int:
        """SAM's square input side ``S`` (1024 for the released models)."""
        return int(self.sam.image_encoder.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The embedding grid ``(h, w)`` (64x64 for the released models)."""
        return tuple(self.sam.prompt_encoder.image_embedding_size)  # type: ignore[return-value]

    @property
    def low_res_size(self) -> tuple[int, int]:
        """The low-res mask size ``(h_lr, w_lr)`` (256x256 for the released models)."""
        return tuple(self.sam.prompt_encoder.mask_input_size)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------ encoding
    def prepare(self, image: ImageLike, arg_name: str = "image") -> tuple[Tensor, tuple[int, int]]:
        """Resize an image like ``SamPredictor.set_image`` (PIL bilinear to long side ``S``, uint8).

        Returns:
            ``(resized (3, h', w') uint8 on the model's device, original_size (H, W))``.

        Raises:
            ValueError: the image is unreadable, or so thin that its resized short side would be 0 pixels.
        """
        array = load_image(image, arg_name)  # (H, W, 3) uint8 RGB
        original_size = (int(array.shape[0]), int(array.shape[1]))
        if min(ResizeLongestSide.get_preprocess_shape(*original_size, self.frame_size)) < 1:
            raise ValueError(
                f"`{arg_name}` has size (H, W) = {original_size}: resized to SAM's {self.frame_size}-px input frame "
                f"its short side would be 0 pixels; the long side may be at most {2 * self.frame_size}x the "
                "short side. Crop or pad the image."
            )
        resized = self.transform.apply_image(array)  # (h', w', 3) uint8
        del array
        tensor = torch.as_tensor(resized, device=self.device)
        tensor = tensor.permute(2, 0, 1).contiguous()  # (h', w', 3) -> (3, h', w')
        return tensor, original_size

    @torch.no_grad()
    def encode_prepared(
        self, images: Sequence[Tensor], original_sizes: Sequence[tuple[int, int]]
    ) -> list[ImageEmbedding]:
        """Run the image encoder once on a batch of :meth:`prepare` outputs (normalised and padded by ``Sam``).

        Shapes: each image ``(3, h'_i, w'_i)`` uint8 -> one ``ImageEmbedding`` with features ``(C, h, w)``.
        """
        batch = torch.stack([self.sam.preprocess(img[None].float())[0] for img in images])  # (B, 3, S, S)
        features = self.sam.image_encoder(batch)  # (B, C, h, w)
        return [
            ImageEmbedding(features[i], tuple(osz), (int(img.shape[-2]), int(img.shape[-1])))  # type: ignore[arg-type]
            for i, (img, osz) in enumerate(zip(images, original_sizes, strict=True))
        ]

    def encode(self, image: ImageLike, arg_name: str = "image") -> ImageEmbedding:
        """Encode one image (path, PIL image or ``(H, W, 3)`` uint8 array) exactly as ``SamPredictor.set_image``."""
        tensor, original_size = self.prepare(image, arg_name)
        return self.encode_prepared([tensor], [original_size])[0]

    def encode_batch(self, images: Sequence[ImageLike], arg_name: str = "images") -> list[ImageEmbedding]:
        """Encode several images in one encoder call (may differ from :meth:`encode` by float rounding)."""
        prepared = [self.prepare(img, f"{arg_name}[{i}]") for i, img in enumerate(images)]
        return self.encode_prepared([p[0] for p in prepared], [p[1] for p in prepared])

    # ------------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def predict(
        self,
        embedding: ImageEmbedding,
        point_coords: Tensor | np.ndarray | None = None,
        point_labels: Tensor | np.ndarray | None = None,
        box: Tensor | np.ndarray | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
        attn_sim: Tensor | None = None,
        target_embedding: Tensor | None = None,
        return_high_res: bool = False,
    ) -> DecoderOutput:
        """Decode prompts on an encoded image (``SamPredictor.predict`` without re-encoding, plus the injections).

        Args:
            embedding: from :meth:`encode`.
            point_coords: ``(N, 2)`` points ``(x, y)`` in original-image pixels; point_labels ``(N,)`` 1/0.
            box: ``(4,)`` ``[x0, y0, x1, y1]`` in original-image pixels.
            mask_input: ``(1, h_lr, w_lr)`` low-res logits from a previous call.
            multimask_output: 3 masks (tokens 1..3) if True, else 1 (token 0).
            attn_sim: ``(1, 1, 1, h*w)`` target-guided attention prior, or ``None``.
            target_embedding: ``(1, 1, C)`` target-semantic prompt, or ``None``.
            return_high_res: also upscale all K masks to ``(K, H, W)`` logits (memory: K*H*W floats).
        """
        out = self.predict_batch(
            [embedding],
            None if point_coords is None else [point_coords],
            None if point_labels is None else [point_labels],
            boxes=None if box is None else [box],
            mask_inputs=None if mask_input is None else [mask_input],
            multimask_output=multimask_output,
            attn_sim=attn_sim,
            target_embedding=target_embedding,
        )[0]  # one image: SamPredictor.predict's operations exactly
        if return_high_res:
            out.high_res_logits = self.upscale(out.low_res_logits, embedding)
        return out

    @torch.no_grad()
    def predict_batch(
        self,
        embeddings: Sequence[ImageEmbedding],
        point_coords: Sequence[Tensor | np.ndarray] | None = None,
        point_labels: Sequence[Tensor | np.ndarray] | None = None,
        boxes: Sequence[Tensor | np.ndarray] | None = None,
        mask_inputs: Sequence[Tensor] | None = None,
        multimask_output: bool = True,
        attn_sim: Tensor | None = None,
        target_embedding: Tensor | None = None,
    ) -> list[DecoderOutput]:
        """:meth:`predict` for ``B`` images in one decoder call: prompt ``i`` is decoded on image ``i``.

        Every image must get the same kind of prompt (the same number of points; boxes for all or none; mask inputs
        for all or none), since the decoder's token count is shared by the batch. With ``B = 1`` the operations are
        :meth:`predict`'s (bit-identical); with ``B > 1`` the numbers agree to float rounding.

        Args:
            embeddings: ``B`` encoded images (their sizes may differ).
            point_coords: ``B`` arrays ``(N, 2)`` in each image's pixels; point_labels ``B`` arrays ``(N,)``.
            boxes: ``B`` boxes ``(4,)``; mask_inputs: ``B`` tensors ``(1, h_lr, w_lr)``.
            attn_sim: ``(B, 1, 1, h*w)`` one prior per image (or ``(1, 1, 1, h*w)`` shared), or ``None``.
            target_embedding: ``(1, 1, C)`` shared by the batch, or ``None``.

        Returns:
            One :class:`DecoderOutput` per image (no high-res logits; use :meth:`upscale`).
        """
        count = len(embeddings)
        if count == 0:
            raise ValueError("`embeddings` must hold at least one image.")
        for name, values in (("point_coords", point_coords), ("point_labels", point_labels), ("boxes", boxes),
                             ("mask_inputs", mask_inputs)):
            if values is not None and len(values) != count:
                raise ValueError(f"`{name}` must hold one entry per image ({count}), got {len(values)}.")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("`point_coords` and `point_labels` must be given together (or neither), got "
                             f"{'only point_coords' if point_labels is None else 'only point_labels'}.")
        points = boxes_t = masks = None
        if point_coords is not None and point_labels is not None:
            coords, labels = [], []
            for emb, pts, lbl in zip(embeddings, point_coords, point_labels, strict=True):
                # float64 transform, then float32: SamPredictor.predict's arithmetic (identical numbers)
                arr = np.asarray(torch.as_tensor(pts).cpu(), dtype=np.float64)
                coords.append(torch.as_tensor(self.transform.apply_coords(arr, emb.original_size),
                                              dtype=torch.float, device=self.device))  # (N, 2)
                labels.append(torch.as_tensor(np.asarray(torch.as_tensor(lbl).cpu()), dtype=torch.int,
                                              device=self.device))  # (N,)
            points = (torch.stack(coords), torch.stack(labels))  # (B, N, 2), (B, N)
        if boxes is not None:
            rows = []
            for emb, box in zip(embeddings, boxes, strict=True):
                b = np.asarray(torch.as_tensor(box).cpu(), dtype=np.float64).reshape(-1, 4)  # (4,) -> (1, 4)
                rows.append(torch.as_tensor(self.transform.apply_boxes(b, emb.original_size), dtype=torch.float,
                                            device=self.device))
            boxes_t = torch.cat(rows)  # B x (1, 4) -> (B, 4)
        if mask_inputs is not None:
            masks = torch.stack([
                m.to(device=self.device, dtype=torch.float).reshape(1, *m.shape[-2:]) for m in mask_inputs
            ])  # B x (1, h_lr, w_lr) -> (B, 1, h_lr, w_lr)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes_t, masks=masks)
        features = torch.stack([emb.features.to(self.device) for emb in embeddings])  # (B, C, h, w)
        low_res, iou = self.decoder(
            image_embeddings=features,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            attn_sim=attn_sim,
            target_embedding=target_embedding,
        )  # (B, K, h_lr, w_lr), (B, K)
        return [DecoderOutput(low_res_logits=low_res[i], iou_predictions=iou[i]) for i in range(count)]

    @torch.no_grad()
    def upscale(self, low_res_logits: Tensor, embedding: ImageEmbedding) -> Tensor:
        """``(K, h_lr, w_lr)`` logits -> ``(K, H, W)`` with ``Sam.postprocess_masks`` (threshold at 0 for masks)."""
        out = self.sam.postprocess_masks(
            low_res_logits[None], embedding.input_size, embedding.original_size
        )  # (1, K, h_lr, w_lr) -> (1, K, H, W)
        return out[0]

    @torch.no_grad()
    def upscale_mask(self, low_res_logits: Tensor, embedding: ImageEmbedding) -> Tensor:
        """``(h_lr, w_lr)`` logits of one mask -> ``(H, W)`` bool mask (``logits > sam.mask_threshold``)."""
        return self.upscale(low_res_logits[None], embedding)[0] > self.sam.mask_threshold
