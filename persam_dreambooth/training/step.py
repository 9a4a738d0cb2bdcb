"""One training step: latents -> noise -> the family's prediction -> masked loss (+ prior loss), as pure as the
models allow.

:func:`build_step_models` gathers the models and fixed inputs (token ids, or the prompt conditioning encoded once when
the text encoders are frozen) into a :class:`StepModels`. :func:`training_step` takes a collated batch (pixels or
cached VAE posteriors, latent masks), the :class:`StepModels`, and a ``torch.Generator`` that drives every random
draw of the step (latent sampling, noise, offset noise, timesteps, ``unmasked_probability``). It returns the loss and
the numbers the trainer logs. What differs between model families happens in :class:`ModelFamily` methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import BaseModelInfo, Components, ModelFamily, TextConditioning
from persam_dreambooth.training.losses import masked_diffusion_loss
from persam_dreambooth.training.trainable import TrainedModels

__all__ = ["StepModels", "StepOutput", "training_step", "build_step_models"]

#: Batch keys that are per-sample conditioning, concatenated instance then class for the family's ``predict``.
_CONDITIONING = ("original_size", "crop_top_left", "target_size")


@dataclass
class StepModels:
    """The models and fixed inputs of a step.

    Attributes:
        family: the model family. info: the base model's :class:`BaseModelInfo`.
        denoiser: the (prepared) UNet / transformer. vae: the frozen VAE, or None when every batch carries cached
            posteriors.
        text_encoders: the text encoders by name, or None when the conditioning is precomputed.
        noise_scheduler: the family's training scheduler.
        instance_tokens / class_tokens: the family's token tensors ``(1, L)`` (used with text encoders).
        instance_text / class_text: precomputed conditioning, tensors ``(1, ...)`` (used without them).
    """

    family: ModelFamily
    info: BaseModelInfo
    denoiser: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: dict[str, torch.nn.Module] | None
    noise_scheduler: SchedulerMixin
    instance_tokens: dict[str, torch.Tensor] | None = None
    class_tokens: dict[str, torch.Tensor] | None = None
    instance_text: TextConditioning | None = None
    class_text: TextConditioning | None = None


@dataclass
class StepOutput:
    """``loss`` (scalar, with grad) and detached figures for the logs."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None
    mask_coverage: torch.Tensor


def build_step_models(config: TrainConfig, comps: Components, trained: TrainedModels,
                      device: torch.device) -> StepModels:
    """Token ids, and the prompt conditioning when the text encoders are frozen (encoded once, then kept)."""
    family = comps.family
    tokens = {}
    for which, prompt in (("instance", config.instance_prompt), ("class", config.class_prompt)):
        if prompt is not None and (which == "instance" or config.with_prior_preservation):
            tokens[which] = family.tokenize(comps, prompt, config)
    models = StepModels(
        family=family, info=comps.info, denoiser=comps.denoiser, vae=None if config.cache_latents else comps.vae,
        text_encoders=None if config.pre_compute_text_embeddings else dict(comps.text_encoders),
        noise_scheduler=comps.noise_scheduler,
    )
    for which, toks in tokens.items():
        if config.pre_compute_text_embeddings:
            with torch.no_grad():
                setattr(models, f"{which}_text", family.encode_text(comps.text_encoders, toks, config))
        else:
            setattr(models, f"{which}_tokens", {k: v.to(device) for k, v in toks.items()})
    return models


def _latents(batch: dict[str, torch.Tensor], prefix: str, models: StepModels,
             generator: torch.Generator) -> torch.Tensor:
    """Sample normalised latents ``(B, C, h, w)`` from pixels or cached posteriors."""
    posterior = batch.get(f"{prefix}_latent_dist")
    if posterior is None:
        assert models.vae is not None, "pixels in the batch but no VAE"
        with torch.no_grad():
            posterior = models.family.encode_posterior(models.vae, batch[f"{prefix}_pixel_values"])
    return models.family.sample_latents(posterior, generator, models.info)


def _text(models: StepModels, which: str, batch_size: int, config: TrainConfig) -> TextConditioning:
    text = getattr(models, f"{which}_text")
    if text is None:
        assert models.text_encoders is not None, "no text encoders and no precomputed conditioning"
        text = models.family.encode_text(models.text_encoders, getattr(models, f"{which}_tokens"), config)
    return ModelFamily.expand_text(text, batch_size)  # (1, ...) -> (B, ...), views


def _conditioning(batch: dict[str, torch.Tensor], with_prior: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample conditioning ``(N, ...)``: ``instance_<key>`` then ``class_<key>``."""
    out = {}
    for key in _CONDITIONING:
        if f"instance_{key}" in batch:
            parts = [batch[f"instance_{key}"]] + ([batch[f"class_{key}"]] if with_prior else [])
            out[key] = torch.cat(parts).to(device)
    return out


def training_step(
    batch: dict[str, torch.Tensor], models: StepModels, config: TrainConfig, generator: torch.Generator
) -> StepOutput:
    """Compute the masked DreamBooth loss of one (micro-)batch; call ``backward`` on ``output.loss``.

    Instance and class samples go through the denoiser in one concatenated batch (diffusers' recipe); the instance
    half gets the masked loss (with the family's per-sample weights after the spatial reduction), the class half a
    plain MSE (weighted too for flow-matching families, as diffusers' SD3/FLUX scripts do).
    """
    family = models.family
    with_prior = "class_latent_dist" in batch or "class_pixel_values" in batch

    latents = _latents(batch, "instance", models, generator)  # (B, C, h, w)
    b = latents.shape[0]
    if with_prior:
        latents = torch.cat([latents, _latents(batch, "class", models, generator)])  # (2B, C, h, w)
    device = latents.device
    n = latents.shape[0]

    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if config.offset_noise:
        # A per-(sample, channel) constant shifts the mean brightness, so the model learns to change it.
        offset = torch.randn((n, latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + config.offset_noise_strength * offset
    noised = family.add_noise(latents, noise, models.noise_scheduler, config, generator)

    text = _text(models, "instance", b, config)
    if with_prior:
        text = ModelFamily.cat_text([text, _text(models, "class", b, config)])  # (2B, ...)
    cond = _conditioning(batch, with_prior, device)
    pred = family.predict(models.denoiser, noised, text, cond, config, models.info)  # (N, C, h, w)
    target = noised.target

    mask = batch["instance_latent_mask"].to(device)  # (B, 1, h, w)
    if config.unmasked_probability > 0:
        full_frame = torch.rand((b,), generator=generator, device=device) < config.unmasked_probability  # (B,)
        mask = torch.where(full_frame[:, None, None, None], torch.ones_like(mask), mask)

    per_sample = masked_diffusion_loss(
        pred[:b], target[:b], mask, background_weight=config.mask_background_weight,
        normalize=config.mask_normalize, reduction="none",
    )  # (B,)
    if noised.weights is not None:
        per_sample = per_sample * noised.weights[:b]
    instance_loss = per_sample.mean()
    loss = instance_loss
    prior_loss = None
    if with_prior:
        if noised.prior_weighted and noised.weights is not None:  # class images: unmasked, weighted per sample
            sq = F.mse_loss(pred[b:].float(), target[b:].float(), reduction="none").flatten(1).mean(1)  # (B,)
            prior_loss = (sq * noised.weights[b:]).mean()
        else:  # class images: unmasked plain MSE
            prior_loss = F.mse_loss(pred[b:].float(), target[b:].float(), reduction="mean")
        loss = loss + config.prior_loss_weight * prior_loss
    return StepOutput(
        loss=loss,
        instance_loss=instance_loss.detach(),
        prior_loss=prior_loss.detach() if prior_loss is not None else None,
        mask_coverage=mask.mean().detach(),
    )
