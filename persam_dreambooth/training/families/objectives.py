"""Training objectives shared by families: DDPM (epsilon / v-prediction) and rectified flow matching.

Every random draw takes the step's ``torch.Generator`` (exact resume, see ``training/loop.py``).

* :func:`ddpm_noise`: uniform integer timesteps, ``scheduler.add_noise``, target epsilon or velocity, Min-SNR-gamma
  weights (instance half only, as diffusers' ``train_dreambooth_lora.py``).
* :func:`flow_matching_noise`: timesteps drawn with diffusers' ``compute_density_for_timestep_sampling``
  (``weighting_scheme`` ``sigma_sqrt`` / ``logit_normal`` / ``mode`` / ``cosmap`` / ``none``), ``x_t = (1 - s) x +
  s n``, target ``n - x``, weights ``compute_loss_weighting_for_sd3`` (both halves, as diffusers' SD3 / FLUX scripts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from persam_dreambooth.training.config import WEIGHTING_SCHEMES
from persam_dreambooth.training.families.base import NoisedLatents

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from persam_dreambooth.training.config import TrainConfig

__all__ = ["ddpm_noise", "flow_matching_noise"]


def ddpm_noise(latents: torch.Tensor, noise: torch.Tensor, scheduler: SchedulerMixin, config: TrainConfig,
               generator: torch.Generator) -> NoisedLatents:
    """DDPM forward process. Shapes: ``latents``, ``noise`` ``(N, C, h, w)``; Min-SNR weights ``(N,)`` when
    ``snr_gamma`` is set (elementwise in the timestep; the step applies them to the instance half only)."""
    from diffusers.training_utils import compute_snr

    from persam_dreambooth.training.losses import min_snr_weights

    n = latents.shape[0]
    num_t = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_t, (n,), generator=generator, device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    weights = None
    if config.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)  # (N,)
        weights = min_snr_weights(snr, config.snr_gamma, prediction_type)
    return NoisedLatents(noisy=noisy, timesteps=timesteps, target=target, weights=weights)


def flow_matching_noise(latents: torch.Tensor, noise: torch.Tensor, scheduler: SchedulerMixin, config: TrainConfig,
                        generator: torch.Generator, weighting_scheme: str) -> NoisedLatents:
    """Rectified flow: ``x_t = (1 - sigma) x + sigma n``, target ``n - x`` (the velocity from data to noise).

    ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` as loaded (its ``timesteps`` / ``sigmas`` tables of
    ``num_train_timesteps`` entries, shift applied). Timestep indices follow diffusers' SD3/FLUX scripts:
    ``u ~ density(weighting_scheme)``, ``index = int(u * num_train_timesteps)``.

    Shapes: ``latents``, ``noise`` ``(N, C, h, w)``; ``timesteps``, ``sigmas``, ``weights`` ``(N,)``.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}.")
    n = latents.shape[0]
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=n, logit_mean=config.logit_mean, logit_std=config.logit_std,
        mode_scale=config.mode_scale, device=generator.device, generator=generator,
    )  # (N,) in [0, 1)
    num_t = scheduler.config.num_train_timesteps
    indices = (u * num_t).long().clamp(0, len(scheduler.timesteps) - 1).cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)  # (N,)
    sigmas = scheduler.sigmas[indices].to(latents.device, torch.float32)  # (N,)
    s = sigmas.to(latents.dtype)[:, None, None, None]  # (N,) -> (N, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)  # (N,)
    return NoisedLatents(noisy=noisy, timesteps=timesteps, target=noise - latents, weights=weights.float(),
                         prior_weighted=True, sigmas=sigmas)
