"""TempFlow-GRPO (seed 003, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models").

Trajectory branching (§4.1): per prompt, one ODE trajectory from the initial noise up to a branch step k, one SDE
step at k with G independent noises (`fastgrpo.sde_step`, Flow-GRPO's SDE with a = 0.7, eq. 5-6), then ODE to
the end. The G final images differ only through the noise at k, so the group's advantages (group std) are credited
to the branch transition alone: only it is trained.

Branch steps (``algo_args``): ``branch_steps`` lists the candidate steps (default: the trained steps, the first
``floor(0.99 T)``), and ``branch_choice`` picks one per prompt: ``"random"`` (a sampled subset per prompt) or
``"cycle"`` (group i branches at ``branch_steps[i % len]``, so every step is visited in turn).

Noise-aware weighting (eq. 8): the paper weights the policy gradient at step t by ``Norm(sigma_t * sqrt(dt))``
without defining Norm. We read it as the transition std normalised to mean 1 over the trained steps:
``w_t = s_t / mean_{t' trained} s_t'`` with ``s_t = sd_t * sqrt(|dt_t|)`` (the std of the SDE transition). On
SD3.5's 10-step schedule (shift 3) with a = 0.7, and the first 9 steps trained, this gives ``w_t = 2.252 * s_t``
(tested). Presets: beta 0.001 for PickScore (0.004 for GenEval), 48 groups x 24, 512 px.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastgrpo.ops import sde_step
from fastgrpo.train.strategy import GroupPlan, Strategy


@dataclass
class TempFlowGRPO(Strategy):
    name: str = "tempflow_grpo"
    adv_std: str = "group"
    branch_steps: tuple | None = None
    branch_choice: str = "random"
    ARGS: ClassVar[tuple] = ("branch_steps", "branch_choice")

    def configure(self, cfg) -> None:
        a = cfg.algo_args
        T = cfg.sample.num_steps
        steps = a.get("branch_steps")
        if steps is not None:
            if not isinstance(steps, (list, tuple)) or not steps or not all(
                    isinstance(s, int) and not isinstance(s, bool) and 0 <= s < T for s in steps):
                raise ValueError(f"algo_args.branch_steps must be a non-empty list of steps in [0, {T}), got {steps!r}")
            self.branch_steps = tuple(steps)
        self.branch_choice = a.get("branch_choice", "random")
        if self.branch_choice not in ("random", "cycle"):
            raise ValueError(f"algo_args.branch_choice must be 'random' or 'cycle', got {self.branch_choice!r}")
        self._cycle = 0

    def candidates(self, num_steps: int) -> tuple:
        return self.branch_steps or tuple(range(self.num_train_steps(num_steps)))

    def group_plan(self, num_steps, group_size, generator):
        cands = self.candidates(num_steps)
        if self.branch_choice == "cycle":
            k = cands[self._cycle % len(cands)]
            self._cycle += 1
        else:
            k = cands[int(torch.randint(len(cands), (1,), generator=generator))]
        sde = torch.zeros(num_steps, dtype=torch.bool)
        sde[k] = True
        return GroupPlan(roots=1, sde=sde, splits={k: group_size})

    def transition_stds(self, sigmas: torch.Tensor) -> torch.Tensor:
        """s_t for every step of the schedule (float64 [T])."""
        T = sigmas.shape[0] - 1
        z = torch.zeros(T, 1, dtype=torch.float64)
        return sde_step(z, z, sigmas[:-1].double(), sigmas[1:].double(), kind=self.sde_kind,
                        noise_level=self.noise_level, sigma_max=float(sigmas[1]), noise=z, impl="torch").std.double()

    def step_weights(self, stds, steps, sigmas):
        s = self.transition_stds(sigmas)
        mean = s[list(self.candidates(sigmas.shape[0] - 1))].mean()
        return (s[steps] / mean).float()
