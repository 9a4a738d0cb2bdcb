"""Compare trained runs (e.g. masked vs vanilla DreamBooth) on the DreamBooth prompt set, with the base model as floor.

``compare(config)`` does, in order:

1. **Checks that the output folder can be written** and ``device`` exists, then **locks the folder** for the whole run
   (a second comparison into it refuses, naming this run's PID).
2. **Checks everything before generating anything**: run folders hold weights, all runs share the base model, the
   prompt set is valid, the instance images (and their masks) load, the metric models (DINO, CLIP) and SAM load, and
   the PerSAM reference is usable.
3. **Generates** every prompt with identical seeds for the base model and every run (``generations/<name>/``;
   resumable per image).
4. **Scores** every image (``scores/<name>.json``; cached, so reruns only score new images).
5. **Writes** ``metrics.json``, ``metrics.md``, side-by-side grids, a bar chart and ``report.html``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persam_dreambooth.config import from_dict, to_dict
from persam_dreambooth.data.images import list_images, load_image, load_mask
from persam_dreambooth.evaluation import paired_stats
from persam_dreambooth.evaluation.compare_config import (
    BASE_RUN,
    DEFAULT_SAM_MODEL,
    CompareConfig,
    CompareSettings,
    compare_flag,
    no_flag,
    parse_runs,
)
from persam_dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder, MetricModelError
from persam_dreambooth.evaluation.prompts import PromptSpec, build_prompts, infer_identifier
from persam_dreambooth.evaluation.scoring import LOWER_IS_BETTER, METRICS, RealImages, Scorer, aggregate, score_run
from persam_dreambooth.generation import GenerationConfig, SamplingConfig, find_run_weights, generate, read_run_config
from persam_dreambooth.generation.pipeline import check_image_size, model_geometry
from persam_dreambooth.masks.store import MaskSet
from persam_dreambooth.utils.devices import resolve_device
from persam_dreambooth.utils.io import check_output_dir
from persam_dreambooth.utils.locks import lock_output_dir

__all__ = ["CompareResult", "compare", "compare_locked", "load_metric_models", "compare_device", "locked_output_dir"]

logger = logging.getLogger(__name__)

@dataclass
class CompareResult:
    """Where everything went, and the metrics (the contents of ``metrics.json``)."""

    output_dir: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


@dataclass
class _Plan:
    """Everything validated and loaded before generation."""

    base_model: str
    runs: dict[str, dict[str, Any]]  # name -> {"path", "kind", "config"}
    prompts: list[PromptSpec]
    identifier: str
    height: int
    width: int
    scorer: Scorer
    reference: dict[str, str] | None
    mask_source: str | None


def _check_runs(cfg: CompareConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    runs: dict[str, dict[str, Any]] = {}
    bases: dict[str, str] = {}
    for name, folder in parse_runs(cfg.runs).items():
        weights = find_run_weights(folder, f"{compare_flag('runs')} {name}")
        run_cfg = read_run_config(folder) or {}
        runs[name] = {"path": weights.path, "kind": weights.kind, "config": run_cfg}
        if run_cfg.get("pretrained_model_name_or_path"):
            bases[name] = str(run_cfg["pretrained_model_name_or_path"])
        elif weights.kind == "lora":
            logger.warning("Run %r has no config.resolved.yaml: its base model cannot be checked.", name)
    base = cfg.pretrained_model_name_or_path or next(iter(bases.values()), None)
    if base is None:
        raise ValueError(f"`{compare_flag('pretrained_model_name_or_path')}` is required: no run has a "
                         "config.resolved.yaml naming it.")
    for name, run_base in bases.items():
        if not _same_model(run_base, base):
            source = (f"`{compare_flag('pretrained_model_name_or_path')}`" if cfg.pretrained_model_name_or_path
                      else "the first run")
            raise ValueError(
                f"All runs must share one base model: run {name!r} was trained from {run_base!r}, but {source} "
                f"is {base!r}. Compare runs of the same base model."
            )
    return base, runs


def _instance_masks(cfg: CompareConfig, runs: dict[str, dict[str, Any]], paths: list[Path]) -> tuple[
        list[np.ndarray] | None, str | None]:
    """The instance images' masks: ``--instance-mask-dir``, else the first run whose ``masks/`` covers them all."""
    candidates = [(cfg.instance_mask_dir, compare_flag("instance_mask_dir"))] if cfg.instance_mask_dir else [
        (str(info["path"] / "masks"), f"{compare_flag('runs')} {name} masks/") for name, info in runs.items()
        if (info["path"] / "masks").is_dir()
    ]
    for folder, label in candidates:
        mask_set = MaskSet.read(folder, label)
        try:
            pairs = mask_set.check_images(paths)
        except (FileNotFoundError, ValueError):
            if cfg.instance_mask_dir:
                raise
            logger.info("%s does not cover every instance image; trying the next run", folder)
            continue
        return [load_mask(pairs[p], f"mask {str(pairs[p])!r}") for p in paths], str(folder)
    return None, None


def compare_device(cfg: CompareSettings) -> str:
    """``--device``, checked (a device this machine has), or the best available: ``cuda``, ``mps``, ``cpu``."""
    return str(resolve_device(cfg.device, compare_flag("device"), prefer_mps=True))


def locked_output_dir(cfg: CompareSettings) -> contextlib.AbstractContextManager[Path]:
    """The lock of ``--output-dir`` for a whole comparison: a second run into it refuses with this run's PID. A
    comparison that fails its checks leaves no folder behind (``tidy_on_error``)."""
    return lock_output_dir(cfg.output_dir, "compare", compare_flag("output_dir"), tidy_on_error=True)


def _prepare(cfg: CompareConfig, progress: bool = True) -> _Plan:
    from tqdm.auto import tqdm

    base, runs = _check_runs(cfg)
    identifier = cfg.identifier
    if identifier is None:
        for info in runs.values():
            identifier = infer_identifier(str(info["config"].get("instance_prompt", "")), cfg.class_noun)
            if identifier:
                break
    if not identifier:
        raise ValueError(
            f"`{compare_flag('identifier')}` is required: it could not be read from the runs' instance_prompt (e.g. "
            "'a photo of "
            f"sks {cfg.class_noun}' gives 'sks')."
        )
    prompts = build_prompts(cfg.prompt_set, identifier, cfg.class_noun)
    scale, default = model_geometry(base)
    height, width = cfg.height or default, cfg.width or default
    check_image_size(height, width, scale)
    paths = list_images(cfg.instance_data_dir, compare_flag("instance_data_dir"))
    images = [load_image(p, f"instance image {str(p)!r}") for p in paths]
    device = compare_device(cfg)
    dino, clip = load_metric_models(cfg, device)
    masks: list[np.ndarray] | None = None
    mask_source: str | None = None
    segmenter, reference = None, None
    if cfg.background_metrics:
        masks, mask_source = _instance_masks(cfg, runs, paths)
        if cfg.reference_image is not None and cfg.reference_mask is not None:
            ref_image, ref_mask = cfg.reference_image, cfg.reference_mask
        elif masks is not None and mask_source is not None:
            ref_image, ref_mask = str(paths[0]), str(MaskSet.read(mask_source).path_for(paths[0]))
        else:
            raise ValueError(
                "The background metrics need the subject's masks, but no run folder has masks/ for every instance "
                f"image. Pass `{compare_flag('instance_mask_dir')}`, or `{compare_flag('reference_image')}` and "
                f"`{compare_flag('reference_mask')}` (PerSAM then segments the instance images), or "
                f"`{no_flag('background_metrics')}`."
            )
        segmenter = _persam_segmenter(cfg, ref_image, ref_mask, device)
        reference = {"image": ref_image, "mask": ref_mask}
        if masks is None:
            masks = [segmenter(im) for im in tqdm(images, desc="PerSAM: segment the instance images", unit="img",
                                                  disable=not progress)]
            mask_source = "PerSAM (from the reference)"
    # Built now: it embeds the real images, so bad instance masks fail before generation too.
    logger.info("Embedding the %d instance image(s) with DINO and CLIP ...", len(images))
    scorer = Scorer(dino, clip, RealImages(paths=paths, images=images, masks=masks), segmenter)
    return _Plan(base, runs, prompts, identifier, height, width, scorer, reference, mask_source)


def load_metric_models(settings: CompareSettings, device: str = "cpu") -> tuple[DinoEmbedder, ClipEmbedder]:
    """The DINO and CLIP embedders of ``settings``; a model that cannot be loaded is an error naming its flag."""
    models = []
    for name, embedder in (("dino_model", DinoEmbedder), ("clip_model", ClipEmbedder)):
        model_id, flag = getattr(settings, name), compare_flag(name)
        logger.info("Loading the %s model %s ...", "DINO" if embedder is DinoEmbedder else "CLIP", model_id)
        try:
            models.append(embedder(model_id, device=device))
        except MetricModelError as exc:
            raise exc.naming(flag) from exc
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"`{flag}` folder {model_id!r} does not exist.") from exc
    return models[0], models[1]


def _persam_segmenter(cfg: CompareConfig, image: str, mask: str, device: str) -> Any:
    from persam_dreambooth.segmentation.persam import PerSAM
    from persam_dreambooth.segmentation.sam import load_sam

    model_type = cfg.sam_model_type or DEFAULT_SAM_MODEL
    logger.info("Loading SAM %s for PerSAM ...", model_type)
    persam = PerSAM(load_sam(model_type, checkpoint=cfg.sam_checkpoint, device=device))
    logger.info("Encoding the PerSAM reference %s (slow for vit_h on a CPU) ...", image)
    persam.set_reference(load_image(image, compare_flag("reference_image")),
                         load_mask(mask, compare_flag("reference_mask")))
    return lambda im: persam.segment(im).mask


def _generate_all(cfg: CompareConfig, plan: _Plan, out: Path, progress: bool) -> dict[str, list[dict[str, Any]]]:
    import torch

    records = {}
    # The sampling settings are shared with `generate` (SamplingConfig); the size is the resolved one.
    sampling = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplingConfig) if f.name != "lora_scale"}
    common = {**sampling, "prompts": [p.prompt for p in plan.prompts], "num_images": cfg.num_images_per_prompt,
              "height": plan.height, "width": plan.width}
    for name in [BASE_RUN, *plan.runs]:
        gen_dir = str(out / "generations" / name)
        if name == BASE_RUN:
            gcfg = GenerationConfig(pretrained_model_name_or_path=plan.base_model, output_dir=gen_dir, **common)
        elif plan.runs[name]["kind"] == "lora":
            gcfg = GenerationConfig(pretrained_model_name_or_path=plan.base_model, lora=str(plan.runs[name]["path"]),
                                    lora_scale=cfg.lora_scale, output_dir=gen_dir, **common)
        else:
            gcfg = GenerationConfig(model=str(plan.runs[name]["path"]), output_dir=gen_dir, **common)
        logger.info("Run %r: %d images", name, len(plan.prompts) * cfg.num_images_per_prompt)
        records[name] = generate(gcfg, progress=progress).records
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def compare(config: CompareConfig | None = None, /, *, progress: bool = True, **kwargs: Any) -> CompareResult:
    """Generate, score and report; see the module docstring. Pass a :class:`CompareConfig` or its fields.

    Raises:
        PermissionError: ``output_dir`` cannot be created or written (checked before anything else).
        FolderLockedError: another comparison is writing into ``output_dir`` (the message names its PID).
    """
    cfg = config if config is not None else from_dict(CompareConfig, kwargs)
    check_output_dir(cfg.output_dir, compare_flag("output_dir"))  # before any work: can it be written at all?
    compare_device(cfg)
    with locked_output_dir(cfg):
        return compare_locked(cfg, progress=progress)


def compare_locked(cfg: CompareConfig, *, progress: bool = True) -> CompareResult:
    """:func:`compare` for a caller that already holds the output folder's lock (:func:`locked_output_dir`)."""
    from persam_dreambooth import __version__
    from persam_dreambooth.evaluation.report import write_reports

    plan = _prepare(cfg, progress)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _generate_all(cfg, plan, out, progress)
    # Everything the scores depend on besides the generated images: a change rescores every image.
    settings = {
        "dino_model": cfg.dino_model, "clip_model": cfg.clip_model,
        "sam": ({"model_type": cfg.sam_model_type or DEFAULT_SAM_MODEL, "checkpoint": cfg.sam_checkpoint}
                if plan.reference else None),
        "reference": plan.reference, "reference_fingerprint": _reference_fingerprint(plan.reference),
        "instance_images": [str(p.resolve()) for p in plan.scorer.real.paths],
        "instance_masks": plan.mask_source, "instance_fingerprint": plan.scorer.real.fingerprint(),
        "metric_version": 2,
    }
    scorer = plan.scorer
    runs_out: dict[str, Any] = {}
    for name, recs in records.items():
        rows = score_run(scorer, recs, out / "generations" / name, plan.prompts, out / "scores" / f"{name}.json",
                         settings, progress=progress)
        info = plan.runs.get(name)
        runs_out[name] = {
            "kind": "base" if info is None else info["kind"],
            "path": plan.base_model if info is None else str(info["path"]),
            "mask_source": None if info is None else info["config"].get("mask_source"),
            # images the pipeline's safety checker blacked out (they score low on every metric)
            "nsfw_flagged": sum(1 for r in recs if r.get("nsfw_content_detected")),
            **aggregate(rows, plan.prompts),
            "images": rows,
        }
    metrics = {
        "persam_dreambooth_version": __version__,
        "settings": {**to_dict(cfg), "pretrained_model_name_or_path": plan.base_model, "identifier": plan.identifier,
                     "height": plan.height, "width": plan.width},
        "models": {"dino": cfg.dino_model, "clip": cfg.clip_model, "sam": settings["sam"]},
        "definitions": _definitions(),
        "reference": plan.reference,
        "instance_images": [str(p) for p in scorer.real.paths],
        "instance_masks": plan.mask_source,
        "real_images": scorer.real_vs_real(),
        "runs": runs_out,
        "statistics": paired_stats.scheme(cfg.bootstrap_resamples, cfg.bootstrap_seed),
        "comparisons": _comparisons(runs_out, plan.prompts, cfg),
    }
    files = write_reports(out, metrics, plan.prompts, {n: info["config"] for n, info in plan.runs.items()},
                          {n: info["path"] for n, info in plan.runs.items()})
    return CompareResult(out, metrics, files)


def _comparisons(runs: Mapping[str, Mapping[str, Any]], prompts: list[PromptSpec], cfg: CompareConfig) -> list[
        dict[str, Any]]:
    """Paired differences with confidence intervals and verdicts: each run against the base model, then each pair
    of trained runs (see :mod:`~persam_dreambooth.evaluation.paired_stats`), overall and per prompt group."""
    groups: dict[str, set[int]] = {}
    for spec in prompts:
        groups.setdefault(spec.group, set()).add(spec.index)
    out = []
    for a, b in paired_stats.run_pairs(list(runs), BASE_RUN):
        result = paired_stats.compare_pair(runs[a]["images"], runs[b]["images"], METRICS, LOWER_IS_BETTER, groups,
                                           resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
        out.append({"run": a, "against": b, **result})
    return out


def _reference_fingerprint(reference: Mapping[str, str] | None) -> dict[str, str] | None:
    """Short SHA-256 digests of the PerSAM reference image and mask files (``None`` without a reference)."""
    if reference is None:
        return None
    from persam_dreambooth.utils.io import file_sha256

    return {role: file_sha256(path)[:16] for role, path in reference.items()}


def _definitions() -> dict[str, str]:
    return {
        "dino": "mean cosine over all (generated, real) pairs of DINO CLS embeddings (the CLS token after the final "
                "layer norm, last_hidden_state[:, 0], not the ViT pooler) (DreamBooth §4.1)",
        "clip_i": "mean cosine over all (generated, real) pairs of CLIP image embeddings (DreamBooth §4.1)",
        "clip_t": "mean cosine between the CLIP embedding of the prompt text and of the generated image; the text is "
                  "the prompt template filled with the class noun only (identifier removed: 'a sks dog on the "
                  "beach' is scored against 'a dog on the beach'), because the rare-token identifier means nothing "
                  "to CLIP",
        "masked_dino": "DINO between subject-only square crops (subject mask bbox, non-subject pixels filled with "
                       "the ImageNet mean colour); generated subjects segmented by PerSAM from the reference, real "
                       "subjects from the instance masks; images where PerSAM finds nothing are left out",
        "background_leakage": "DINO between background-only images (subject mask dilated by 2% of the longer side, "
                              "filled with the ImageNet mean colour) of generated and real images; lower is better; "
                              "compare with the base model, which never saw the training photos",
        "background_clip_t": "CLIP cosine between the background-only image (the subject filled as for background "
                             "leakage) and the context the prompt asks for, with the subject phrase removed ('a sks "
                             "dog on the beach' -> 'the beach'); only prompts that name a place (not the "
                             "accessorization and property groups); higher means the new context was drawn; our own "
                             "measure, inspired by the mask-aware scores of MaSC (arXiv 2605.22469)",
        "real_images": "the same measures among the real instance images (pairs of different images)",
        "differences": "each run minus the other, over paired images (same prompt and seed), with a 95% confidence "
                       "interval from a bootstrap that resamples prompts and, within them, seeds; 'better' or "
                       "'worse' only when the interval excludes 0",
    }
