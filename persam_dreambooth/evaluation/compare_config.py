"""The settings of ``compare``, as dataclasses.

* :class:`CompareSettings`: everything but the runs (the sampling settings come from
  :class:`~persam_dreambooth.generation.config.SamplingConfig`, shared with ``generate``).
* :class:`CompareConfig`: the settings plus the runs to compare, what
  :func:`~persam_dreambooth.evaluation.compare.compare` takes.
* :class:`CompareCommandConfig`: what the ``compare`` command takes: the settings plus either ``runs`` or ``train``
  with a training config (``compare --train``).

The field names are the config keys and, with dashes, the flags (``class_noun`` = ``--class-noun``; the underscore
spelling is accepted too). Errors name the flag the user typed, read from the field's metadata.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from persam_dreambooth.config import field_help, flag_name
from persam_dreambooth.generation.config import SamplingConfig

__all__ = ["BASE_RUN", "DEFAULT_DINO", "DEFAULT_CLIP", "DEFAULT_SAM_MODEL", "CompareSettings", "CompareConfig",
           "CompareCommandConfig", "parse_runs", "compare_flag", "no_flag"]

BASE_RUN = "base"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_SAM_MODEL = "vit_h"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(kw_only=True)
class CompareSettings(SamplingConfig):
    """How to generate, score and report (everything but which runs)."""

    instance_data_dir: str = field_help(
        help="the subject's real photos (the ones the runs were trained on; what DINO / CLIP-I compare against)",
        flag="--instance_data_dir", aliases=("--instance-data-dir",),
    )
    class_noun: str = field_help(help="class noun for the prompts, e.g. dog")
    output_dir: str = field_help(help="report folder")
    pretrained_model_name_or_path: str | None = field_help(
        None, help="base model; every run must have been trained from it; unset: the runs' own",
        flag="--pretrained_model_name_or_path", aliases=("--pretrained-model-name-or-path",),
    )
    prompt_set: str = field_help(
        "live", help="live (25 live-subject prompts), object (25 object prompts) or a template file: one template "
        "per line with {} for '<identifier> <class noun>', optionally 'group | template'"
    )
    identifier: str | None = field_help(None, help="rare-token identifier; unset: from the runs' instance_prompt")
    num_images_per_prompt: int = field_help(4, help="images per prompt and run; image i uses seed + i")
    dino_model: str = field_help(DEFAULT_DINO, help="DINO model id or local folder")
    clip_model: str = field_help(DEFAULT_CLIP, help="CLIP model id or local folder")
    background_metrics: bool = field_help(
        True, help="masked DINO, background leakage and background CLIP-T (needs SAM)"
    )
    sam_model_type: str | None = field_help(
        None, help=f"SAM model type for PerSAM: vit_h, vit_l, vit_b; unset: {DEFAULT_SAM_MODEL}; with --train: the "
        "training config's sam_model_type", flag="--sam-model", aliases=("--sam-model-type", "--sam_model_type"),
    )
    sam_checkpoint: str | None = field_help(
        None, help="SAM checkpoint file; unset: the cached official one; with --train: the training config's"
    )
    reference_image: str | None = field_help(None, help="PerSAM reference image; unset: first instance image")
    reference_mask: str | None = field_help(None, help="its mask; unset: that image's training mask")
    instance_mask_dir: str | None = field_help(None, help="masks of the instance images; unset: a run's masks/")
    bootstrap_resamples: int = field_help(
        2000, help="bootstrap resamples for the 95 percent confidence intervals of the differences"
    )
    bootstrap_seed: int = field_help(0, help="seed of the bootstrap (the intervals are reproducible)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images_per_prompt < 1:
            raise ValueError(f"`{compare_flag('num_images_per_prompt')}` must be >= 1, got "
                             f"{self.num_images_per_prompt}.")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"`{compare_flag('bootstrap_resamples')}` must be >= 100 (intervals from fewer "
                             f"resamples are noise), got {self.bootstrap_resamples}.")
        if (self.reference_image is None) != (self.reference_mask is None):
            raise ValueError(f"`{compare_flag('reference_image')}` and `{compare_flag('reference_mask')}` go "
                             "together: give both or neither.")


@dataclass(kw_only=True)
class CompareConfig(CompareSettings):
    """Settings of :func:`~persam_dreambooth.evaluation.compare.compare`: the runs and how to compare them."""

    runs: dict[str, str] = field_help(help="run name -> training output folder (LoRA weights or pipeline)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.runs = parse_runs(self.runs)

    @classmethod
    def from_settings(cls, settings: CompareSettings, runs: Mapping[str, str]) -> CompareConfig:
        """``settings`` with ``runs`` added."""
        fields = {name: getattr(settings, name) for name in CompareSettings.__dataclass_fields__}
        return cls(runs=dict(runs), **fields)


@dataclass(kw_only=True)
class CompareCommandConfig(CompareSettings):
    """The ``compare`` command: compare ``runs``, or with ``train`` first train a masked and a vanilla run."""

    runs: dict[str, str] | list[str] | None = field_help(
        None, help="training output folders as NAME=FOLDER, e.g. masked=out/masked vanilla=out/vanilla"
    )
    train: bool = field_help(
        False, help="train a masked and a vanilla run (same config, seed and steps; vanilla has mask_source none) "
        "first, then compare them"
    )
    train_config: str | None = field_help(None, help="with --train: the training config (YAML/TOML) of both runs")
    max_train_steps: int | None = field_help(None, help="with --train: overrides the config's max_train_steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        runs, train_config = compare_flag("runs"), compare_flag("train_config")
        if self.train:
            if self.runs:
                raise ValueError(f"`{runs}` and `{compare_flag('train')}` exclude each other: --train makes the runs "
                                 "itself.")
            if not self.train_config:
                raise ValueError(f"`{compare_flag('train')}` needs `{train_config} FILE` (the training config shared "
                                 "by both runs).")
        else:
            if self.train_config or self.max_train_steps is not None:
                raise ValueError(f"`{train_config}` and `{compare_flag('max_train_steps')}` only apply with "
                                 f"`{compare_flag('train')}`.")
            if not self.runs:
                raise ValueError(f"`{runs} NAME=FOLDER ...` is required (or `{compare_flag('train')}` to make the "
                                 "runs).")
            self.runs = parse_runs(self.runs)

    def settings(self) -> CompareSettings:
        """The comparison settings alone (without the runs and the training)."""
        return CompareSettings(**{name: getattr(self, name) for name in CompareSettings.__dataclass_fields__})


def compare_flag(name: str) -> str:
    """The ``compare`` flag of a settings field (``class_noun`` -> ``--class-noun``), for error messages."""
    return flag_name(CompareCommandConfig, name, dashes=True)


def no_flag(name: str) -> str:
    """The negative spelling of a boolean ``compare`` flag (``background_metrics`` -> ``--no-background-metrics``)."""
    return "--no-" + compare_flag(name).removeprefix("--")


def parse_runs(runs: Mapping[str, str] | list[str] | Any) -> dict[str, str]:
    """``["masked=out/a", "vanilla=out/b"]`` (or a mapping) -> ``{"masked": "out/a", ...}``, names checked."""
    flag = compare_flag("runs")
    if isinstance(runs, Mapping):
        pairs = [(str(k), str(v)) for k, v in runs.items()]
    else:
        pairs = []
        for item in runs:
            if "=" not in item:
                raise ValueError(f"`{flag}` entries must be NAME=FOLDER (e.g. masked=out/masked), got {item!r}.")
            name, _, path = item.partition("=")
            pairs.append((name.strip(), path.strip()))
    if not pairs:
        raise ValueError(f"`{flag}` must name at least one run: NAME=FOLDER ...")
    out: dict[str, str] = {}
    for name, path in pairs:
        if not _NAME_RE.match(name):
            raise ValueError(f"`{flag}` name {name!r} must be letters, digits, '_', '-' or '.' (e.g. masked).")
        if name == BASE_RUN:
            raise ValueError(f"`{flag}` name {BASE_RUN!r} is reserved for the base model; choose another name.")
        if name in out:
            raise ValueError(f"`{flag}` name {name!r} appears twice; run names must be unique.")
        if not path:
            raise ValueError(f"`{flag}` entry {name!r} has no folder: write {name}=FOLDER.")
        out[name] = path
    return out
