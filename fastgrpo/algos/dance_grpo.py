"""DanceGRPO (XueZeyue/DanceGRPO, train_grpo_flux.py).

``kind="dance"`` with eta = 0.3; each sample trains a random 60% of the denoising steps (``timestep_fraction``
0.6), never the last; advantages per group with the group's std, ddof 1 (``torch.std``'s default there), + 1e-8;
no KL; PPO clip 1e-4 and advantage clip 5 as in their defaults. Optionally the same initial noise for a prompt's
whole group (``sample.same_noise_per_group``, their ``use_same_noise``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Strategy, random_train_steps


@dataclass
class DanceGRPO(Strategy):
    name: str = "dance_grpo"
    sde_kind: str = "dance"
    noise_level: float = 0.3
    timestep_fraction: float = 0.6
    adv_std: str = "group"
    adv_ddof: int = 1
    adv_eps: float = 1e-8

    def train_steps(self, num_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        return random_train_steps(num_steps, batch, self.timestep_fraction, generator, exclude_last=True)
