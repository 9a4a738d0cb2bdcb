"""``compare --train``: train a masked and a vanilla run from one training config, then compare them.

The two runs differ in the mask alone: same base model, instance photos, prompt, seed, steps and every other
setting; the vanilla run has ``mask_source: none`` (all-ones masks through the same code path, Decision 3). They go
to ``OUTPUT/train/masked`` and ``OUTPUT/train/vanilla``. A run whose folder already holds final weights trained with
the same settings is reused, so an interrupted ``compare --train`` picks up where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from persam_dreambooth.config import ConfigError, from_dict, load_config_file, to_dict
from persam_dreambooth.evaluation.compare import CompareConfig, CompareResult, compare
from persam_dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder
from persam_dreambooth.evaluation.prompts import build_prompts, infer_identifier
from persam_dreambooth.generation.pipeline import find_run_weights, read_run_config
from persam_dreambooth.training.config import TrainConfig

__all__ = ["train_and_compare", "paired_train_configs"]

logger = logging.getLogger(__name__)

# Settings that only say where the masks come from: dropped for the vanilla run.
_MASK_KEYS = ("mask_dir", "reference_image", "reference_mask", "reference_box", "reference_point", "mask_method")
# Settings the trainer fills in at run time when the config leaves them null (``mixed_precision``: what accelerate
# ran with). A finished run matches a null there whatever it recorded; an explicit value must match.
_RESOLVED_AT_RUN_TIME = frozenset({"mixed_precision", "seed"})


def paired_train_configs(
    train_config: Mapping[str, Any], output_dir: str | os.PathLike[str], *, instance_data_dir: str,
    pretrained_model_name_or_path: str | None = None, max_train_steps: int | None = None, seed: int = 0,
) -> dict[str, TrainConfig]:
    """The masked and the vanilla :class:`TrainConfig` of one training config (validated, nothing written).

    Args:
        train_config: training settings (a YAML file's contents); ``output_dir`` in it is ignored.
        output_dir: the comparison's folder; the runs go to ``train/masked`` and ``train/vanilla`` inside.
        instance_data_dir: the subject's photos (the same ones the comparison scores against).
        pretrained_model_name_or_path: overrides the config's base model when given.
        max_train_steps: overrides the config's step count when given.
        seed: used when the config sets no seed (both runs must share one).

    Raises:
        ConfigError: a bad training config, or one whose ``mask_source`` is ``none`` (nothing to compare).
    """
    data = dict(train_config)
    data["instance_data_dir"] = str(instance_data_dir)
    if pretrained_model_name_or_path:
        data["pretrained_model_name_or_path"] = pretrained_model_name_or_path
    if max_train_steps is not None:
        data["max_train_steps"] = max_train_steps
    if data.get("seed") is None:
        data["seed"] = seed
    if data.get("mask_source") == "none":
        raise ConfigError(
            "`--train-config` sets `mask_source: none`, so both runs would be vanilla. Give the masked run's mask "
            "settings (mask_source persam/persam_f with reference_image + reference_mask, or mask_dir); the vanilla "
            "run is made from it with mask_source none."
        )
    out = Path(output_dir) / "train"
    masked = from_dict(TrainConfig, {**data, "output_dir": str(out / "masked")})
    vanilla_data = {k: v for k, v in data.items() if k not in _MASK_KEYS}
    vanilla = from_dict(TrainConfig, {**vanilla_data, "mask_source": "none", "output_dir": str(out / "vanilla")})
    return {"masked": masked, "vanilla": vanilla}


def _needs_training(config: TrainConfig) -> bool:
    """False when ``output_dir`` holds final weights trained with exactly ``config``; raises if with another."""
    folder = Path(config.output_dir)
    try:
        find_run_weights(folder)
    except FileNotFoundError:
        return True
    stored = {k: v for k, v in (read_run_config(folder) or {}).items() if k != "_meta"}
    wanted = to_dict(config)
    diff = sorted(
        k for k in set(stored) | set(wanted)
        if stored.get(k) != wanted.get(k) and not (k in _RESOLVED_AT_RUN_TIME and wanted.get(k) is None)
    )
    if diff:
        key = diff[0]
        raise ValueError(
            f"{str(folder)!r} already holds a run trained with other settings ({key}: {stored.get(key)!r} there, "
            f"{wanted.get(key)!r} now). Choose another `--output-dir` or delete that folder."
        )
    logger.info("Reusing the finished run in %s", folder)
    return False


def train_and_compare(
    train_config: str | os.PathLike[str] | Mapping[str, Any],
    compare_settings: Mapping[str, Any],
    *,
    max_train_steps: int | None = None,
    progress: bool = True,
) -> CompareResult:
    """Train the masked and the vanilla run, then :func:`~persam_dreambooth.evaluation.compare.compare` them.

    Args:
        train_config: a training config file (YAML/TOML) or its contents.
        compare_settings: :class:`CompareConfig` fields except ``runs`` (``instance_data_dir`` and
            ``pretrained_model_name_or_path`` also apply to the training; ``sam_model_type`` and ``sam_checkpoint``
            default to the training config's).
        max_train_steps: overrides the training config's step count.
        progress: progress bars during generation and scoring.

    Everything that can be checked without trained weights (both training configs, the prompt set, the metric
    models) is checked before the first training step.
    """
    from persam_dreambooth.training import train

    data = load_config_file(train_config) if isinstance(train_config, str | os.PathLike) else dict(train_config)
    settings = dict(compare_settings)
    configs = paired_train_configs(
        data, settings["output_dir"], instance_data_dir=settings["instance_data_dir"],
        pretrained_model_name_or_path=settings.get("pretrained_model_name_or_path"),
        max_train_steps=max_train_steps, seed=int(settings.get("seed") or 0),
    )
    # PerSAM for the metrics uses the training's SAM unless the comparison names its own.
    settings.setdefault("sam_model_type", configs["masked"].sam_model_type)
    settings.setdefault("sam_checkpoint", configs["masked"].sam_checkpoint)
    cfg = CompareConfig(runs={n: c.output_dir for n, c in configs.items()}, **settings)
    identifier = cfg.identifier or infer_identifier(configs["masked"].instance_prompt, cfg.class_noun)
    if not identifier:
        raise ValueError(
            f"`--identifier` is required: it could not be read from instance_prompt "
            f"{configs['masked'].instance_prompt!r} and class noun {cfg.class_noun!r}."
        )
    build_prompts(cfg.prompt_set, identifier, cfg.class_noun)
    DinoEmbedder(cfg.dino_model)  # fail now, not after two trainings, when a metric model is missing
    ClipEmbedder(cfg.clip_model)
    todo = {name: c for name, c in configs.items() if _needs_training(c)}
    for name, config in todo.items():
        logger.info("Training the %s run into %s", name, config.output_dir)
        train(config)
    return compare(cfg, progress=progress)
