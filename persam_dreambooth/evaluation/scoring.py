"""Score generated images against the real instance images, cache the per-image scores, aggregate them.

Every metric is first computed per generated image (its mean over the real images), then averaged: because every
generated image is compared with the same real images, the mean of the per-image means *is* DreamBooth's mean over
all (generated, real) pairs, and per-prompt and per-group numbers come for free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persam_dreambooth.evaluation.compare_config import no_flag
from persam_dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder
from persam_dreambooth.evaluation.image_metrics import (
    background_only,
    cosine_matrix,
    paired_cosine,
    subject_only,
)
from persam_dreambooth.evaluation.prompts import PromptSpec
from persam_dreambooth.generation.generate import IDENTITY_KEYS
from persam_dreambooth.utils.io import atomic_write_json

__all__ = ["METRICS", "LOWER_IS_BETTER", "METRIC_LABELS", "RealImages", "Scorer", "score_run", "aggregate"]

logger = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t", "masked_dino", "background_leakage", "background_clip_t")
LOWER_IS_BETTER = frozenset({"background_leakage"})
METRIC_LABELS = {
    "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "masked_dino": "masked DINO",
    "background_leakage": "background leakage", "background_clip_t": "background CLIP-T",
}

Segmenter = Callable[[np.ndarray], np.ndarray]
"""``(H, W, 3)`` uint8 image -> ``(H, W)`` bool subject mask."""


@dataclass
class RealImages:
    """The user's instance photos and, for the background metrics, their subject masks.

    Attributes:
        paths: the image files.
        images: ``(H, W, 3)`` uint8 arrays.
        masks: ``(H, W)`` bool arrays (same order), or ``None`` when background metrics are off.
    """

    paths: list[Path]
    images: list[np.ndarray]
    masks: list[np.ndarray] | None = None

    def fingerprint(self) -> str:
        """A short hash of the pixels and masks: cached scores are reused only while these are unchanged."""
        digest = hashlib.sha256()
        for array in [*self.images, *(self.masks or [])]:
            digest.update(f"{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


def _off_diagonal_mean(sim: torch.Tensor) -> float | None:
    """Mean of a square similarity matrix without its diagonal (self-pairs); ``None`` below 2 items."""
    n = sim.shape[0]
    if n < 2:
        return None
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


class Scorer:
    """Computes per-image metrics of generated images against one set of real images.

    Args:
        dino: DINO embedder (DINO, masked DINO, background leakage).
        clip: CLIP embedder (CLIP-I, CLIP-T).
        real: the real instance images (with masks when ``segmenter`` is given).
        segmenter: finds the subject in a generated image (PerSAM with the user's reference); ``None`` turns the two
            background metrics off.
    """

    def __init__(
        self, dino: DinoEmbedder, clip: ClipEmbedder, real: RealImages, segmenter: Segmenter | None = None
    ) -> None:
        if segmenter is not None and real.masks is None:
            raise ValueError("`real.masks` are required when a `segmenter` is given (background metrics).")
        self.dino, self.clip, self.real, self.segmenter = dino, clip, real, segmenter
        self.real_dino = dino.embed(real.images)  # (R, D)
        self.real_clip = clip.embed_images(real.images)  # (R, E)
        self.real_subject = self.real_background = None
        if segmenter is not None:
            assert real.masks is not None
            crops = [subject_only(im, m) for im, m in zip(real.images, real.masks, strict=True)]
            empty = [i for i, c in enumerate(crops) if c is None]
            if empty:
                name = str(real.paths[empty[0]]) if empty[0] < len(real.paths) else f"#{empty[0]}"
                raise ValueError(
                    f"The mask of instance image {name!r} is empty: every instance mask needs at least one subject "
                    f"pixel for the background metrics (fix the mask, or pass `{no_flag('background_metrics')}`)."
                )
            self.real_subject = dino.embed(crops)  # (R, D)
            self.real_background = dino.embed(
                [background_only(im, m) for im, m in zip(real.images, real.masks, strict=True)]
            )  # (R, D)

    def score(
        self, images: Sequence[np.ndarray], clip_texts: Sequence[str],
        background_texts: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Per-image metrics; ``masked_dino`` is ``None`` where no subject was found.

        Args:
            images: N generated ``(H, W, 3)`` uint8 images.
            clip_texts: N texts for CLIP-T (the prompt without the identifier, see ``PromptSpec.clip_text``).
            background_texts: N texts for background CLIP-T (the prompt's context without the subject, see
                ``PromptSpec.background_text``); ``None`` entries (or no list) leave that metric ``None``.

        Returns:
            N dicts with ``dino``, ``clip_i``, ``clip_t``, ``masked_dino``, ``background_leakage``,
            ``background_clip_t``, ``subject_found`` and ``subject_area`` (fraction of the image).
        """
        if len(images) != len(clip_texts):
            raise ValueError(f"`clip_texts` must have one text per image ({len(images)}), got {len(clip_texts)}.")
        background_texts = [None] * len(images) if background_texts is None else list(background_texts)
        if len(background_texts) != len(images):
            raise ValueError(f"`background_texts` must have one entry per image ({len(images)}), got "
                             f"{len(background_texts)}.")
        dino = cosine_matrix(self.dino.embed(images), self.real_dino).mean(dim=1)  # (N, R) -> (N,)
        gen_clip = self.clip.embed_images(images)  # (N, E)
        clip_i = cosine_matrix(gen_clip, self.real_clip).mean(dim=1)  # (N, R) -> (N,)
        clip_t = paired_cosine(self.clip.embed_texts(clip_texts), gen_clip)  # (N,)
        rows = [
            {"dino": float(dino[i]), "clip_i": float(clip_i[i]), "clip_t": float(clip_t[i]), "masked_dino": None,
             "background_leakage": None, "background_clip_t": None, "subject_found": None, "subject_area": None}
            for i in range(len(images))
        ]
        if self.segmenter is None:
            return rows
        masks = [np.asarray(self.segmenter(im), dtype=bool) for im in images]
        crops = [subject_only(im, m) for im, m in zip(images, masks, strict=True)]
        found = [i for i, c in enumerate(crops) if c is not None]
        if found:
            sub = cosine_matrix(self.dino.embed([crops[i] for i in found]), self.real_subject).mean(dim=1)
            for k, i in enumerate(found):
                rows[i]["masked_dino"] = float(sub[k])
        backgrounds = [background_only(im, m) for im, m in zip(images, masks, strict=True)]
        leak = cosine_matrix(self.dino.embed(backgrounds), self.real_background).mean(dim=1)  # (N, R) -> (N,)
        for i, m in enumerate(masks):
            rows[i].update(background_leakage=float(leak[i]), subject_found=bool(m.any()),
                           subject_area=float(m.mean()))
        # Background CLIP-T: the same background-only images against the prompt's context alone.
        asked = [i for i, t in enumerate(background_texts) if t]
        if asked:
            bg_clip = paired_cosine(self.clip.embed_texts([background_texts[i] for i in asked]),
                                    self.clip.embed_images([backgrounds[i] for i in asked]))  # (K,)
            for k, i in enumerate(asked):
                rows[i]["background_clip_t"] = float(bg_clip[k])
        return rows

    def real_vs_real(self) -> dict[str, float | None]:
        """The metrics among the real images themselves (pairs of different images): the "real images" row."""
        out: dict[str, float | None] = dict.fromkeys(METRICS)
        out["dino"] = _off_diagonal_mean(cosine_matrix(self.real_dino, self.real_dino))
        out["clip_i"] = _off_diagonal_mean(cosine_matrix(self.real_clip, self.real_clip))
        if self.real_subject is not None and self.real_background is not None:
            out["masked_dino"] = _off_diagonal_mean(cosine_matrix(self.real_subject, self.real_subject))
            out["background_leakage"] = _off_diagonal_mean(cosine_matrix(self.real_background, self.real_background))
        return out


def _load_cache(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("Ignoring unreadable score cache %s", path)
        return {}
    if data.get("settings") != settings:
        logger.info("Metric settings changed since %s was written; rescoring", path)
        return {}
    return data.get("images", {})


def _finite_or_none(row: dict[str, Any], file: str) -> dict[str, Any]:
    """A metric that came out NaN or infinite (e.g. an fp16 overflow) counts as missing (``None``), as the means
    already treat NaN; the score files stay strict JSON."""
    bad = [m for m, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        logger.warning("%s: %s not finite; recorded as missing", file, ", ".join(bad))
    return {m: (None if m in bad else v) for m, v in row.items()}


def score_run(
    scorer: Scorer,
    records: Sequence[dict[str, Any]],
    image_root: str | os.PathLike[str],
    prompts: Sequence[PromptSpec],
    cache_path: str | os.PathLike[str],
    settings: dict[str, Any],
    chunk_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-image scores of one run's generated images, reusing cached scores computed with the same ``settings``.

    Args:
        scorer: the :class:`Scorer`.
        records: generation records (``file``, ``prompt_index``, ``image_index``, ``seed``, ``prompt``).
        image_root: folder the records' ``file`` paths are relative to.
        prompts: the prompt specs, indexed by ``prompt_index``.
        cache_path: JSON cache of this run's scores; rewritten (atomically) after every chunk.
        settings: everything the scores depend on besides the images (metric models, reference, real images).
        chunk_size: images scored per step.
        progress: show a progress bar.

    Returns:
        One dict per record: the record's identity plus the metrics of :meth:`Scorer.score`.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    cache_path = Path(cache_path)
    cache = _load_cache(cache_path, settings)
    keyed = []
    for rec in records:
        spec = prompts[rec["prompt_index"]]
        # Everything that made the image is part of the key: a regenerated image with other settings is rescored.
        ident = {"file": rec["file"], "prompt_index": rec["prompt_index"], "image_index": rec["image_index"],
                 "group": spec.group, "clip_text": spec.clip_text, "background_text": spec.background_text,
                 **{k: rec[k] for k in IDENTITY_KEYS}}
        keyed.append(ident)
    todo = [k for k in keyed if {kk: cache.get(k["file"], {}).get(kk) for kk in k} != k]
    if todo:
        with tqdm(total=len(todo), desc=f"score {cache_path.stem}", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                images = []
                for k in chunk:
                    with Image.open(Path(image_root) / k["file"]) as im:
                        images.append(np.array(im.convert("RGB")))  # a writable copy
                rows = scorer.score(images, [k["clip_text"] for k in chunk], [k["background_text"] for k in chunk])
                for k, row in zip(chunk, rows, strict=True):
                    cache[k["file"]] = {**k, **_finite_or_none(row, k["file"])}
                atomic_write_json(cache_path, {"settings": settings, "images": cache}, indent=1)
                bar.update(len(chunk))
    return [cache[k["file"]] for k in keyed]


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: _mean([r.get(m) for r in rows]) for m in METRICS}
    found = [r["subject_found"] for r in rows if r["subject_found"] is not None]
    out["subject_found_rate"] = float(np.mean(found)) if found else None
    out["num_images"] = len(rows)
    return out


def aggregate(rows: Sequence[dict[str, Any]], prompts: Sequence[PromptSpec]) -> dict[str, Any]:
    """Means over all images, per prompt group (in first-seen order) and per prompt."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for spec in prompts:
        groups.setdefault(spec.group, [])
    for r in rows:
        groups[r["group"]].append(r)
    per_prompt = []
    for spec in prompts:
        mine = [r for r in rows if r["prompt_index"] == spec.index]
        per_prompt.append({"index": spec.index, "prompt": spec.prompt, "group": spec.group, **_summary(mine)})
    return {
        "overall": _summary(rows),
        "groups": {g: _summary(rs) for g, rs in groups.items() if rs},
        "prompts": per_prompt,
    }
