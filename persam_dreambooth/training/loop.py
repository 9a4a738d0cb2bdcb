"""``train(config)``: the whole masked DreamBooth run, in diffusers' recipe order, split into functions.

Order: preflight checks (nothing written) -> output folder and ``config.resolved.yaml`` -> masks -> class images ->
models (LoRA / full, dtypes) -> data (+ cached latents, precomputed prompts) -> optimizer and schedule ->
``accelerator.prepare`` -> checkpoint hooks, trackers, resume -> steps (checkpoints, validation) -> final weights,
validation, model card.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

import torch

from persam_dreambooth.config import dump_config, to_dict
from persam_dreambooth.training.checkpoint import list_checkpoints, read_trainer_state, register_model_hooks
from persam_dreambooth.training.class_images import ensure_class_images
from persam_dreambooth.training.components import load_components
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.driver import TrainingDivergedError, run_steps
from persam_dreambooth.training.export import save_final
from persam_dreambooth.training.instance_masks import prepare_masks
from persam_dreambooth.training.preflight import run_preflight
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.training.setup import (
    build_dataset,
    cache_latents,
    make_accelerator,
    make_dataloader,
    make_optimizer,
    prepare_models,
    steps_per_epoch,
    weight_dtype_of,
)
from persam_dreambooth.training.step import StepModels, encode_prompt, tokenize_prompt
from persam_dreambooth.utils.io import ensure_output_dir

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainingDivergedError"]


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    from persam_dreambooth import __version__

    return {"persam_dreambooth": __version__, "diffusers": diffusers.__version__, "torch": str(torch.__version__),
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__}


def _resolve_seed(config: TrainConfig, resume: Path | None) -> int:
    """The run's seed: the configured one, else the resumed checkpoint's, else a fresh one shared by all processes."""
    stored = read_trainer_state(resume).get("seed") if resume is not None else None
    if config.seed is not None:
        if stored is not None and int(stored) != config.seed:
            logger.warning("`seed` %d differs from the checkpoint's %d: the resumed run will not repeat the "
                           "interrupted one exactly.", config.seed, stored)
        return config.seed
    if stored is not None:
        return int(stored)
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([secrets.randbits(31)])[0])  # every process must draw the same seed


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Scalars only (tensorboard's hparams reject lists and None)."""
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in to_dict(config).items()}


def train(config: TrainConfig, accelerator: Any = None) -> Path:
    """Run masked DreamBooth training as configured; return the output folder.

    Args:
        config: the run's :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator`` to use; by default one is made from the config (mixed
            precision, gradient accumulation, tracker, ``OUT/logs``).

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: bad input, before anything is written.
        TrainingDivergedError: the loss became NaN/inf (checkpoints saved before that step are kept).
    """
    pre = run_preflight(config)
    output_dir = ensure_output_dir(pre.output_dir, "output_dir")
    if pre.resume is None and (stale := list_checkpoints(output_dir)):
        logger.warning(
            "`output_dir` %s holds checkpoints of an earlier run (%s); this run starts at step 0 and does not resume "
            "them (`--resume_from_checkpoint latest` would). They stay until rotation or a same-step checkpoint "
            "replaces them.", output_dir, ", ".join(p.name for p in stale),
        )
    accelerator = accelerator or make_accelerator(config, output_dir)
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        raise ValueError(
            f"the given accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
            f"`gradient_accumulation_steps` is {config.gradient_accumulation_steps}."
        )
    seed = _resolve_seed(config, pre.resume)
    precision = accelerator.mixed_precision  # what runs, from the config or the launcher
    config = config.replace(seed=seed, mixed_precision=precision if precision in ("no", "fp16", "bf16") else None)
    if accelerator.is_main_process:
        dump_config(config, output_dir / "config.resolved.yaml", extra={"versions": _versions(),
                                                                        "launched": str(accelerator.distributed_type)})
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    mask_files = prepare_masks(config, pre, accelerator)
    class_images = ensure_class_images(config, accelerator, seed) if config.with_prior_preservation else None

    device, dtype = accelerator.device, weight_dtype_of(accelerator)
    comps = load_components(config, pre.info, dtype)
    torch.manual_seed(derive_seed(seed, 0x10A))  # LoRA's gaussian init draws from the global RNG
    trained = prepare_models(config, comps, device, dtype)
    processors = {type(p).__name__ for p in comps.unet.attn_processors.values()}
    logger.info("UNet attention processors: %s (AttnProcessor2_0 = PyTorch SDPA)", ", ".join(sorted(processors)))

    latent_hw = (config.resolution // pre.info.vae_scale_factor,) * 2
    dataset = build_dataset(config, pre.instance_images, mask_files, class_images, latent_hw, seed)
    if config.cache_latents:
        dataset = cache_latents(dataset, comps.vae, config.train_batch_size, device, dtype)
    models = _step_models(config, comps, trained, device)

    loader, sampler = make_dataloader(config, dataset, seed)
    per_epoch = steps_per_epoch(len(loader), config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * per_epoch
    num_epochs = math.ceil(max_steps / per_epoch)
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(config, trained.parameters(), learning_rate)
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes, num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    to_prepare = [trained.unet] + ([trained.text_encoder] if trained.text_encoder is not None else [])
    prepared = accelerator.prepare(*to_prepare, optimizer, loader, lr_scheduler)
    unet, optimizer, loader, lr_scheduler = prepared[0], prepared[-3], prepared[-2], prepared[-1]
    text_encoder = prepared[1] if trained.text_encoder is not None else None
    models.unet = unet
    if text_encoder is not None:
        models.text_encoder = text_encoder
    register_model_hooks(accelerator, config.train_mode, trained.unet, trained.text_encoder,
                         (trained.unet_lora, trained.text_encoder_lora))
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("persam-dreambooth", config=_tracker_config(config))

    global_step = 0
    if pre.resume is not None:
        logger.info("Resuming from %s", pre.resume)
        accelerator.load_state(str(pre.resume))
        global_step = int(read_trainer_state(pre.resume)["global_step"])
    logger.info("%d instance images, %d class images, %d steps (%d per epoch), batch %d x %d accumulation",
                len(pre.instance_images), len(class_images or []), max_steps, per_epoch, config.train_batch_size,
                config.gradient_accumulation_steps)

    loss = run_steps(
        config=config, accelerator=accelerator, models=models, trained=trained, optimizer=optimizer,
        lr_scheduler=lr_scheduler, loader=loader, sampler=sampler, dataset=dataset, seed=seed,
        global_step=global_step, max_steps=max_steps, num_epochs=num_epochs, per_epoch=per_epoch,
        output_dir=output_dir, comps=comps, dtype=dtype,
    )
    save_final(config, accelerator, output_dir, comps, trained, dtype, seed, max_steps, loss)
    accelerator.end_training()
    return output_dir


def _step_models(config: TrainConfig, comps: Any, trained: Any, device: torch.device) -> StepModels:
    """Token ids, and the prompt embeddings when the text encoder is frozen (encoded once)."""
    length = config.tokenizer_max_length or comps.token_length
    ids = {}
    for which, prompt in (("instance", config.instance_prompt), ("class", config.class_prompt)):
        if prompt is not None and (which == "instance" or config.with_prior_preservation):
            input_ids, attention = tokenize_prompt(comps.tokenizer, prompt, length)
            ids[which] = (input_ids, attention if config.text_encoder_use_attention_mask else None)
    vae_config = comps.vae.config
    models = StepModels(
        unet=comps.unet, vae=None if config.cache_latents else comps.vae,
        text_encoder=None if config.pre_compute_text_embeddings else comps.text_encoder,
        noise_scheduler=comps.noise_scheduler, latent_scaling=float(vae_config.scaling_factor),
        latent_shift=float(getattr(vae_config, "shift_factor", None) or 0.0),
    )
    for which, (input_ids, attention) in ids.items():
        if config.pre_compute_text_embeddings:
            with torch.no_grad():
                setattr(models, f"{which}_embeds", encode_prompt(comps.text_encoder, input_ids, attention))
        else:
            setattr(models, f"{which}_ids", input_ids.to(device))
            setattr(models, f"{which}_attention_mask", attention.to(device) if attention is not None else None)
    return models
