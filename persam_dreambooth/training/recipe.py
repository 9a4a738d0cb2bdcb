"""``train(config)``: the whole masked DreamBooth run, in diffusers' recipe order; each stage is its own module.

Order: preflight checks (:mod:`.preflight`, nothing written) -> the output folder's lock (``utils.locks``, held
until the end) -> output folder and ``config.resolved.yaml`` -> ``instance_video``: frames picked with their masks
(:mod:`.instance_video`) -> masks (:mod:`.instance_masks`), their table and
plausibility check (:mod:`.mask_review`; ``masks_only`` stops here) -> class images (:mod:`.class_images`) ->
components of the model family (:mod:`.components`, :mod:`.families`) -> trained modules, LoRA / full, dtypes
(:mod:`.trainable`) -> data, cached latents, precomputed prompts (:mod:`.dataset`, :mod:`.step`) -> optimizer and
schedule (:mod:`.optim`) -> ``accelerator.prepare`` -> checkpoint hooks, trackers, resume (:mod:`.checkpoint`) -> the
loop (:mod:`.loop`, one step in :mod:`.step`) -> final weights, validation, model card (:mod:`.export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from persam_dreambooth.config import dump_config, to_dict
from persam_dreambooth.training.accelerator import make_accelerator, weight_dtype_of
from persam_dreambooth.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    register_model_hooks,
)
from persam_dreambooth.training.class_images import ensure_class_images
from persam_dreambooth.training.components import load_components
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.dataset import build_dataset, cache_latents, make_dataloader
from persam_dreambooth.training.export import save_final
from persam_dreambooth.training.instance_masks import prepare_masks
from persam_dreambooth.training.instance_video import select_video_frames
from persam_dreambooth.training.loop import StepPlan, TrainingDivergedError, TrainingRun, run_steps
from persam_dreambooth.training.mask_review import review_masks
from persam_dreambooth.training.optim import learning_rate_of, make_lr_scheduler, make_optimizer, steps_per_epoch
from persam_dreambooth.training.preflight import Preflight, run_preflight
from persam_dreambooth.training.rng import derive_seed
from persam_dreambooth.training.step import build_step_models
from persam_dreambooth.training.trainable import offload_frozen, prepare_models
from persam_dreambooth.utils.io import ensure_output_dir
from persam_dreambooth.utils.locks import LOCK_NAME, FolderLockedError, lock_output_dir

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


@contextlib.contextmanager
def _run_lock(output_dir: Path, accelerator: Accelerator) -> Iterator[None]:
    """Hold the lock of ``output_dir`` (``utils.locks``) for the run, in the main process only.

    Under ``accelerate launch`` the other processes of the same run must not take it (they would refuse their own
    main process); they learn the main process's outcome through a broadcast, so a refused run stops in every
    process instead of leaving some waiting at the next collective. A run that finishes removes the lock file (while
    still holding the lock) so a finished output folder holds no hidden file.
    """
    with contextlib.ExitStack() as stack:
        refused = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(lock_output_dir(output_dir, "train", "--output_dir", tidy_on_error=True))
            except FolderLockedError as exc:
                refused = str(exc)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            refused = broadcast_object_list([refused])[0]
        if refused is not None:
            raise FolderLockedError(refused)
        yield
        if accelerator.is_main_process:
            (output_dir / LOCK_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Log the start of a long stage and its duration (a stage can take minutes on a CPU or a slow disk)."""
    logger.info("%s ...", what)
    started = time.monotonic()
    yield
    logger.info("%s: done in %.1f s", what, time.monotonic() - started)


def train(config: TrainConfig, accelerator: Accelerator | None = None) -> Path:
    """Run masked DreamBooth training as configured; return the output folder.

    Args:
        config: the run's :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator`` to use; by default one is made from the config (mixed
            precision, gradient accumulation, tracker, ``OUT/logs``).

    Raises:
        FileNotFoundError, NotADirectoryError, PermissionError, ValueError: bad input, before anything is written
            (``ValueError`` also when most masks look implausible, after ``masks/`` is written, without
            ``accept_masks``).
        FolderLockedError: another run is writing into ``output_dir`` (nothing is written).
        TrainingDivergedError: the loss became NaN/inf (checkpoints saved before that step are kept).
    """
    pre = run_preflight(config)
    accelerator = accelerator or make_accelerator(config, pre.output_dir)
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        raise ValueError(
            f"the given accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
            f"`gradient_accumulation_steps` is {config.gradient_accumulation_steps}."
        )
    with _run_lock(pre.output_dir, accelerator):
        return _train_locked(config, pre, accelerator)


def _train_locked(config: TrainConfig, pre: Preflight, accelerator: Accelerator) -> Path:
    """:func:`train` after its checks, while this run holds the output folder's lock."""
    output_dir = ensure_output_dir(pre.output_dir, "--output_dir")
    if pre.resume is None and (stale := list_checkpoints(output_dir)):
        logger.warning(
            "`output_dir` %s holds checkpoints of an earlier run (%s); this run starts at step 0 and does not resume "
            "them (`--resume_from_checkpoint latest` would). They stay until rotation or a same-step checkpoint "
            "replaces them.", output_dir, ", ".join(p.name for p in stale),
        )
    seed = _resolve_seed(config, pre.resume)
    precision = accelerator.mixed_precision  # what runs, from the config or the launcher
    config = config.replace(seed=seed, mixed_precision=precision if precision in ("no", "fp16", "bf16") else None)
    if accelerator.is_main_process:
        dump_config(config, output_dir / "config.resolved.yaml", extra={"versions": _versions(),
                                                                        "launched": str(accelerator.distributed_type)})
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    if config.instance_video:  # pick the frames and their masks (OUT/instance_frames, OUT/masks, masks_grid.jpg)
        with _stage(f"Picking {config.num_instance_frames} frames of {len(config.instance_video)} video(s)"):
            frames = select_video_frames(config, output_dir, accelerator, reuse=pre.resume is not None)
        pre = dataclasses.replace(pre, instance_images=frames)
    mask_files = prepare_masks(config, pre, accelerator)
    if mask_files is not None:
        review_masks(output_dir, pre.instance_images, accept=config.accept_masks,
                     can_stop=config.mask_source != "dir", write=accelerator.is_main_process)
    if config.masks_only:
        accelerator.wait_for_everyone()
        logger.info("`--masks_only`: stopping after the masks; check %s and %s, then run again without "
                    "`--masks_only` (see docs/training.md, 'Checking the masks').", output_dir / "masks",
                    output_dir / "masks_table.csv")
        return output_dir
    info = pre.info
    class_images = None
    if config.with_prior_preservation:
        with _stage(f"Class images: {config.num_class_images} wanted in {config.class_data_dir}"):
            class_images = ensure_class_images(config, accelerator, seed, info)

    device, dtype = accelerator.device, weight_dtype_of(accelerator)
    with _stage(f"Loading the base model {config.pretrained_model_name_or_path}"):
        comps = load_components(config, info, dtype)
    family = comps.family
    torch.manual_seed(derive_seed(seed, 0x10A))  # LoRA's gaussian init draws from the global RNG
    trained = prepare_models(config, comps, device, dtype)
    if hasattr(comps.denoiser, "attn_processors"):
        processors = {type(p).__name__ for p in comps.denoiser.attn_processors.values()}
        logger.info("Attention processors: %s (AttnProcessor2_0 = PyTorch SDPA)", ", ".join(sorted(processors)))

    latent_hw = (config.resolution // info.loss_grid_factor,) * 2
    dataset = build_dataset(config, pre.instance_images, mask_files, class_images, latent_hw, seed,
                            crop_conditioning=family.uses_crop_conditioning, loss_grid_factor=info.loss_grid_factor)
    if config.cache_latents:
        with _stage(f"Caching the latents of {len(dataset)} training images with the VAE"):
            dataset = cache_latents(dataset, family, comps.vae, config.train_batch_size, device, dtype)
    models = build_step_models(config, comps, trained, device)
    offload_frozen(config, comps)

    loader, sampler = make_dataloader(config, dataset, seed)
    # accelerate.prepare shards the loader: each process sees ceil(batches / processes) of them per epoch
    per_epoch = steps_per_epoch(math.ceil(len(loader) / accelerator.num_processes), config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * per_epoch
    num_epochs = math.ceil(max_steps / per_epoch)
    optimizer = make_optimizer(config, trained.parameters(), learning_rate_of(config, accelerator.num_processes))
    lr_scheduler = make_lr_scheduler(config, optimizer, max_steps, accelerator.num_processes)
    prepared = accelerator.prepare(*trained.modules(), optimizer, loader, lr_scheduler)
    optimizer, loader, lr_scheduler = prepared[-3], prepared[-2], prepared[-1]
    models.denoiser = prepared[0]
    for name, module in zip(trained.text_encoders, prepared[1:-3], strict=True):
        models.text_encoders[name] = module  # trained text encoders run every step (never precomputed)
    register_model_hooks(accelerator, config.train_mode, family, trained)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("persam-dreambooth", config=_tracker_config(config))

    global_step = 0
    if pre.resume is not None:
        logger.info("Resuming from %s", pre.resume)
        global_step = load_checkpoint(accelerator, pre.resume)
    logger.info("%s: %d instance images, %d class images, %d steps (%d per epoch), batch %d x %d accumulation",
                family.title, len(pre.instance_images), len(class_images or []), max_steps, per_epoch,
                config.train_batch_size, config.gradient_accumulation_steps)

    run = TrainingRun(config=config, accelerator=accelerator, models=models, trained=trained, comps=comps,
                      optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader, sampler=sampler, dataset=dataset,
                      dtype=dtype, seed=seed, output_dir=output_dir)
    loss = run_steps(run, StepPlan(start_step=global_step, max_steps=max_steps, num_epochs=num_epochs,
                                   per_epoch=per_epoch))
    save_final(config, accelerator, output_dir, comps, trained, dtype, seed, max_steps, loss)
    accelerator.end_training()
    return output_dir
