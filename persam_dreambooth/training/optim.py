"""Optimizer (AdamW or 8-bit AdamW) and learning-rate schedule of the run."""

from __future__ import annotations

import torch

from persam_dreambooth.training.config import TrainConfig

__all__ = ["make_optimizer", "make_lr_scheduler", "learning_rate_of", "steps_per_epoch"]


def learning_rate_of(config: TrainConfig, num_processes: int) -> float:
    """The peak LR, scaled by batch x accumulation x processes with ``scale_lr``."""
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    return learning_rate


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter],
                   learning_rate: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam``."""
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`.") from exc
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int,
                      num_processes: int) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler``; accelerate steps a prepared scheduler once per process per optimizer step,
    hence the factor ``num_processes``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch: accelerate syncs at the end of each epoch, so a partial accumulation counts."""
    return -(-num_batches // gradient_accumulation_steps)
