"""One training step: latents -> noise -> UNet prediction -> masked loss (+ prior loss), as pure as the models allow.

:func:`training_step` takes a collated batch (pixels or cached VAE posteriors, latent masks), the models in a
:class:`StepModels`, and a ``torch.Generator`` that drives every random draw of the step (latent sampling, noise,
offset noise, timesteps, ``unmasked_probability``). It returns the loss and the numbers the trainer logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.losses import masked_diffusion_loss, min_snr_weights

__all__ = ["StepModels", "StepOutput", "training_step", "tokenize_prompt", "encode_prompt"]


@dataclass
class StepModels:
    """The models and fixed inputs of a step.

    Attributes:
        unet: the (prepared) UNet. vae: the frozen VAE, or None when every batch carries cached posteriors.
        text_encoder: the text encoder, or None when ``prompt_embeds`` are precomputed.
        noise_scheduler: a DDPM scheduler with the model's betas and prediction type.
        latent_scaling / latent_shift: the VAE's ``scaling_factor`` / ``shift_factor`` (UNet latents are
            ``(z - shift) * scaling``).
        instance_ids / class_ids: ``(1, L)`` token ids (used with a text encoder).
        instance_attention_mask / class_attention_mask: ``(1, L)`` or None.
        instance_embeds / class_embeds: ``(1, L, D)`` precomputed prompt embeddings (used without one).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    noise_scheduler: Any
    latent_scaling: float
    latent_shift: float = 0.0
    instance_ids: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None
    instance_attention_mask: torch.Tensor | None = None
    class_attention_mask: torch.Tensor | None = None
    instance_embeds: torch.Tensor | None = None
    class_embeds: torch.Tensor | None = None


@dataclass
class StepOutput:
    """``loss`` (scalar, with grad) and detached figures for the logs."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None
    mask_coverage: torch.Tensor


def tokenize_prompt(tokenizer: Any, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (1, L), attention_mask (1, L))``, padded and truncated to ``max_length``."""
    tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def encode_prompt(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The text encoder's last hidden state. Shapes: ``(B, L) -> (B, L, D)``."""
    device = next(text_encoder.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    return text_encoder(input_ids.to(device), attention_mask=mask, return_dict=False)[0]


def _latents(batch: dict[str, torch.Tensor], prefix: str, models: StepModels, generator: torch.Generator,
             scaling: float, shift: float) -> torch.Tensor:
    """Sample VAE latents ``(B, C, h, w)`` from pixels or cached posteriors, scaled for the UNet."""
    cached = batch.get(f"{prefix}_latent_dist")
    if cached is None:
        assert models.vae is not None, "pixels in the batch but no VAE"
        pixels = batch[f"{prefix}_pixel_values"]
        vae_param = next(models.vae.parameters())
        with torch.no_grad():
            cached = models.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist.parameters
    latents = DiagonalGaussianDistribution(cached).sample(generator=generator)  # (B, C, h, w)
    return (latents - shift) * scaling


def _prompt_states(models: StepModels, which: str, batch_size: int) -> torch.Tensor:
    embeds = getattr(models, f"{which}_embeds")
    if embeds is None:
        assert models.text_encoder is not None, "no text encoder and no precomputed embeddings"
        ids = getattr(models, f"{which}_ids")
        mask = getattr(models, f"{which}_attention_mask")
        embeds = encode_prompt(models.text_encoder, ids, mask)  # (1, L, D)
    return embeds.expand(batch_size, -1, -1)  # (1, L, D) -> (B, L, D), a view


def training_step(
    batch: dict[str, torch.Tensor], models: StepModels, config: TrainConfig, generator: torch.Generator
) -> StepOutput:
    """Compute the masked DreamBooth loss of one (micro-)batch; call ``backward`` on ``output.loss``.

    Instance and class samples go through the UNet in one concatenated batch (diffusers' recipe); the instance
    half gets the masked loss (with Min-SNR weights after the spatial reduction), the class half a plain MSE.
    """
    scheduler = models.noise_scheduler
    scaling, shift = models.latent_scaling, models.latent_shift
    with_prior = "class_latent_dist" in batch or "class_pixel_values" in batch

    latents = _latents(batch, "instance", models, generator, scaling, shift)  # (B, C, h, w)
    b = latents.shape[0]
    if with_prior:
        latents = torch.cat([latents, _latents(batch, "class", models, generator, scaling, shift)])  # (2B, C, h, w)
    device = latents.device
    n = latents.shape[0]

    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if config.offset_noise:
        # A per-(sample, channel) constant shifts the mean brightness, so the model learns to change it.
        offset = torch.randn((n, latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + config.offset_noise_strength * offset
    num_t = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_t, (n,), generator=generator, device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)

    hidden = _prompt_states(models, "instance", b)  # (B, L, D)
    if with_prior:
        hidden = torch.cat([hidden, _prompt_states(models, "class", b)])  # (2B, L, D)
    pred = models.unet(noisy, timesteps, hidden, return_dict=False)[0]
    if pred.shape[1] == 2 * latents.shape[1]:  # learned-variance UNets predict (noise, variance)
        pred = pred[:, : latents.shape[1]]

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    mask = batch["instance_latent_mask"].to(device)  # (B, 1, h, w)
    if config.unmasked_probability > 0:
        full_frame = torch.rand((b,), generator=generator, device=device) < config.unmasked_probability  # (B,)
        mask = torch.where(full_frame[:, None, None, None], torch.ones_like(mask), mask)

    per_sample = masked_diffusion_loss(
        pred[:b], target[:b], mask, background_weight=config.mask_background_weight,
        normalize=config.mask_normalize, reduction="none",
    )  # (B,)
    if config.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps[:b])  # (B,)
        per_sample = per_sample * min_snr_weights(snr, config.snr_gamma, prediction_type)
    instance_loss = per_sample.mean()
    loss = instance_loss
    prior_loss = None
    if with_prior:
        prior_loss = F.mse_loss(pred[b:].float(), target[b:].float(), reduction="mean")  # class images: unmasked
        loss = loss + config.prior_loss_weight * prior_loss
    return StepOutput(
        loss=loss,
        instance_loss=instance_loss.detach(),
        prior_loss=prior_loss.detach() if prior_loss is not None else None,
        mask_coverage=mask.mean().detach(),
    )
