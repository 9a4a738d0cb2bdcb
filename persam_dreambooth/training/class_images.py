"""Class images for prior preservation: use what ``class_data_dir`` holds, generate only the shortfall.

Generation uses the base model with ``class_prompt``, in batches of ``sample_batch_size``. Generated image ``i`` gets
the seed ``derive_seed(seed, i)`` and is written atomically as ``{i:05d}-{sha1 of its pixels}.jpg`` as soon as its
batch is done. A rerun counts the images there (yours and generated ones), and generates the shortfall under the
smallest indices not yet taken, so an interrupted generation (by one process or several) resumes where it stopped
and never duplicates an image. Class images are never masked.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from persam_dreambooth.data.images import IMAGE_EXTENSIONS
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import BaseModelInfo
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.utils.io import atomic_save_image, ensure_output_dir

logger = logging.getLogger(__name__)

__all__ = ["existing_class_images", "ensure_class_images"]

_GENERATED = re.compile(r"^(\d{5,})-[0-9a-f]+\.jpg$")


def existing_class_images(folder: str | Path) -> list[Path]:
    """The complete image files in ``folder`` (sorted; hidden and temporary files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _free_indices(existing: list[Path], count: int) -> list[int]:
    """The ``count`` smallest indices that no generated image in ``existing`` (``{i:05d}-{sha1}.jpg``) uses."""
    taken = {int(m.group(1)) for path in existing if (m := _GENERATED.match(path.name))}
    free: list[int] = []
    index = 0
    while len(free) < count:
        if index not in taken:
            free.append(index)
        index += 1
    return free


def _generation_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    precision = config.prior_generation_precision
    if precision is None:
        precision = "fp16" if device.type == "cuda" else "fp32"
    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def ensure_class_images(config: TrainConfig, accelerator: Accelerator | PartialState, seed: int,
                        info: BaseModelInfo | None = None) -> list[Path]:
    """Make sure ``class_data_dir`` holds ``num_class_images`` images; return the ones to train with.

    Every process must call it; each generates its share of the missing images with the model family's pipeline
    (``info``: the inspected base model; inspected here when None).
    """
    assert config.class_data_dir is not None and config.class_prompt is not None
    folder = ensure_output_dir(config.class_data_dir, "class_data_dir")
    existing = existing_class_images(folder)
    accelerator.wait_for_everyone()  # every process counts the same images before any process writes one
    missing = config.num_class_images - len(existing)
    if missing <= 0:
        return existing[: config.num_class_images]
    indices = _free_indices(existing, missing)
    logger.info("Generating %d class images for %r in %s", missing, config.class_prompt, folder)
    from persam_dreambooth.training.components import family_of, inspect_base_model

    info = info or inspect_base_model(config)
    family = family_of(info)
    device = accelerator.device
    dtype = _generation_dtype(config, device)
    extra = family.pipeline_overrides(None, config)
    if config.pretrained_vae_model_name_or_path:
        extra["vae"] = family.component_class(info, "vae").from_pretrained(
            config.pretrained_vae_model_name_or_path, revision=config.revision, dtype=dtype)
    pipe = family.pipeline_class().from_pretrained(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant, dtype=dtype, **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    indices = indices[accelerator.process_index:: accelerator.num_processes]  # this process's share
    batches = [indices[i: i + config.sample_batch_size] for i in range(0, len(indices), config.sample_batch_size)]
    for batch in tqdm(batches, desc="class images", disable=not accelerator.is_local_main_process):
        generators = [torch.Generator(device).manual_seed(derive_seed(seed, index, 0xC1A55)) for index in batch]
        with torch.no_grad():
            # prompt= by keyword: some pipelines' first argument is not the prompt (Flux2KleinPipeline's is `image`).
            images = pipe(
                prompt=[config.class_prompt] * len(batch), generator=generators, height=config.resolution,
                width=config.resolution, num_inference_steps=config.class_generation_steps,
                **family.pipeline_kwargs(config),
            ).images
        for index, image in zip(batch, images, strict=True):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
            atomic_save_image(image, folder / f"{index:05d}-{digest}.jpg", quality=95)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return existing_class_images(folder)[: config.num_class_images]
