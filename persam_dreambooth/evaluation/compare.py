"""Compare trained runs (e.g. masked vs vanilla DreamBooth) on the DreamBooth prompt set, with the base model as floor.

``compare(config)`` does, in order:

1. **Checks everything before generating anything**: run folders hold weights, all runs share the base model, the
   prompt set is valid, the instance images (and their masks) load, the metric models (DINO, CLIP) and SAM load, and
   the PerSAM reference is usable.
2. **Generates** every prompt with identical seeds for the base model and every run (``generations/<name>/``;
   resumable per image).
3. **Scores** every image (``scores/<name>.json``; cached, so reruns only score new images).
4. **Writes** ``metrics.json``, ``metrics.md``, side-by-side grids, a bar chart and ``report.html``.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from persam_dreambooth.config import field_help, from_dict, to_dict
from persam_dreambooth.data.images import list_images, load_image, load_mask
from persam_dreambooth.evaluation.embedders import DEFAULT_CLIP, DEFAULT_DINO, ClipEmbedder, DinoEmbedder
from persam_dreambooth.evaluation.prompts import PromptSpec, build_prompts, infer_identifier
from persam_dreambooth.evaluation.scoring import RealImages, Scorer, aggregate, score_run
from persam_dreambooth.generation import GenerationConfig, find_run_weights, generate, read_run_config
from persam_dreambooth.generation.pipeline import check_image_size, model_geometry, resolve_device
from persam_dreambooth.masks.store import MaskSet
from persam_dreambooth.utils.io import ensure_output_dir

__all__ = ["CompareConfig", "CompareResult", "compare", "parse_runs", "BASE_RUN"]

logger = logging.getLogger(__name__)

BASE_RUN = "base"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(kw_only=True)
class CompareConfig:
    """Settings of :func:`compare`; field names match the CLI flags (``--class-noun`` = ``class_noun``)."""

    runs: dict[str, str] = field_help(help="run name -> training output folder (LoRA weights or pipeline)")
    instance_data_dir: str = field_help(help="the subject's real photos (what DINO / CLIP-I compare against)")
    class_noun: str = field_help(help="class noun in the prompts, e.g. dog")
    output_dir: str = field_help(help="report folder")
    pretrained_model_name_or_path: str | None = field_help(None, help="base model (default: the runs' own)")
    prompt_set: str = field_help("live", help="live | object | a template file")
    identifier: str | None = field_help(None, help="rare-token identifier (default: from the runs' instance_prompt)")
    num_images_per_prompt: int = field_help(4, help="images per prompt and run; image i uses seed + i")
    seed: int = field_help(0, help="seed of image 0 of every prompt (identical for every run)")
    num_inference_steps: int = field_help(30, help="denoising steps")
    guidance_scale: float = field_help(7.5, help="classifier-free guidance scale")
    height: int | None = field_help(None, help="image height (default: the model's)")
    width: int | None = field_help(None, help="image width (default: the model's)")
    lora_scale: float = field_help(1.0, help="LoRA strength for LoRA runs")
    batch_size: int = field_help(4, help="images per pipeline call")
    device: str | None = field_help(None, help="cuda, cpu, ... (default: best available)")
    dtype: Literal["float32", "float16", "bfloat16"] = field_help("float32", help="generation dtype")
    dino_model: str = field_help(DEFAULT_DINO, help="DINO model id or folder")
    clip_model: str = field_help(DEFAULT_CLIP, help="CLIP model id or folder")
    background_metrics: bool = field_help(True, help="compute masked DINO and background leakage (needs SAM)")
    sam_model_type: str = field_help("vit_h", help="SAM architecture for PerSAM")
    sam_checkpoint: str | None = field_help(None, help="SAM checkpoint (default: the package's cached download)")
    reference_image: str | None = field_help(None, help="PerSAM reference image (default: first instance image)")
    reference_mask: str | None = field_help(None, help="mask of reference_image (default: its training mask)")
    instance_mask_dir: str | None = field_help(None, help="masks of the instance images (default: a run's masks/)")

    def __post_init__(self) -> None:
        parse_runs(self.runs)
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {self.seed}.")
        if (self.reference_image is None) != (self.reference_mask is None):
            raise ValueError("`--reference-image` and `--reference-mask` go together: give both or neither.")


@dataclass
class CompareResult:
    """Where everything went, and the metrics (the contents of ``metrics.json``)."""

    output_dir: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def parse_runs(runs: Mapping[str, str] | list[str]) -> dict[str, str]:
    """``["masked=out/a", "vanilla=out/b"]`` (or a mapping) -> ``{"masked": "out/a", ...}``, names checked."""
    if isinstance(runs, Mapping):
        pairs = list(runs.items())
    else:
        pairs = []
        for item in runs:
            if "=" not in item:
                raise ValueError(f"`--runs` entries must be NAME=FOLDER (e.g. masked=out/masked), got {item!r}.")
            name, _, path = item.partition("=")
            pairs.append((name.strip(), path.strip()))
    if not pairs:
        raise ValueError("`--runs` must name at least one run: NAME=FOLDER ...")
    out: dict[str, str] = {}
    for name, path in pairs:
        if not _NAME_RE.match(name):
            raise ValueError(f"`--runs` name {name!r} must be letters, digits, '_', '-' or '.' (e.g. masked).")
        if name == BASE_RUN:
            raise ValueError(f"`--runs` name {BASE_RUN!r} is reserved for the base model; choose another name.")
        if name in out:
            raise ValueError(f"`--runs` name {name!r} appears twice; run names must be unique.")
        if not path:
            raise ValueError(f"`--runs` entry {name!r} has no folder: write {name}=FOLDER.")
        out[name] = path
    return out


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
        weights = find_run_weights(folder, f"--runs {name}")
        run_cfg = read_run_config(folder) or {}
        runs[name] = {"path": weights.path, "kind": weights.kind, "config": run_cfg}
        if run_cfg.get("pretrained_model_name_or_path"):
            bases[name] = str(run_cfg["pretrained_model_name_or_path"])
        elif weights.kind == "lora":
            logger.warning("Run %r has no config.resolved.yaml: its base model cannot be checked.", name)
    base = cfg.pretrained_model_name_or_path or next(iter(bases.values()), None)
    if base is None:
        raise ValueError("`--pretrained_model_name_or_path` is required: no run has a config.resolved.yaml naming it.")
    for name, run_base in bases.items():
        if not _same_model(run_base, base):
            source = "`--pretrained_model_name_or_path`" if cfg.pretrained_model_name_or_path else "the first run"
            raise ValueError(
                f"All runs must share one base model: run {name!r} was trained from {run_base!r}, but {source} "
                f"is {base!r}. Compare runs of the same base model."
            )
    return base, runs


def _instance_masks(cfg: CompareConfig, runs: dict[str, dict[str, Any]], paths: list[Path]) -> tuple[
        list[np.ndarray] | None, str | None]:
    """The instance images' masks: ``--instance-mask-dir``, else the first run whose ``masks/`` covers them all."""
    candidates = [(cfg.instance_mask_dir, "--instance-mask-dir")] if cfg.instance_mask_dir else [
        (str(info["path"] / "masks"), f"--runs {name} masks/") for name, info in runs.items()
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


def _prepare(cfg: CompareConfig) -> _Plan:
    base, runs = _check_runs(cfg)
    identifier = cfg.identifier
    if identifier is None:
        for info in runs.values():
            identifier = infer_identifier(str(info["config"].get("instance_prompt", "")), cfg.class_noun)
            if identifier:
                break
    if not identifier:
        raise ValueError(
            "`--identifier` is required: it could not be read from the runs' instance_prompt (e.g. 'a photo of "
            f"sks {cfg.class_noun}' gives 'sks')."
        )
    prompts = build_prompts(cfg.prompt_set, identifier, cfg.class_noun)
    scale, default = model_geometry(base)
    height, width = cfg.height or default, cfg.width or default
    check_image_size(height, width, scale)
    paths = list_images(cfg.instance_data_dir, "--instance_data_dir")
    images = [load_image(p, f"instance image {str(p)!r}") for p in paths]
    device = resolve_device(cfg.device)
    dino = DinoEmbedder(cfg.dino_model, device=device)
    clip = ClipEmbedder(cfg.clip_model, device=device)
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
                "image. Pass `--instance-mask-dir`, or `--reference-image` and `--reference-mask` (PerSAM then "
                "segments the instance images), or `--no-background-metrics`."
            )
        segmenter = _persam_segmenter(cfg, ref_image, ref_mask, device)
        reference = {"image": ref_image, "mask": ref_mask}
        if masks is None:
            masks = [segmenter(im) for im in images]
            mask_source = "PerSAM (from the reference)"
    # Built now: it embeds the real images, so bad instance masks fail before generation too.
    scorer = Scorer(dino, clip, RealImages(paths=paths, images=images, masks=masks), segmenter)
    return _Plan(base, runs, prompts, identifier, height, width, scorer, reference, mask_source)


def _persam_segmenter(cfg: CompareConfig, image: str, mask: str, device: str) -> Any:
    from persam_dreambooth.segmentation.persam import PerSAM
    from persam_dreambooth.segmentation.sam import load_sam

    persam = PerSAM(load_sam(cfg.sam_model_type, checkpoint=cfg.sam_checkpoint, device=device))
    persam.set_reference(load_image(image, "--reference-image"), load_mask(mask, "--reference-mask"))
    return lambda im: persam.segment(im).mask


def _generate_all(cfg: CompareConfig, plan: _Plan, out: Path, progress: bool) -> dict[str, list[dict[str, Any]]]:
    import torch

    records = {}
    common = {
        "prompts": [p.prompt for p in plan.prompts], "num_images": cfg.num_images_per_prompt, "seed": cfg.seed,
        "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
        "height": plan.height, "width": plan.width, "batch_size": cfg.batch_size, "device": cfg.device,
        "dtype": cfg.dtype,
    }
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
    """Generate, score and report; see the module docstring. Pass a :class:`CompareConfig` or its fields."""
    from persam_dreambooth import __version__
    from persam_dreambooth.evaluation.report import write_reports

    cfg = config if config is not None else from_dict(CompareConfig, kwargs)
    plan = _prepare(cfg)
    out = ensure_output_dir(cfg.output_dir, "--output-dir")
    records = _generate_all(cfg, plan, out, progress)
    # Everything the scores depend on besides the generated images: a change rescores every image.
    settings = {
        "dino_model": cfg.dino_model, "clip_model": cfg.clip_model,
        "sam": {"model_type": cfg.sam_model_type, "checkpoint": cfg.sam_checkpoint} if plan.reference else None,
        "reference": plan.reference, "reference_fingerprint": _reference_fingerprint(plan.reference),
        "instance_images": [str(p.resolve()) for p in plan.scorer.real.paths],
        "instance_masks": plan.mask_source, "instance_fingerprint": plan.scorer.real.fingerprint(),
        "metric_version": 1,
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
    }
    files = write_reports(out, metrics, plan.prompts, {n: info["config"] for n, info in plan.runs.items()},
                          {n: info["path"] for n, info in plan.runs.items()})
    return CompareResult(out, metrics, files)


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
        "real_images": "the same measures among the real instance images (pairs of different images)",
    }
