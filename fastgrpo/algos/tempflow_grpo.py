"""TempFlow-GRPO (seed 003, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models").

Trajectory branching (§4.1): an ODE trajectory from the initial noise up to a branch step k, one SDE step at k with
several independent noises (`fastgrpo.sde_step`, Flow-GRPO's SDE, eq. 5-6), then ODE to the end. The final images
differ only through the noise at k, so their advantages are credited to the branch transition alone: only it is
trained. Two modes (``algo_args.mode``):

**released** (default): the procedure of the released code (Shredded-Pork/TempFlow-GRPO at e66824e; statements
quoted so they can be found with grep, the stored snapshot has no line numbers):

* ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_perstep.py``, ``for i, t in enumerate(timesteps[:-1])``:
  one ODE *spine* per initial noise (``ode_latents ... determistic=True``; ``latents = ode_latents``) branches at
  every step but the last (FLUX, ``flux_pipeline_with_logprob_perstep.py``: ``enumerate(timesteps)``, every step);
  at each, ``sd3_sde_with_logprob_perstep.py`` ``num_samples = 6`` SDE children of the spine's latent, each continued
  by ODE to the end (``for inner_i, inner_t in enumerate(timesteps[i+1:])`` with ``determistic=True``). In
  ``scripts/train_sd3_pr.py`` ``exploration_k = 6`` repeats the spine for the children, rewards are stacked per
  branch step ``[rows, steps]``.
* "branch=4" in the README is the number of spines per prompt: ``config/dgx.py`` ``geneval_sd3_pr`` (the config
  ``scripts/multi_node/train_sd3_pr.sh`` launches on 48 processes) has ``sample.train_batch_size = 1`` and
  ``num_image_per_prompt = 4``: the K-repeat sampler puts each prompt on 4 processes, each with its own initial
  noise (``set_seed(config.seed, device_specific=True)``).
* Advantages: the rewards are not gathered (``gathered_rewards = samples["rewards"] # seed group`` in
  ``train_flux_pr.py``; the gather is commented out in ``train_sd3_pr.py``), and Flow-GRPO's
  ``PerPromptStatTracker.update`` (``flow_grpo/stat_tracking.py``) normalises each prompt's rows per column with
  ``np.mean(..., axis=0)`` and ``np.std(..., axis=0) + 1e-4`` (ddof 0; ``global_std=False`` in the ``*_pr``
  configs): with one spine per process and batch, each (spine, branch step)'s 6 children form a group.
* Training (``train_sd3_pr.py``): every child row trains the steps ``range(num_train_timesteps)``,
  ``num_train_timesteps = int(num_steps * timestep_fraction)`` (9 of 10 at 0.99, the 9 branch steps), the
  transition spine latent at j -> child latent at j, loss ``- 2.25 * std_dev_t * advantages * ratio`` (clipped as
  PPO; FLUX: ``-1.73 * std_dev_t``), where ``std_dev_t`` is the transition std ``sd_t sqrt(|dt|)``
  (``sd3_sde_with_logprob.py``: ``return ... std_dev_t * torch.sqrt(-1*dt)``), plus ``beta`` times the KL
  ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(...) / (2 * std_dev_t ** 2)``: the exact Gaussian KL,
  our ``train.kl_convention: exact``. beta 0.001 (``pickscore_sd3_pr``), 0.004 (``geneval_sd3_pr``, ``flux_pr``).

Here, per prompt, `plan_groups` runs ``spines`` ODE spines (no grad, batched over the rank's prompts, initial noise
from the group's generator) up to the last branch step, then returns one `GroupPlan` per (spine, branch step): ``C =
sample.group_size`` children of the spine's latent at k (one root starting at k, split in C there), SDE at k only,
ODE after; only the branch transitions train (the branch steps, whatever ``timestep_fraction``); each plan is its own
advantage group (group std, ddof 0, eps 1e-4, as released) and draws its noise from its own generator (seeded from
the group's generator, so the rollouts do not depend on the number of processes). ``branch_steps`` defaults to the
trained steps (first ``floor(timestep_fraction * T)``: SD3's released set; FLUX's released code also branches at
the last step but never trains it, so we skip it). The spine's forwards count in ``model_forwards``, the children
in ``samples``. Differences from the released code: the children recompute the spine's velocity at k (C forwards per
branch, where the released code reuses the spine's one), and the step's optimizer cadence is the loop's.

**single**: one branch step per prompt and ``G = sample.group_size`` children (the paper's §4.1 reading, our
earlier default); ``branch_choice`` picks k per prompt among ``branch_steps``: ``"random"`` or ``"cycle"``.

Noise-aware weighting (eq. 8): the paper weights the policy gradient at step t by ``Norm(sigma_t * sqrt(dt))``
without defining Norm. We read it as the transition std normalised to mean 1 over the branch steps:
``w_t = s_t / mean_{t' in branch_steps} s_t'`` with ``s_t = sd_t * sqrt(|dt_t|)``. On SD3.5's 10-step schedule
(shift 3) with a = 0.7 and the 9 released branch steps this is ``2.2522 * s_t`` (released: 2.25), on FLUX's at
1024 px with a = 0.9 ``1.7260 * s_t`` (released: 1.73): the released constants are our normalisation to 0.1% / 0.3%
(tests/test_variants.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastgrpo.ops import sde_step
from fastgrpo.train.distributed import rng_seed

from .base import GroupPlan, Strategy

MODES = ("released", "single")


@dataclass
class TempFlowGRPO(Strategy):
    name: str = "tempflow_grpo"
    adv_std: str = "group"
    branch_steps: tuple | None = None
    branch_choice: str = "random"
    mode: str = "released"
    spines: int = 1
    impl: str = "auto"  # the spine's sde_step backend (model.impl)
    ARGS: ClassVar[tuple] = ("mode", "spines", "branch_steps", "branch_choice")

    def configure(self, cfg) -> None:
        a = cfg.algo_args
        T = cfg.sample.num_steps
        self.mode = a.get("mode", "released")
        if self.mode not in MODES:
            raise ValueError(f"algo_args.mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "released" and "branch_choice" in a:
            raise ValueError("algo_args.branch_choice applies to mode: single (mode: released branches at every "
                             "step of algo_args.branch_steps)")
        spines = a.get("spines", 1)
        if isinstance(spines, bool) or not isinstance(spines, int) or spines < 1:
            raise ValueError(f"algo_args.spines must be an integer >= 1, got {spines!r}")
        if self.mode == "single" and spines != 1:
            raise ValueError("algo_args.spines applies to mode: released")
        self.spines = spines
        self.impl = cfg.model.impl
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

    def plan_groups(self, ctx, step, prompt_idx, generators):
        if self.mode == "single":
            return super().plan_groups(ctx, step, prompt_idx, generators)
        policy, T, C = ctx.policy, ctx.num_steps, ctx.group_size
        steps = sorted(set(self.candidates(T)))
        S, P = self.spines, len(prompt_idx)
        # Per group, from its generator in this order: the spines' initial noises, then the seed of the plans' own
        # generators (keyed by (seed, spine, branch step)).
        x = torch.cat([policy.initial_latents(S, g) for g in generators]) if P else None
        seeds = [int(torch.randint(2 ** 62, (1,), generator=g)) for g in generators]
        latents = self.spine(ctx, x, [ctx.prompts[i] for i in prompt_idx], max(steps)) if P else None
        plans = []
        for n in range(P):
            for sp in range(S):
                for k in steps:
                    plans.append(GroupPlan(roots=1, sde=torch.arange(T) == k, splits={k: C}, start=k,
                                           x_start=latents[k][n * S + sp:n * S + sp + 1], prompt=n,
                                           generator=torch.Generator().manual_seed(rng_seed(seeds[n], sp, k))))
        self.record(branch_steps=steps)
        return plans

    @torch.no_grad()
    def spine(self, ctx, x: torch.Tensor, prompts: list, last: int) -> list:
        """The ODE spines of ``x`` [P * S, ...] (S rows per prompt of ``prompts``) over steps 0..last-1 (``ctx``:
        the `fastgrpo.algos.base.RolloutContext`): the latents at steps 0..last ([P * S, ...] each)."""
        S = x.shape[0] // len(prompts)
        emb = ctx.policy.encode_prompts(prompts)
        rows = torch.arange(len(prompts)).repeat_interleave(S)
        out = [x]
        for i in range(last):
            v = ctx.velocity(x, i, emb, rows)
            x = sde_step(x, v, ctx.sigmas[i].item(), ctx.sigmas[i + 1].item(), kind="ode",
                         impl=self.impl).prev_sample
            out.append(x)
        return out

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

    def node_advantages(self, tree, leaf_rewards, leaf_advantages):
        """A node's advantage is its leaf's when exactly one leaf lies below it (a branch child), else NaN. The
        default (leaves only) is not enough once groups branching at different steps share a wave: a split step
        gives every active row of the wave a new node, so a child that branched earlier has its SDE transition on
        a non-leaf node with one leaf below."""
        adv = torch.full((tree.num_nodes,), float("nan"))
        count = torch.zeros(tree.num_nodes, dtype=torch.long)
        for leaf, a in zip(tree.leaf_nodes.tolist(), leaf_advantages.float().cpu().tolist()):
            n = leaf
            while n != -1:
                count[n] += 1
                adv[n] = a
                n = tree.parent[n]
        adv[count != 1] = float("nan")
        return adv

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
