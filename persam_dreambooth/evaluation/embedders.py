"""The metric models: DINO ViT-S/16 image embeddings and CLIP image/text embeddings (Hub ids or local folders).

Each model is used the way DreamBooth's metrics need it:

* DINO: ``ViTModel`` (any ``AutoModel`` works) and the model's own image processor; the embedding is the CLS token
  of the last hidden state (after the final layer norm), ``last_hidden_state[:, 0]``, which is what DINO's own
  ``VisionTransformer.forward`` returns. Not ``pooler_output``: for ``ViTModel`` that adds a dense + tanh layer that
  DINO never had (``facebook/dino-vits16`` ships no pooler weights, so transformers would initialise it at random).
  A ViT is therefore loaded with ``add_pooling_layer=False``.
* CLIP: ``CLIPModel.get_image_features`` / ``get_text_features`` (the projected embeddings) with the model's
  ``CLIPProcessor``; texts longer than the text encoder's 77 tokens are truncated.

Loading failures (no network, unknown id) become :class:`MetricModelError` with an offline hint, so ``compare`` can
fail before generating anything; ``compare`` names its flag in the message (:meth:`MetricModelError.naming`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persam_dreambooth.evaluation.compare_config import DEFAULT_CLIP, DEFAULT_DINO
from persam_dreambooth.generation.pipeline import offline_hint

__all__ = ["MetricModelError", "DinoEmbedder", "ClipEmbedder"]

logger = logging.getLogger(__name__)

_LOCAL = "a local folder holding the model and its processor files"


class MetricModelError(RuntimeError):
    """A metric model cannot be loaded; the message names the model, why, and how to get it offline.

    Attributes:
        kind: ``"DINO"`` or ``"CLIP"``.
        model_id: the Hub id or folder that failed.
        reason: the loader's first line.
    """

    def __init__(self, kind: str, model_id: str, reason: str, flag: str | None = None) -> None:
        self.kind, self.model_id, self.reason = kind, model_id, reason
        if flag is None:
            hint = (f"Download it first on a machine with internet (`hf download {model_id}`) into the Hugging Face "
                    f"cache, or pass {_LOCAL} instead of the id.")
            super().__init__(f"Could not load the {kind} model {model_id!r}: {reason}. {hint}")
        else:
            super().__init__(f"Could not load the {kind} model `{flag} {model_id}`: {reason}. "
                             + offline_hint(model_id, flag, local=_LOCAL))

    def naming(self, flag: str) -> MetricModelError:
        """The same error, naming the flag the model id came from (``--dino-model``)."""
        return MetricModelError(self.kind, self.model_id, self.reason, flag)


def _load_error(kind: str, model_id: str, exc: Exception) -> MetricModelError:
    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return MetricModelError(kind, model_id, first)


def _check_local(kind: str, model_id: str) -> None:
    looks_local = model_id.startswith((".", "/", "~")) or Path(model_id).exists()
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise FileNotFoundError(f"The {kind} model folder {model_id!r} does not exist.")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DinoEmbedder:
    """DINO CLS embeddings of images.

    Args:
        model_id: Hub id or local folder (model + image processor), default ``facebook/dino-vits16``.
        device: where to run the model.
        batch_size: images per forward pass.

    Raises:
        FileNotFoundError: ``model_id`` looks like a folder that does not exist.
        MetricModelError: the model cannot be loaded.
    """

    def __init__(self, model_id: str = DEFAULT_DINO, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        _check_local("DINO", model_id)
        try:
            config = AutoConfig.from_pretrained(model_id)
            extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
            self.model = AutoModel.from_pretrained(model_id, **extra).eval().to(device)
            self.processor = AutoImageProcessor.from_pretrained(model_id)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error("DINO", model_id, exc) from exc
        self.model_id, self.device, self.batch_size = model_id, device, batch_size

    def to(self, device: str) -> DinoEmbedder:
        self.model.to(device)
        self.device = device
        return self

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """CLS embeddings.

        Shapes:
            ``images``: N arrays ``(H, W, 3)`` uint8 (sizes may differ) -> ``(N, D)`` float32 on the CPU.
        """
        if not images:
            raise ValueError("`images` must hold at least one image.")
        out = []
        for chunk in _batches(images, self.batch_size):
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, 1 + tokens, D)
            out.append(hidden[:, 0].float().cpu())  # CLS token: (B, D)
        return torch.cat(out)


class ClipEmbedder:
    """CLIP image and text embeddings (the projected features CLIP compares).

    Args:
        model_id: Hub id or local folder (``CLIPModel`` + ``CLIPProcessor`` files), default
            ``openai/clip-vit-base-patch32``.
        device: where to run the model.
        batch_size: images or texts per forward pass.

    Raises:
        FileNotFoundError: ``model_id`` looks like a folder that does not exist.
        MetricModelError: the model cannot be loaded.
    """

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import CLIPModel, CLIPProcessor

        _check_local("CLIP", model_id)
        try:
            self.model = CLIPModel.from_pretrained(model_id).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(model_id)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error("CLIP", model_id, exc) from exc
        self.model_id, self.device, self.batch_size = model_id, device, batch_size

    def to(self, device: str) -> ClipEmbedder:
        self.model.to(device)
        self.device = device
        return self

    @torch.inference_mode()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Image embeddings.

        Shapes:
            ``images``: N arrays ``(H, W, 3)`` uint8 -> ``(N, D)`` float32 on the CPU.
        """
        if not images:
            raise ValueError("`images` must hold at least one image.")
        out = []
        for chunk in _batches(images, self.batch_size):
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (truncated to the text encoder's context length).

        Shapes:
            ``texts``: N strings -> ``(N, D)`` float32 on the CPU.
        """
        if not texts:
            raise ValueError("`texts` must hold at least one text.")
        max_len = int(self.model.config.text_config.max_position_embeddings)
        out = []
        for chunk in _batches(list(texts), self.batch_size):
            tokens = self.processor(text=list(chunk), return_tensors="pt", padding=True, truncation=True,
                                    max_length=max_len)
            ids = tokens["input_ids"].to(self.device)  # (B, T)
            mask = tokens["attention_mask"].to(self.device)  # (B, T)
            out.append(_features(self.model.get_text_features(input_ids=ids, attention_mask=mask)).float().cpu())
        return torch.cat(out)
