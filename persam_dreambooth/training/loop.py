"""The step loop: epochs, gradient accumulation, NaN stop, logging, checkpoints, validation, exact resume.

Resume exactness rests on three rules: the data order and each sample's augmentation are functions of
``(seed, epoch, index)`` (:mod:`.dataset`); every random draw of a micro-step comes from a generator seeded with
``(seed, step, micro-step, process)`` (:func:`step_generator`); and a resumed epoch skips the batches already seen
with ``accelerator.skip_first_batches``. Optimizer, LR scheduler and weights come back through ``load_state``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from persam_dreambooth.training.buckets import BucketBatchSampler
from persam_dreambooth.training.checkpoint import list_checkpoints, save_checkpoint
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.dataset import EpochSampler
from persam_dreambooth.training.families import Components
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.training.step import StepModels, StepOutput, training_step
from persam_dreambooth.training.trainable import TrainedModels
from persam_dreambooth.training.validation import validate

logger = logging.getLogger(__name__)

__all__ = ["TrainingDivergedError", "TrainingRun", "StepPlan", "run_steps", "step_generator", "divergence_message"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving (earlier checkpoints are intact)."""


@dataclass
class TrainingRun:
    """Everything the loop works with, prepared by :func:`persam_dreambooth.training.recipe.train`.

    Attributes:
        models: the step's models (prepared denoiser / text encoders). trained: the unwrapped trained modules.
        comps: the base model's components (validation builds its pipeline from them).
        loader / sampler / dataset: the prepared loader, its :class:`EpochSampler` and the dataset behind it.
        dtype: the frozen weights' dtype. seed: the run's seed.
    """

    config: TrainConfig
    accelerator: Accelerator
    models: StepModels
    trained: TrainedModels
    comps: Components
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: EpochSampler | BucketBatchSampler
    dataset: Dataset
    dtype: torch.dtype
    seed: int
    output_dir: Path


@dataclass(frozen=True)
class StepPlan:
    """Where the loop starts and stops: ``start_step`` (after a resume), ``max_steps``, ``num_epochs`` and
    ``per_epoch`` optimizer steps per epoch."""

    start_step: int
    max_steps: int
    num_epochs: int
    per_epoch: int


def step_generator(seed: int, global_step: int, micro_step: int, process_index: int,
                   device: torch.device) -> torch.Generator:
    """The generator of one micro-step; the global RNG (used by dropout) is reseeded from the same position."""
    step_seed = derive_seed(seed, global_step, micro_step, process_index)
    torch.manual_seed(derive_seed(step_seed, 1))
    return torch.Generator(device).manual_seed(step_seed)


def divergence_message(value: float, step: int, output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    last = str(found[-1]) if found else "none (no checkpoint was saved before it)"
    return (
        f"The loss became {value} at step {step}: training stopped without saving that step. The last good "
        f"checkpoint is {last}. Lower `learning_rate`, use `mixed_precision: bf16` or `no` instead of fp16, or "
        "check the data, then resume with `--resume_from_checkpoint latest`."
    )


def _logs(out: StepOutput, lr: float) -> dict[str, float]:
    logs = {"loss": float(out.loss.detach()), "instance_loss": float(out.instance_loss),
            "mask_coverage": float(out.mask_coverage), "lr": lr}
    if out.prior_loss is not None:
        logs["prior_loss"] = float(out.prior_loss)
    return logs


def run_steps(run: TrainingRun, plan: StepPlan) -> float | None:
    """Train from ``plan.start_step`` to ``plan.max_steps``; return the last logged loss (None if no step ran)."""
    config, accelerator, models = run.config, run.accelerator, run.models
    global_step, max_steps = plan.start_step, plan.max_steps
    first_epoch = global_step // plan.per_epoch
    skip_batches = (global_step - first_epoch * plan.per_epoch) * config.gradient_accumulation_steps
    trained_modules = [models.denoiser, *(models.text_encoders[n] for n in run.trained.text_encoders)]
    params = run.trained.parameters()
    bar = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    last_loss: float | None = None
    for epoch in range(first_epoch, plan.num_epochs):
        if global_step >= max_steps:
            break
        for module in trained_modules:
            module.train()
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        epoch_loader = run.loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(run.loader, skip_batches)
        epoch_loader.set_epoch(epoch)  # accelerate's loaders pass it on to the sampler and dataset
        micro_step = 0
        for batch in epoch_loader:
            with accelerator.accumulate(*trained_modules):
                generator = step_generator(run.seed, global_step, micro_step, accelerator.process_index,
                                           accelerator.device)
                out = training_step(batch, models, config, generator)
                worst = accelerator.gather(out.loss.detach().float()[None])  # every process stops together
                if not torch.isfinite(worst).all():
                    bad = worst[~torch.isfinite(worst)][0].item()
                    accelerator.end_training()
                    raise TrainingDivergedError(divergence_message(bad, global_step + 1, run.output_dir))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            micro_step = 0
            logs = _logs(out, run.lr_scheduler.get_last_lr()[0])
            last_loss = logs["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", cov=f"{logs['mask_coverage']:.2f}")
            accelerator.log(logs, step=global_step)
            if global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, run.output_dir, global_step, {"seed": run.seed, "epoch": epoch},
                                config.checkpoints_total_limit)
            if config.validation_prompt and global_step % config.validation_steps == 0 and global_step < max_steps:
                validate(config, accelerator, run.comps, run.trained, run.dtype, run.seed, run.output_dir,
                         f"step-{global_step:06d}", global_step)
            if global_step >= max_steps:
                break
    bar.close()
    return last_loss
