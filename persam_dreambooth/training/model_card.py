"""``OUT/README.md``: a Hugging Face style model card with the masks grid, validation samples and the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.utils.io import atomic_write_text

__all__ = ["write_model_card"]

_SETTINGS = (
    "train_mode", "mask_source", "mask_method", "mask_normalize", "mask_background_weight", "mask_dilate_px",
    "unmasked_probability", "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler", "rank", "lora_alpha", "train_text_encoder", "with_prior_preservation", "prior_loss_weight",
    "snr_gamma", "offset_noise", "mixed_precision", "seed",
)


def write_model_card(
    output_dir: Path,
    config: TrainConfig,
    *,
    global_step: int,
    masks_grid: str | None,
    validation_images: list[str],
    version: str,
    final_loss: float | None = None,
) -> Path:
    """Write ``output_dir/README.md`` (atomically). Image paths are relative to ``output_dir``."""
    lora = config.train_mode == "lora"
    front: dict[str, Any] = {
        "base_model": config.pretrained_model_name_or_path,
        "library_name": "diffusers",
        "instance_prompt": config.instance_prompt,
        "tags": ["text-to-image", "diffusers", "dreambooth", "persam-dreambooth", "masked-loss",
                 *(["lora"] if lora else [])],
    }
    if config.validation_prompt:
        front["widget"] = [{"text": config.validation_prompt}]
    masked = config.mask_source != "none"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {'LoRA' if lora else 'DreamBooth'} for `{config.instance_prompt}`", "",
        f"Trained with persam-dreambooth {version} on `{config.pretrained_model_name_or_path}` for {global_step} "
        f"steps, {'with a masked loss' if masked else 'as vanilla DreamBooth (no mask)'}"
        + (f" (masks: {config.mask_source}, `mask_normalize={config.mask_normalize}`, background weight "
           f"{config.mask_background_weight})" if masked else "") + ".", "",
    ]
    if masks_grid:
        weight = config.mask_background_weight
        what = ("only the subject inside these masks" if weight == 0 else
                f"the subject inside these masks, and the background at weight {weight}")
        lines += ["## Masks", "", f"The loss supervised {what}:", "", f"![masks]({masks_grid})", ""]
    if validation_images:
        lines += ["## Samples", ""]
        if config.validation_prompt:
            lines += [f"Prompt: `{config.validation_prompt}`, the same seed at every step.", ""]
        for image in validation_images:
            name = Path(image).stem
            label = "After training" if name == "final" else f"Step {int(name.removeprefix('step-'))}"
            lines += [f"{label}:", "", f"![{name}]({image})", ""]
    lines += ["## Use", "", "```python", "from diffusers import DiffusionPipeline", ""]
    if lora:
        lines += [f"pipe = DiffusionPipeline.from_pretrained({config.pretrained_model_name_or_path!r})",
                  "pipe.load_lora_weights(\"path/to/this/folder\")"]
    else:
        lines += ["pipe = DiffusionPipeline.from_pretrained(\"path/to/this/folder\")"]
    lines += [f"image = pipe({config.instance_prompt + ' on the beach'!r}).images[0]", "```", "",
              "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | `{getattr(config, name)}` |" for name in _SETTINGS]
    if final_loss is not None:
        lines += [f"| final loss | `{final_loss:.6g}` |"]
    lines += ["", "The full configuration is in `config.resolved.yaml`.", ""]
    path = output_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
