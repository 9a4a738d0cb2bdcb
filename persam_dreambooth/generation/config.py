"""The settings of ``generate`` (and the sampling settings ``compare`` shares with it), as dataclasses.

The field names are the config keys and, with dashes, the flags (``num_inference_steps`` = ``--num-inference-steps``;
``--num_inference_steps`` is accepted too). ``persam_dreambooth.config`` derives the flags, reads ``--config FILE``
and checks the types; ``__post_init__`` checks the ranges and names the flag in its errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from persam_dreambooth.config import field_help, flag_name

__all__ = ["SamplingConfig", "GenerationConfig", "PROMPTS_FILE_FLAG"]

# ``generate``'s one flag that is not a field: a text file of prompts, read into ``prompts`` by the command.
PROMPTS_FILE_FLAG = "--prompts-file"


def _flag(cls: type, name: str) -> str:
    """The flag of field ``name`` (``--num-images``), for error messages."""
    return flag_name(cls, name, dashes=True)


def _error(cls: type, name: str, rule: str) -> ValueError:
    """An error naming the field's flag, as the user types it: ```--num-images` must be >= 1, got 0.``"""
    return ValueError(f"`{_flag(cls, name)}` {rule}.")


@dataclass(kw_only=True)
class SamplingConfig:
    """How every image is sampled: the part of the settings ``generate`` and ``compare`` share."""

    seed: int = field_help(0, help="seed of image 0 of every prompt; image i uses seed + i")
    num_inference_steps: int = field_help(30, help="denoising steps")
    guidance_scale: float = field_help(7.5, help="classifier-free guidance scale")
    height: int | None = field_help(
        None, help="image height, a multiple of 8 and of the VAE scale factor; unset: the model's"
    )
    width: int | None = field_help(
        None, help="image width, a multiple of 8 and of the VAE scale factor; unset: the model's"
    )
    lora_scale: float = field_help(
        1.0, help="LoRA strength (the scale of the pipeline's cross_attention_kwargs, joint_attention_kwargs or "
        "attention_kwargs)")
    batch_size: int = field_help(4, help="images per pipeline call; does not change the starting noise")
    device: str | None = field_help(None, help="cuda, cpu, mps, ...; unset: best available")
    dtype: Literal["float32", "float16", "bfloat16"] = field_help("float32", help="weights and compute dtype")

    def __post_init__(self) -> None:
        cls = type(self)
        for name in ("num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise _error(cls, name, f"must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise _error(cls, "seed", f"must be >= 0, got {self.seed}")
        for name in ("guidance_scale", "lora_scale"):  # also when built in code, not only from flags and files
            if not math.isfinite(getattr(self, name)):
                raise _error(cls, name, f"must be a finite number, got {getattr(self, name)!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise _error(cls, name, f"must be a positive number of pixels, got {value}")


@dataclass(kw_only=True)
class GenerationConfig(SamplingConfig):
    """Everything :func:`~persam_dreambooth.generation.generate` needs."""

    prompts: list[str] = field_help(
        help="the prompts, in order (their index names the files); repeat --prompt for several", flag="--prompt"
    )
    output_dir: str = field_help(help="folder for images/, grids/ and generation.jsonl")
    pretrained_model_name_or_path: str | None = field_help(
        None, help="base model (Hub id or folder); read from the LoRA folder's config.resolved.yaml when omitted",
        flag="--pretrained_model_name_or_path", aliases=("--pretrained-model-name-or-path",),
    )
    lora: str | None = field_help(None, help="training output folder with pytorch_lora_weights.safetensors")
    model: str | None = field_help(None, help="fully fine-tuned pipeline folder (model_index.json), instead of --lora")
    num_images: int = field_help(4, help="images per prompt; image i uses seed + i")
    negative_prompt: str | None = field_help(None, help="negative prompt for every image")

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self)
        prompt = _flag(cls, "prompts")
        if not self.prompts:
            raise ValueError(f"Nothing to generate: give at least one `{prompt}` or a `{PROMPTS_FILE_FLAG}` (at least "
                             "one prompt is required).")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"`{prompt}` number {i + 1} must be a non-empty string, got {p!r}.")
        if not self.output_dir:
            raise _error(cls, "output_dir", "is required")
        if self.num_images < 1:
            raise _error(cls, "num_images", f"must be >= 1, got {self.num_images}")
        if self.lora is not None and self.model is not None:
            raise ValueError(f"Pass either `{_flag(cls, 'lora')}` or `{_flag(cls, 'model')}`, not both.")
