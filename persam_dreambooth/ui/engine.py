"""SAM in the app's process: click-to-mask previews on cached embeddings, and PerSAM / PerSAM-F propagation.

Built on the public API (``from persam_dreambooth import PerSAM, PerSAMF, load_sam``): SAM is loaded once, each
photo is encoded once (:meth:`Engine.embedding`, kept in memory keyed by the file's name, size and modification time)
and every click only runs SAM's prompt encoder and mask decoder, which is what makes the preview instant
(``benchmarks/ui_latency.py``).

**Confidence of a propagated mask** (docs/ui.md, "Probably absent"): two numbers per photo,

* ``peak_similarity``: the largest cosine similarity between the reference target vector and the photo's image
  features (PerSAM's location prior, docs/design/persam_method.md §3.1), in [-1, 1]: how much the photo contains
  something like the subject at all;
* ``score``: SAM's predicted IoU of the final mask, in [0, 1]: how well-formed the mask is.

A photo is flagged *probably absent* when ``peak_similarity < similarity_threshold`` (default 0.65, the same cut the
multi-instance search uses to stop looking) or ``score < score_threshold`` (default 0.70). Both thresholds are
heuristics, adjustable in the page; a flag means "look at this one", not a verdict.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_SIMILARITY_THRESHOLD",
    "Engine",
    "Prompt",
    "Propagated",
    "is_probably_absent",
]

logger = logging.getLogger(__name__)

DEFAULT_SIMILARITY_THRESHOLD = 0.65
DEFAULT_SCORE_THRESHOLD = 0.70
METHODS = {"PerSAM": "persam", "PerSAM-F": "persam-f"}


def is_probably_absent(peak_similarity: float, score: float,
                       similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
                       score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> bool:
    """The documented flag rule: low location-prior similarity or low predicted IoU."""
    return peak_similarity < similarity_threshold or score < score_threshold


@dataclass
class Prompt:
    """Clicks and/or a box on one photo, in its pixels: ``points`` ``[(x, y, label)]`` (1 positive, 0 negative)."""

    points: list[tuple[float, float, int]]
    box: tuple[float, float, float, float] | None = None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def to_json(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "box": None if self.box is None else list(self.box)}

    @classmethod
    def from_json(cls, data: Any) -> Prompt:
        if not isinstance(data, dict):
            return cls([])
        points = [(float(p[0]), float(p[1]), int(p[2])) for p in data.get("points") or []]
        box = data.get("box")
        return cls(points, None if box is None else tuple(float(v) for v in box))  # type: ignore[arg-type]


@dataclass
class Propagated:
    """One photo's PerSAM result as the page shows it."""

    name: str
    mask: np.ndarray  # (H, W) bool
    score: float
    peak_similarity: float
    points: list[tuple[float, float, int]]
    box: tuple[float, float, float, float] | None


class Engine:
    """One SAM, loaded on first use, with an in-memory embedding cache of at most ``cache_size`` photos.

    Args:
        sam_model: SAM model type (``vit_h``, ``vit_l``, ``vit_b`` or a registered one), as ``segment --sam-model``.
        sam_checkpoint: weights file, as ``segment --sam-checkpoint`` (``None``: the official download).
        device: ``cuda``, ``cpu``... (``None``: CUDA when available).
        sam: use this loaded SAM instead of loading ``sam_model`` on first use.
    """

    def __init__(self, sam_model: str = "vit_h", sam_checkpoint: str | None = None, device: str | None = None,
                 cache_size: int = 64, sam: Any = None) -> None:
        self.sam_model, self.sam_checkpoint, self.device = sam_model, sam_checkpoint, device
        self.cache_size = cache_size
        self._persam: Any = None
        if sam is not None:  # an already-loaded SAM (benchmarks, notebooks)
            from persam_dreambooth import PerSAM

            self._persam = PerSAM(sam)
        self._cache: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        self._lock = threading.RLock()  # one decoder call at a time (tabs share the model)
        self.encoder_calls = 0
        self.last_warnings: list[str] = []  # warnings of the last propagation's reference

    # ------------------------------------------------------------------------------------------------ model
    @property
    def persam(self) -> Any:
        """The PerSAM wrapper around the loaded SAM (its predictor encodes and decodes)."""
        with self._lock:
            if self._persam is None:
                from persam_dreambooth import PerSAM, load_sam

                started = time.perf_counter()
                sam = load_sam(self.sam_model, self.sam_checkpoint, self.device)
                self._persam = PerSAM(sam)
                logger.info("loaded SAM %s in %.1f s", self.sam_model, time.perf_counter() - started)
            return self._persam

    def embedding(self, path: Path, image: np.ndarray | None = None) -> Any:
        """The photo's SAM embedding, computed once per (name, size, mtime) and then served from memory."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if image is None:
                from persam_dreambooth.data.images import load_image

                image = load_image(path, path.name)
            embedding = self.persam.encode(image, path.name)
            self.encoder_calls += 1
            self._cache[key] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return embedding

    # ------------------------------------------------------------------------------------------------ clicks
    def preview(self, path: Path, prompt: Prompt, base: Prompt | None = None) -> tuple[np.ndarray, float]:
        """SAM's mask for ``prompt`` (plus ``base``'s points/box, e.g. PerSAM's own prompt when fixing a photo).

        One positive click alone: the best of SAM's three masks (as ``segment --ref-point``); several clicks or a
        box: SAM's single-mask output for all of them together.

        Returns:
            ``(mask (H, W) bool, SAM's predicted IoU)``.
        """
        import torch

        points = list(base.points if base else []) + list(prompt.points)
        box = prompt.box if prompt.box is not None else (base.box if base else None)
        if not points and box is None:
            raise ValueError("Click on the photo (or draw a box) first.")
        embedding = self.embedding(path)
        height, width = embedding.original_size
        for x, y, _ in points:
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(f"click ({x:g}, {y:g}) lies outside the photo ({width} x {height}).")
        with self._lock:
            predictor = self.persam.predictor
            coords = torch.tensor([[p[0], p[1]] for p in points], dtype=torch.float64) if points else None
            labels = torch.tensor([p[2] for p in points], dtype=torch.int64) if points else None
            box_t = None if box is None else torch.tensor(box, dtype=torch.float64)
            multimask = len(points) == 1 and box is None
            out = predictor.predict(embedding, point_coords=coords, point_labels=labels, box=box_t,
                                    multimask_output=multimask)
            best = out.best
            mask = predictor.upscale_mask(out.low_res_logits[best], embedding).cpu().numpy()
            return mask, float(out.iou_predictions[best])

    # ------------------------------------------------------------------------------------------------ PerSAM
    def propagate(
        self, reference: Path, reference_mask: np.ndarray, photos: Sequence[Path], method: str = "persam",
        progress: Callable[[int, int, str], None] | None = None,
    ) -> list[Propagated]:
        """Find the reference object in every photo of ``photos`` (the reference itself is skipped).

        ``method``: ``persam`` (training-free) or ``persam-f`` (fits its 2 scale weights on the reference first,
        with ``segment``'s settings). ``progress(done, total, name)`` is called after each photo.
        """
        if method not in METHODS.values():
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
        if not np.asarray(reference_mask).any():
            raise ValueError("The reference mask is empty: click on the subject first.")
        with self._lock:
            persam = self.persam
            segmenter = persam
            if method == "persam-f":
                from persam_dreambooth import PerSAMF

                segmenter = PerSAMF(persam.sam)
            with warnings.catch_warnings(record=True) as caught:  # shown in the page (e.g. a very small reference)
                warnings.simplefilter("always")
                segmenter.set_reference_embedding(self.embedding(reference), reference_mask)
            self.last_warnings = [str(w.message) for w in caught]
        others = [p for p in photos if p != reference]
        results = []
        for i, path in enumerate(others):
            embedding = self.embedding(path)
            with self._lock:
                seg = segmenter.segment_embedding(embedding)
            peak = float(np.max(seg.similarity)) if seg.similarity.size else -1.0
            box = None if seg.box_xyxy is None else tuple(float(v) for v in seg.box_xyxy)
            points = [(float(x), float(y), int(lab)) for (x, y), lab in zip(seg.points_xy, seg.point_labels,
                                                                              strict=True)]
            results.append(Propagated(path.name, seg.mask, float(seg.score), peak, points, box))
            if progress is not None:
                progress(i + 1, len(others), path.name)
        return results
