"""Sigma schedules of diffusers' FlowMatchEulerDiscreteScheduler, as plain tensors a sampler can index per sample.

Both return float32 ``[num_steps + 1]`` sigmas, descending, ending with the appended terminal 0, exactly as
``scheduler.sigmas`` after ``set_timesteps`` (checked against diffusers in tests/test_schedules.py). Step ``i`` goes
from ``sigmas[i]`` to ``sigmas[i+1]``; the model is conditioned on ``timestep = sigmas[i] * 1000``.

* SD3 / SD3.5 (``StableDiffusion3Pipeline``; scheduler ``shift=3.0``, no dynamic shifting): timesteps spaced
  linearly between the shifted training extremes, then shifted (``s -> shift*s / (1 + (shift-1)*s)``) -- diffusers
  shifts the endpoints twice, and we follow it.
* FLUX (``FluxPipeline``; dynamic shifting): ``linspace(1, 1/N, N)`` mapped by the exponential time shift
  ``exp(mu) / (exp(mu) + (1/s - 1))`` with ``mu`` linear in the packed image sequence length
  (256 tokens -> 0.5, 4096 -> 1.15).

``sigma_max`` for `fastgrpo.sde_step` (Flow-GRPO's guard at sigma == 1) is ``sigmas[1]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _shift(s, shift: float):
    return shift * s / (1 + (shift - 1) * s)


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3/SD3.5 sigmas for ``num_steps`` inference steps: float32 ``[num_steps + 1]``."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # Training sigmas (float32, as the scheduler builds them) give the extremes.
    train_t = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    train_sigmas = _shift(train_t / num_train_timesteps, shift)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = _shift(t / num_train_timesteps, shift).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu`` (linear in the packed latent sequence length)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_sigmas(num_steps: int, image_seq_len: int, **mu_kwargs) -> torch.Tensor:
    """FLUX sigmas for ``num_steps`` steps at ``image_seq_len`` packed tokens ((H/16)*(W/16); 4096 at 1024 px)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    mu = flux_mu(image_seq_len, **mu_kwargs)
    s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    sigmas = (math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The model's timestep input for each step: ``sigmas[:-1] * 1000``."""
    return sigmas[:-1] * num_train_timesteps
