"""``compare --train``: train a masked and a vanilla run from one training config, then compare them.

The two runs differ in the mask alone: same base model, instance photos, prompt, seed, steps and every other
setting; the vanilla run has ``mask_source: none`` (all-ones masks through the same code path,
``docs/design/masked_dreambooth.md`` Decision 3). They go to ``OUTPUT/train/masked`` and ``OUTPUT/train/vanilla``.

An interrupted ``compare --train`` picks up where it stopped: a run whose folder holds final weights trained with the
same settings is reused, an unfinished one resumes from its latest checkpoint (the trainer's
``resume_from_checkpoint: latest``), and the generations resume image by image as ``generate`` does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from persam_dreambooth.config import ConfigError, from_dict, load_config_file, to_dict
from persam_dreambooth.evaluation.compare import (
    CompareResult,
    compare,
    compare_device,
    compare_locked,
    load_metric_models,
    locked_output_dir,
)
from persam_dreambooth.evaluation.compare_config import (
    CompareCommandConfig,
    CompareConfig,
    CompareSettings,
    compare_flag,
    parse_runs,
)
from persam_dreambooth.evaluation.prompts import build_prompts, infer_identifier
from persam_dreambooth.generation.pipeline import find_run_weights, read_run_config
from persam_dreambooth.training.checkpoint import list_checkpoints
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.utils.io import check_output_dir

__all__ = ["train_and_compare", "paired_train_configs", "run_compare_command"]

logger = logging.getLogger(__name__)

# Settings that only say where the masks come from: dropped for the vanilla run.
_MASK_KEYS = ("mask_dir", "reference_image", "reference_mask", "reference_box", "reference_point", "mask_method")
# Settings the trainer fills in at run time when the config leaves them null (``mixed_precision``: what accelerate
# ran with). A finished run matches a null there whatever it recorded; an explicit value must match.
_RESOLVED_AT_RUN_TIME = frozenset({"mixed_precision", "seed"})
# How a run got to its end, not what it is: a run resumed from its checkpoint matches one trained in one go.
_HOW_RESUMED = frozenset({"resume_from_checkpoint"})


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
            f"`{compare_flag('train_config')}` sets `mask_source: none`, so both runs would be vanilla. Give the "
            "masked run's mask settings (mask_source persam/persam_f with reference_image + reference_mask, or "
            "mask_dir); the vanilla run is made from it with mask_source none."
        )
    out = Path(output_dir) / "train"
    masked = from_dict(TrainConfig, {**data, "output_dir": str(out / "masked")})
    vanilla_data = {k: v for k, v in data.items() if k not in _MASK_KEYS}
    vanilla = from_dict(TrainConfig, {**vanilla_data, "mask_source": "none", "output_dir": str(out / "vanilla")})
    return {"masked": masked, "vanilla": vanilla}


def _check_same_settings(config: TrainConfig, folder: Path, what: str) -> None:
    """Raise unless ``folder``'s ``config.resolved.yaml`` holds ``config`` (up to what the trainer resolves at run
    time, and how the run was resumed)."""
    stored = {k: v for k, v in (read_run_config(folder) or {}).items() if k != "_meta"}
    wanted = to_dict(config)
    diff = sorted(
        k for k in set(stored) | set(wanted)
        if stored.get(k) != wanted.get(k) and k not in _HOW_RESUMED
        and not (k in _RESOLVED_AT_RUN_TIME and wanted.get(k) is None)
    )
    if diff:
        key = diff[0]
        raise ValueError(
            f"{str(folder)!r} already holds {what} trained with other settings ({key}: {stored.get(key)!r} there, "
            f"{wanted.get(key)!r} now). Choose another `{compare_flag('output_dir')}` or delete that folder."
        )


def _training_to_do(config: TrainConfig) -> TrainConfig | None:
    """What is left to train in ``config.output_dir``.

    ``None`` when the folder holds final weights trained with exactly ``config`` (raises if with other settings).
    Otherwise ``config`` set to resume from the folder's latest checkpoint (``resume_from_checkpoint: latest``, which
    starts from step 0 when there is none), after checking that an unfinished run there has the same settings.
    """
    folder = Path(config.output_dir)
    try:
        find_run_weights(folder)
    except FileNotFoundError:
        pass
    else:
        _check_same_settings(config, folder, "a run")
        logger.info("Reusing the finished run in %s", folder)
        return None
    checkpoints = list_checkpoints(folder) if folder.is_dir() else []
    if checkpoints and read_run_config(folder) is not None:
        _check_same_settings(config, folder, "an unfinished run")
        logger.info("Resuming the unfinished run in %s from %s", folder, checkpoints[-1].name)
    if config.resume_from_checkpoint is None:
        config = config.replace(resume_from_checkpoint="latest")
    return config


def train_and_compare(
    train_config: str | os.PathLike[str] | Mapping[str, Any],
    settings: CompareSettings,
    *,
    max_train_steps: int | None = None,
    progress: bool = True,
) -> CompareResult:
    """Train the masked and the vanilla run, then :func:`~persam_dreambooth.evaluation.compare.compare` them.

    Args:
        train_config: a training config file (YAML/TOML) or its contents.
        settings: how to compare (``instance_data_dir`` and ``pretrained_model_name_or_path`` also apply to the
            training; ``sam_model_type`` and ``sam_checkpoint`` default to the training config's).
        max_train_steps: overrides the training config's step count.
        progress: progress bars during generation and scoring.

    Everything that can be checked without trained weights (the output folder, both training configs, the prompt set,
    the metric models) is checked before the first training step. The output folder is locked for the whole run
    (trainings, generation, scoring): a second comparison into it refuses with this run's PID.
    """
    from persam_dreambooth.training import train

    check_output_dir(settings.output_dir, compare_flag("output_dir"))  # before any work: can it be written at all?
    compare_device(settings)
    data = load_config_file(train_config) if isinstance(train_config, str | os.PathLike) else dict(train_config)
    configs = paired_train_configs(
        data, settings.output_dir, instance_data_dir=settings.instance_data_dir,
        pretrained_model_name_or_path=settings.pretrained_model_name_or_path,
        max_train_steps=max_train_steps, seed=settings.seed,
    )
    # PerSAM for the metrics uses the training's SAM unless the comparison names its own.
    if settings.sam_model_type is None:
        settings = dataclasses.replace(settings, sam_model_type=configs["masked"].sam_model_type,
                                       sam_checkpoint=settings.sam_checkpoint or configs["masked"].sam_checkpoint)
    elif settings.sam_checkpoint is None:
        settings = dataclasses.replace(settings, sam_checkpoint=configs["masked"].sam_checkpoint)
    cfg = CompareConfig.from_settings(settings, {n: c.output_dir for n, c in configs.items()})
    identifier = cfg.identifier or infer_identifier(configs["masked"].instance_prompt, cfg.class_noun)
    if not identifier:
        raise ValueError(
            f"`{compare_flag('identifier')}` is required: it could not be read from instance_prompt "
            f"{configs['masked'].instance_prompt!r} and class noun {cfg.class_noun!r}."
        )
    build_prompts(cfg.prompt_set, identifier, cfg.class_noun)
    load_metric_models(cfg)  # fail now, not after two trainings, when a metric model is missing
    with locked_output_dir(cfg):
        todo = {name: c for name, c in ((n, _training_to_do(c)) for n, c in configs.items()) if c is not None}
        for name, config in todo.items():
            logger.info("Training the %s run into %s", name, config.output_dir)
            train(config)
        return compare_locked(cfg, progress=progress)


def run_compare_command(config: CompareCommandConfig, *, progress: bool = True) -> CompareResult:
    """What ``persam-dreambooth compare`` does: :func:`train_and_compare` with ``train``, else
    :func:`~persam_dreambooth.evaluation.compare.compare` of ``runs``."""
    if config.train:
        assert config.train_config is not None  # CompareCommandConfig checks it
        return train_and_compare(config.train_config, config.settings(), max_train_steps=config.max_train_steps,
                                 progress=progress)
    return compare(CompareConfig.from_settings(config.settings(), parse_runs(config.runs or {})), progress=progress)
