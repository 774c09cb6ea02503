"""The strategy interface: what a GRPO variant may change in the one loop.

A variant (``fastgrpo.algos``) is a `Strategy` subclass with its defaults (SDE kind, noise level, which denoising
steps are trained, advantage conventions, KL weight) plus, where needed, overridden hooks. The config's
``sample.noise_level`` and ``train.*`` values override the defaults when set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class Strategy:
    name: str = "base"
    sde_kind: str = "flow_grpo"
    noise_level: float = 0.7
    timestep_fraction: float = 0.99
    beta: float = 0.0
    adv_std: str = "global"
    adv_ddof: int = 0
    adv_eps: float = 1e-4
    families: ClassVar[tuple] = ("sd3", "flux")  # the model families (config model.family) the variant trains

    @classmethod
    def from_config(cls, cfg) -> "Strategy":
        s = cls()
        if cfg.sample.noise_level is not None:
            s.noise_level = cfg.sample.noise_level
        for key in ("timestep_fraction", "beta", "adv_std", "adv_ddof", "adv_eps"):
            value = getattr(cfg.train, key)
            if value is not None:
                setattr(s, key, value)
        return s

    def num_train_steps(self, num_steps: int) -> int:
        return max(1, int(num_steps * self.timestep_fraction))

    def train_steps(self, num_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the denoising steps each sample trains on, [batch, n] int64. Default (Flow-GRPO): the first
        ``floor(timestep_fraction * T)`` steps, in order, for every sample."""
        n = self.num_train_steps(num_steps)
        return torch.arange(n).expand(batch, n)

    def step_weights(self, sigmas: torch.Tensor, steps: torch.Tensor) -> torch.Tensor | None:
        """Per-(sample, trained step) loss weights, or None for uniform (TempFlow-GRPO overrides this)."""
        return None


def random_train_steps(num_steps: int, batch: int, fraction: float, generator: torch.Generator,
                       exclude_last: bool = True) -> torch.Tensor:
    """A random ``floor(fraction * T)`` of the steps per sample (DanceGRPO), never the last one if asked."""
    pool = num_steps - 1 if exclude_last and num_steps > 1 else num_steps
    n = max(1, min(pool, int(math.floor(num_steps * fraction))))
    return torch.stack([torch.randperm(pool, generator=generator)[:n] for _ in range(batch)])
