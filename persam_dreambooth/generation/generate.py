"""Batched, deterministic, resumable text-to-image generation.

Determinism: image ``i`` of every prompt uses seed ``seed + i`` through its own CPU ``torch.Generator``, passed to
the pipeline as a list (one generator per batch item). The starting latents therefore depend on the seed alone, not on
the batch size, the batch's other members or the device (CPU generators give the same noise everywhere).

Output layout in ``output_dir``::

    images/p003_i01_s1.png   # prompt index 3, image index 1, seed 1
    grids/p003.jpg           # all images of prompt 3 in one grid
    generation.jsonl         # one strict-JSON record per image: prompt, seed and every setting that made it
    .persam.lock             # the run's advisory lock: one writer per folder (persam_dreambooth.utils.locks)

Resuming: an image whose PNG exists, decodes and whose record in ``generation.jsonl`` has the same settings (the
trained weights' fingerprint included, so weights retrained into the same folder are noticed) is skipped. Every file
is written atomically, so a crash leaves either a complete PNG or none. An existing image made with *different*
settings is an error (raised before anything is generated), never silently mixed in.

Before any work, the output folder is checked to be writable and ``device`` to exist; then the folder is locked for
the whole run, so a second run into it refuses at once, naming this run's PID.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from persam_dreambooth.config import flag_name, from_dict
from persam_dreambooth.generation.config import PROMPTS_FILE_FLAG, GenerationConfig
from persam_dreambooth.generation.pipeline import (
    check_image_size,
    family_call_kwargs,
    find_run_weights,
    load_pipeline,
    lora_scale_kwargs,
    model_geometry,
    read_base_model,
    weights_fingerprint,
)
from persam_dreambooth.utils.devices import resolve_device
from persam_dreambooth.utils.grids import image_grid
from persam_dreambooth.utils.io import atomic_save_image, atomic_write_text, check_output_dir, dumps_json
from persam_dreambooth.utils.locks import lock_output_dir

__all__ = ["GenerationResult", "generate", "image_name", "read_prompts_file", "load_records"]

logger = logging.getLogger(__name__)

RECORDS_NAME = "generation.jsonl"
# Settings that decide an image's pixels: an existing image is reused only when all of them match.
IDENTITY_KEYS = (
    "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width",
    "pretrained_model_name_or_path", "lora", "lora_scale", "model", "weights_fingerprint", "dtype",
    "pipeline_kwargs",  # the family's extra pipeline arguments (max_sequence_length...); {} for SD / SDXL
)


def _flag(name: str) -> str:
    """The ``generate`` flag of a :class:`GenerationConfig` field, for error messages."""
    return flag_name(GenerationConfig, name, dashes=True)


@dataclass
class GenerationResult:
    """What :func:`generate` made: one record per requested image (in prompt, then image order) and the grids."""

    output_dir: Path
    records: list[dict[str, Any]]
    grids: list[Path] = field(default_factory=list)
    num_generated: int = 0
    num_reused: int = 0

    def image_paths(self) -> list[Path]:
        return [self.output_dir / r["file"] for r in self.records]


def image_name(prompt_index: int, image_index: int, seed: int) -> str:
    """``images/p003_i01_s1234.png``: prompt index, image index and seed in the file name."""
    return f"images/p{prompt_index:03d}_i{image_index:02d}_s{seed}.png"


def read_prompts_file(path: str | os.PathLike[str], arg_name: str = PROMPTS_FILE_FLAG) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{arg_name}` file {str(path)!r} does not exist.")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"`{arg_name}` file {str(path)!r} holds no prompts (one per line, # for comments).")
    return prompts


def load_records(output_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The records of ``generation.jsonl`` in ``output_dir``, keyed by their ``file`` (empty when absent)."""
    path = Path(output_dir) / RECORDS_NAME
    if not path.is_file():
        return {}
    records = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} line {n} is not valid JSON: {exc}") from exc
        rec.setdefault("pipeline_kwargs", {})  # records written before it was recorded: SD / SDXL only, i.e. {}
        records[rec["file"]] = rec
    return records


def _write_records(output_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    ordered = sorted(records.values(), key=lambda r: (r["prompt_index"], r["image_index"], r["file"]))
    # Strict JSON (no NaN / Infinity), one record a line.
    atomic_write_text(output_dir / RECORDS_NAME, "".join(dumps_json(r) + "\n" for r in ordered))


def _is_complete_png(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _path_id(value: str | None) -> str | None:
    """A local path made absolute (so reruns from another folder match); Hub ids unchanged."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else value


def _resolve(config: GenerationConfig) -> dict[str, Any]:
    """The settings recorded with every image, with the base model filled in and paths made absolute."""
    base = config.pretrained_model_name_or_path
    fingerprint = None
    if config.model is not None:
        weights = find_run_weights(config.model, _flag("model"))
        if weights.kind != "full":
            raise ValueError(
                f"`{_flag('model')}` folder {config.model!r} holds LoRA weights (pytorch_lora_weights.safetensors), "
                f"not a full pipeline (model_index.json); pass it as `{_flag('lora')}` instead."
            )
        fingerprint = weights_fingerprint(weights)
    elif config.lora is not None:
        weights = find_run_weights(config.lora, _flag("lora"))
        if weights.kind != "lora":
            raise ValueError(
                f"`{_flag('lora')}` folder {config.lora!r} holds a full pipeline (model_index.json), not LoRA "
                f"weights; pass it as `{_flag('model')}` instead."
            )
        fingerprint = weights_fingerprint(weights)
        trained_on = read_base_model(config.lora)
        if base is not None and trained_on is not None and _path_id(trained_on) != _path_id(base):
            logger.warning("The LoRA in %s was trained on %s, not on %s %s",
                           config.lora, trained_on, _flag("pretrained_model_name_or_path"), base)
        if base is None:
            base = read_base_model(config.lora)
            if base is None:
                raise ValueError(
                    f"`{_flag('pretrained_model_name_or_path')}` is required: the `{_flag('lora')}` folder "
                    f"{config.lora!r} has no config.resolved.yaml naming its base model."
                )
            logger.info("Base model from the LoRA folder's config.resolved.yaml: %s", base)
    elif base is None:
        raise ValueError(f"`{_flag('pretrained_model_name_or_path')}` is required (or `{_flag('model')}` for a "
                         "fine-tuned pipeline).")
    # The family's extra pipeline arguments (max_sequence_length, FLUX.2's text_encoder_out_layers), as the run
    # trained with them (its config.resolved.yaml), so its images match its validation images.
    family_kwargs = family_call_kwargs(config.model or base, config.model or config.lora)
    return {
        "pipeline_kwargs": family_kwargs,
        "negative_prompt": config.negative_prompt,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "pretrained_model_name_or_path": None if config.model is not None else _path_id(base),
        "lora": _path_id(config.lora),
        "lora_scale": config.lora_scale if config.lora is not None else None,
        "model": _path_id(config.model),
        "weights_fingerprint": fingerprint,
        "dtype": config.dtype,
    }


def generate(
    config: GenerationConfig | None = None,
    /,
    *,
    pipeline: Any = None,
    progress: bool = True,
    **kwargs: Any,
) -> GenerationResult:
    """Generate ``num_images`` images for every prompt, skipping images already on disk.

    Call it with a :class:`GenerationConfig` or with its fields as keywords::

        generate(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5", lora="out/masked",
                 prompts=["a sks dog on the beach"], num_images=4, seed=0, output_dir="gen")

    Args:
        config: the settings (or pass them as keywords; unknown keywords are errors).
        pipeline: an already loaded pipeline matching ``config`` (skips loading; the caller vouches for it).
        progress: show a tqdm progress bar.

    Returns:
        The records of all requested images (reused and new) and the grid paths.

    Raises:
        ValueError: bad settings, a size not divisible by the VAE scale factor, or existing images made with other
            settings in ``output_dir`` (all before anything is generated).
        FileNotFoundError: a ``lora``/``model`` folder without weights.
        PermissionError: ``output_dir`` cannot be created or written (checked before anything else).
        FolderLockedError: another run is writing into ``output_dir`` (the message names its PID).
    """
    if config is None:
        config = from_dict(GenerationConfig, kwargs)
    elif kwargs:
        raise TypeError(f"Pass either a GenerationConfig or keyword settings, not both (got {sorted(kwargs)}).")
    out = check_output_dir(config.output_dir, _flag("output_dir"))  # before any work: can it be written at all?
    device = str(resolve_device(config.device, _flag("device"), prefer_mps=True))
    settings = _resolve(config)
    if pipeline is not None and getattr(pipeline, "unet", None) is not None:
        scale = int(pipeline.vae_scale_factor)
        default = int(pipeline.unet.config.sample_size) * scale
    else:
        scale, default = model_geometry(settings["model"] or settings["pretrained_model_name_or_path"])
    height, width = config.height or default, config.width or default
    check_image_size(height, width, scale)
    settings.update(height=height, width=width)

    # One writer per folder for the whole run: a second `generate` into it refuses with this run's PID.
    with lock_output_dir(out, "generate", _flag("output_dir")):
        return _generate_into(out, config, settings, pipeline, device, progress)


def _generate_into(
    out: Path, config: GenerationConfig, settings: dict[str, Any], pipeline: Any, device: str, progress: bool
) -> GenerationResult:
    """The part of :func:`generate` that reads and writes ``out`` (under its lock)."""
    existing = load_records(out)
    jobs, todo, mismatched = [], [], []
    for p_idx, prompt in enumerate(config.prompts):
        for i_idx in range(config.num_images):
            seed = config.seed + i_idx
            rec = {"file": image_name(p_idx, i_idx, seed), "prompt_index": p_idx, "image_index": i_idx,
                   "prompt": prompt, "seed": seed, **settings}
            jobs.append(rec)
            old = existing.get(rec["file"])
            if old is None or not _is_complete_png(out / rec["file"]):
                todo.append(rec)
                continue
            diff = [k for k in IDENTITY_KEYS if old.get(k) != rec[k]]
            if diff:
                mismatched.append((rec["file"], {k: (old.get(k), rec[k]) for k in diff}))
    if mismatched:
        name, diff = mismatched[0]
        detail = "; ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(
            f"`{_flag('output_dir')}` {str(out)!r} already holds {len(mismatched)} image(s) made with other settings "
            f"(first: {name}: {detail}). Choose another output folder or delete the old images."
        )
    reused = len(jobs) - len(todo)
    if reused:
        logger.info("Reusing %d existing image(s) in %s", reused, out)
    if todo:
        _run(config, pipeline, settings, todo, out, existing, device, progress)
    grids = _write_grids(out, config, jobs)
    return GenerationResult(out, [existing[j["file"]] for j in jobs], grids, len(todo), reused)


def _run(
    config: GenerationConfig,
    pipe: Any,
    settings: dict[str, Any],
    todo: list[dict[str, Any]],
    out: Path,
    records: dict[str, dict[str, Any]],
    device: str,
    progress: bool,
) -> None:
    """Generate ``todo`` in batches of ``batch_size``, saving each PNG and the records after every batch."""
    import torch
    from tqdm.auto import tqdm

    from persam_dreambooth import __version__

    if pipe is None:
        pipe = load_pipeline(
            config.pretrained_model_name_or_path or settings["pretrained_model_name_or_path"],
            lora=config.lora, model=config.model, device=device, dtype=config.dtype,
        )
    call_kwargs: dict[str, Any] = dict(settings["pipeline_kwargs"])
    if config.lora is not None:  # cross_attention_kwargs, joint_attention_kwargs... per the pipeline's signature
        call_kwargs.update(lora_scale_kwargs(pipe, config.lora_scale))
    if config.negative_prompt is not None:  # FLUX.2 [klein] has no negative prompt: say so before any image
        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"`{_flag('negative_prompt')}`: {type(pipe).__name__} takes no negative prompt; drop it.")
    scheduler = type(pipe.scheduler).__name__
    # Progress in denoising steps (a batch of large images takes minutes on a CPU), images done in the postfix.
    steps = config.num_inference_steps
    bar = tqdm(total=len(todo) * steps, desc=f"generate {len(todo)} image(s) -> {out.name}", unit="step",
               disable=not progress)
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def step_done(_pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.update(len(batch))
            return callback_kwargs

        call_kwargs["callback_on_step_end"] = step_done
    try:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            before = bar.n
            # One CPU generator per image: identical noise whatever the batch size or device.
            generators = [torch.Generator("cpu").manual_seed(rec["seed"]) for rec in batch]
            with torch.inference_mode():
                result = pipe(
                    prompt=[rec["prompt"] for rec in batch],
                    **({"negative_prompt": [config.negative_prompt] * len(batch)}
                       if config.negative_prompt is not None else {}),
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale,
                    height=settings["height"],
                    width=settings["width"],
                    generator=generators,
                    output_type="pil",
                    **call_kwargs,
                )
            nsfw = getattr(result, "nsfw_content_detected", None) or [None] * len(batch)
            for rec, image, flagged in zip(batch, result.images, nsfw, strict=True):
                atomic_save_image(image, out / rec["file"])
                records[rec["file"]] = {**rec, "batch_size": config.batch_size, "device": device,
                                        "scheduler": scheduler,
                                        "nsfw_content_detected": None if flagged is None else bool(flagged),
                                        "persam_dreambooth_version": __version__}
            _write_records(out, records)
            bar.update(before + len(batch) * steps - bar.n)  # the rest, or all of it without the step callback
            bar.set_postfix_str(f"{start + len(batch)}/{len(todo)} images")
    finally:
        bar.close()


def _write_grids(out: Path, config: GenerationConfig, jobs: Sequence[dict[str, Any]]) -> list[Path]:
    """One grid per prompt (up to 4 images a row), labelled with the seeds (one row: above each image; several
    rows: the seed range left of each row)."""
    cols = min(4, config.num_images)
    grids = []
    for p_idx in range(len(config.prompts)):
        recs = [j for j in jobs if j["prompt_index"] == p_idx]
        images = []
        for rec in recs:
            with Image.open(out / rec["file"]) as im:
                images.append(im.convert("RGB"))
        rows = [images[k:k + cols] for k in range(0, len(images), cols)]
        seeds = [[r["seed"] for r in recs[k:k + cols]] for k in range(0, len(recs), cols)]
        if len(rows) == 1:
            grid = image_grid(rows, col_labels=[f"seed {s}" for s in seeds[0]])
        else:
            grid = image_grid(rows, row_labels=[f"seeds {s[0]}-{s[-1]}" for s in seeds])
        path = out / "grids" / f"p{p_idx:03d}.jpg"
        atomic_save_image(grid, path, quality=90)
        grids.append(path)
    return grids
