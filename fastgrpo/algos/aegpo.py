"""AEGPO (seed 000, "AEGPO: Adaptive Entropy-Guided Policy Optimization for Diffusion Models", §3-4): how many
rollouts a prompt gets, and where its rollouts branch, chosen from the attention entropy over the text tokens.

Every optimizer step, for each prompt of the batch:

1. **Probe.** One ODE trajectory (``sde_step(kind="ode")``) of the current policy from the prompt's probe noise,
   every transformer forward under `fastgrpo.diffusion.AttentionEntropyCollector` (``algo_args.layers``: the joint
   blocks 5, 10, 15 on FLUX.1-dev and SD3.5-M, §5.1; ``entropy_mode`` "mixture" is eq. 1-4) gives Entropy_θ(t),
   t = 0..T-1, in bits.
2. **Base entropy.** The same probe with the reference network (LoRA disabled, or the frozen initial weights) gives
   Entropy_base(t). It depends only on the prompt and the probe noise, so it is computed once per (prompt, noise
   seed) and cached; the cache is saved in every checkpoint (``strategy.pt``), so ``--resume`` neither recomputes
   it nor changes a bit of the run.
3. **Global adaptive allocation** (§4.1). ``v_i = mean_t |Entropy_θ(t) - Entropy_base(t)|`` (eq. 5-6). The median
   of v over the step's whole batch splits the prompts: ``v_i > median`` gets ``r_high`` (16) rollouts,
   ``v_i < median`` gets ``r_low`` (8). During the first ``warmup_steps`` (20) optimizer steps every prompt gets
   ``r_mean = (r_high + r_low) / 2`` (12), which must be ``sample.group_size``.
4. **Local adaptive exploration** (§4.2). The group branches only at the TopK (``top_k`` = 4) peaks of the probe's
   Entropy_θ(t) (`entropy_peaks`), either on the BranchGRPO tree (``exploration: branch``, the paper's main and
   ablation setting, Table 3) or with TempFlow-GRPO's trajectory branching (``exploration: tempflow``).

Advantages are per prompt group with the group's own size (the loop's advantages phase handles groups of
different sizes); the credit assignment is the exploration's: BranchGRPO's depth-wise normalised subtree means
(`fastgrpo.algos.branch_grpo`, the released rule of `fastgrpo.tree_advantages`: ddof 1, eps 1e-8, a depth whose std
is below 1e-6 gets 0; each group is its own tree with its own branching, its split factors in step order, e.g. 3,
2, 2 in some order for 12 rollouts), or TempFlow-GRPO's leaf advantages on the one branch transition with its
noise-aware weight (`fastgrpo.algos.tempflow_grpo`). The SDE is DanceGRPO's (``kind="dance"``, eta 0.3), as in
BranchGRPO, on which the paper's FLUX results build; group std, no KL by default.

Decisions where the paper and DESIGN.md are silent:

* **Median and ties.** The median is the middle value (odd batch) or the mean of the two middle values (even
  batch). A prompt whose v equals the median exactly gets ``r_mean``: with an odd batch that is the middle prompt,
  and when every v is equal (e.g. all 0 at step 0, where the policy is the base) the allocation is uniform. The
  total budget is then exactly ``P * r_mean`` whenever as many prompts lie above the median as below it (always,
  unless several values tie at the median), which is §4.1's "keeping the total computation unchanged".
* **Several processes.** The probes' entropies are all-gathered before the median, so the split is over the whole
  batch and N processes allocate exactly as one does; every process also inserts the gathered base entropies into
  its cache, so the caches stay identical (the main process saves it).
* **Peaks** (`entropy_peaks`): a peak is a local maximum of Entropy_θ(t) over t = 0..T-1: a maximal run of equal
  values whose existing neighbours are both lower (so the first and last steps count when their one neighbour is
  lower, and a plateau counts once, at its first step). Peaks are ranked by value, ties by the earlier step; with
  fewer than K peaks the remaining places go to the highest other steps (same order). The branch steps are these
  K steps.
* **Rollouts on the tree** (`split_factors`): the BranchGRPO tree of a group with r rollouts splits at the peaks by
  factors whose product is r: r's prime factors, the two smallest merged until at most K remain, the largest
  factor at the highest peak. So r = 16 splits in 2 at all four peaks (BranchGRPO's 16 leaves), r = 8 at the three
  highest peaks, r = 12 in 3, 2, 2 at the three highest. Every step from the first split on is stochastic.
* **TempFlow branching**: one branch step per prompt, drawn uniformly among its K peaks; r children there; ODE
  before and after; only the branch transition trains, weighted by TempFlow's ``s_k / mean(s)`` with the mean over
  all T steps (a peak can be anywhere).
* **The probe is the shared prefix.** Both trees start with one trajectory that stays deterministic until the first
  branch step, so the rollouts reuse the probe's latent at that step and never re-run the steps before it (fewer
  forwards). For BranchGRPO that makes the steps before the first split ODE steps instead of SDE steps: they form the
  root node, alone at depth 0, whose depth-normalised advantage is 0, so they carried no policy gradient anyway.
  The forward at the branch step itself is recomputed for the children (the sampler evaluates each row).
* **Probe noise.** Entropy_base can only be reused if the (prompt, initial noise) pair recurs, so each prompt has
  ``probe_noises`` (1) fixed initial noises, seeded from the run seed, the prompt's index and j; each step draws j.
  The group's rollouts descend from the probe, so they share its initial noise (the group-shared initial noise of
  DanceGRPO's ``use_same_noise``, which BranchGRPO's ``init_same_noise`` also sets).
* **Warm-up** affects the allocation only: probes, base entropies (hence ``entropy_delta`` in the log) and the
  peak-guided branching run from the first step.
* The probe's entropy is that of the conditional rows (SD3 runs CFG as ``[uncond, cond]``); the probes run outside
  the per-prompt rollouts and are not counted in ``samples``; their forwards count in ``model_forwards``.

Logged per step: ``entropy_t`` (the probes' mean Entropy_θ(t), one value per denoising step), ``entropy_delta``
(v per prompt), ``rollouts_per_prompt`` and ``branch_steps`` (per prompt, ascending), all over the whole batch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fastgrpo.diffusion.attention import MODES, AttentionEntropyCollector
from fastgrpo.ops import sde_step
from fastgrpo.train.distributed import all_gather_cat, world

from .base import GroupPlan, Strategy
from .branch_grpo import BranchGRPO
from .tempflow_grpo import TempFlowGRPO

EXPLORATIONS = ("branch", "tempflow")


def entropy_peaks(entropy, k: int) -> list:
    """The ``k`` branch steps of an Entropy(t) curve [T], highest first (the module docstring gives the rule)."""
    e = [float(v) for v in entropy]
    T = len(e)
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, {T}] for a curve of {T} steps, got {k}")
    peaks, a = [], 0
    while a < T:
        b = a
        while b + 1 < T and e[b + 1] == e[a]:
            b += 1
        if (a == 0 or e[a - 1] < e[a]) and (b == T - 1 or e[b + 1] < e[a]):
            peaks.append(a)
        a = b + 1

    def rank(t):
        return -e[t], t

    chosen = sorted(peaks, key=rank)[:k]
    rest = sorted((t for t in range(T) if t not in chosen), key=rank)
    return chosen + rest[:k - len(chosen)]


def split_factors(rollouts: int, k: int) -> list:
    """Split factors (descending, at most ``k``) whose product is ``rollouts``: its prime factors, the two smallest
    merged until at most ``k`` remain."""
    if rollouts < 1 or k < 1:
        raise ValueError(f"rollouts and k must be >= 1, got {rollouts}, {k}")
    factors, n, p = [], rollouts, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    while len(factors) > k:
        factors = sorted([factors[0] * factors[1]] + factors[2:])
    return sorted(factors, reverse=True)


def allocate_rollouts(values, r_low: int, r_high: int) -> list:
    """Rollouts per prompt from the values v [P]: above the batch median ``r_high``, below ``r_low``, equal to it
    ``(r_low + r_high) // 2`` (the module docstring explains ties and odd batches)."""
    v = [float(x) for x in values]
    s, n = sorted(v), len(v)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    r_mean = (r_low + r_high) // 2
    return [r_high if x > median else r_low if x < median else r_mean for x in v]


def probe_seed(run_seed: int, prompt_index: int, j: int) -> int:
    """Seed of prompt ``prompt_index``'s j-th probe noise (stable across processes and resumes)."""
    return zlib.crc32(f"aegpo-probe:{run_seed}:{prompt_index}:{j}".encode())


def _int_arg(args: dict, key: str, default: int, low: int, high: int | None = None) -> int:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"algo_args.{key} must be an integer {bound}, got {v!r}")
    return v


@dataclass
class AEGPO(Strategy):
    name: str = "aegpo"
    # BranchGRPO's SDE and conventions (DanceGRPO's kind, eta 0.3; every stochastic transition trains; group std).
    sde_kind: str = BranchGRPO.sde_kind
    noise_level: float = BranchGRPO.noise_level
    timestep_fraction: float = BranchGRPO.timestep_fraction
    adv_std: str = BranchGRPO.adv_std
    r_high: int = 16
    r_low: int = 8
    warmup_steps: int = 20
    top_k: int = 4
    layers: tuple = (5, 10, 15)
    entropy_mode: str = "mixture"
    exploration: str = "branch"
    probe_noises: int = 1
    split_noise_scale: float = 1.0
    base_entropy: dict = field(default_factory=dict)  # (prompt, probe seed) -> Entropy_base(t) [T] float32
    ARGS: ClassVar[tuple] = ("r_high", "r_low", "warmup_steps", "top_k", "layers", "entropy_mode", "exploration",
                             "probe_noises", "split_noise_scale")
    needs_reference: ClassVar[bool] = True

    def configure(self, cfg) -> None:
        a, T = cfg.algo_args, cfg.sample.num_steps
        self.r_low = _int_arg(a, "r_low", self.r_low, 2)
        self.r_high = a.get("r_high", self.r_high)
        if isinstance(self.r_high, bool) or not isinstance(self.r_high, int) or self.r_high < self.r_low:
            raise ValueError(f"algo_args.r_high must be an integer >= algo_args.r_low ({self.r_low}), "
                             f"got {self.r_high!r}")
        if (self.r_high + self.r_low) % 2:
            raise ValueError(f"algo_args.r_high + algo_args.r_low must be even (their mean r_mean is the warm-up "
                             f"allocation), got {self.r_high} + {self.r_low}")
        if cfg.sample.group_size != self.r_mean:
            raise ValueError(f"sample.group_size must be r_mean = (algo_args.r_high + algo_args.r_low) / 2 = "
                             f"{self.r_mean} (the mean rollouts per prompt), got {cfg.sample.group_size}")
        self.warmup_steps = _int_arg(a, "warmup_steps", self.warmup_steps, 0)
        self.top_k = _int_arg(a, "top_k", self.top_k, 1, T)
        layers = a.get("layers", self.layers)
        if not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"algo_args.layers must be a non-empty list of distinct joint-block indices, "
                             f"got {layers!r}")
        self.layers = tuple(layers)
        self.entropy_mode = a.get("entropy_mode", self.entropy_mode)
        if self.entropy_mode not in MODES:
            raise ValueError(f"algo_args.entropy_mode must be one of {list(MODES)}, got {self.entropy_mode!r}")
        self.exploration = a.get("exploration", self.exploration)
        if self.exploration not in EXPLORATIONS:
            raise ValueError(f"algo_args.exploration must be one of {list(EXPLORATIONS)}, got {self.exploration!r}")
        self.probe_noises = _int_arg(a, "probe_noises", self.probe_noises, 1)
        scale = a.get("split_noise_scale", self.split_noise_scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"algo_args.split_noise_scale must be a number > 0, got {scale!r}")
        if scale != 1.0 and self.exploration != "branch":
            raise ValueError("algo_args.split_noise_scale applies to exploration: branch only")
        self.split_noise_scale = float(scale)
        self.num_steps, self.run_seed = T, cfg.seed
        self.minibatch_unit = "transition" if self.exploration == "branch" else "trajectory"  # BranchGRPO's edges
        if self.exploration == "branch":
            # The tree's node advantages follow the released BranchGRPO rule (ddof 1, eps 1e-8, min std 1e-6) unless
            # train.adv_ddof / train.adv_eps say otherwise; AEGPO's own leaf advantages keep its defaults.
            self._explorer = BranchGRPO(
                adv_ddof=BranchGRPO.adv_ddof if cfg.train.adv_ddof is None else self.adv_ddof,
                adv_eps=BranchGRPO.adv_eps if cfg.train.adv_eps is None else self.adv_eps,
                split_noise_scale=self.split_noise_scale)
        else:
            self._explorer = TempFlowGRPO(sde_kind=self.sde_kind, noise_level=self.noise_level,
                                          branch_steps=tuple(range(T)))

    @property
    def r_mean(self) -> int:
        return (self.r_high + self.r_low) // 2

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"base_entropy": dict(self.base_entropy)}

    def load_state_dict(self, state: dict) -> None:
        self.base_entropy = dict(state.get("base_entropy", {}))

    # ---------------------------------------------------------------------------------------- probes
    def probe(self, ctx, x: torch.Tensor, emb: dict, transformer=None) -> tuple:
        """ODE trajectory of the policy (or of ``transformer``) from ``x`` [B, ...] over all T steps, under the
        attention-entropy collector (``ctx``: the `fastgrpo.algos.base.RolloutContext`): (latents [T+1, B, ...],
        Entropy(t) [B, T] float32 bits)."""
        policy, bs, B = ctx.policy, ctx.batch_size, x.shape[0]
        try:
            collector = AttentionEntropyCollector(transformer if transformer is not None else policy.transformer,
                                                  self.layers, self.entropy_mode)
        except ValueError as e:
            raise ValueError(f"algo_args.layers: {e}") from e
        rows = torch.arange(B)
        latents, entropy = [x], []
        with collector:
            for i in range(self.num_steps):
                v = ctx.velocity(x, torch.full((B,), i), emb, rows, transformer=transformer)
                entropy.append(torch.cat([policy.conditional_rows(collector.pop()) for _ in range(0, B, bs)]))
                x = sde_step(x, v, ctx.sigmas[i].item(), ctx.sigmas[i + 1].item(), kind="ode").prev_sample
                latents.append(x)
        return torch.stack(latents), torch.stack(entropy, dim=1).float().cpu()

    def base_entropies(self, ctx, keys: list, x: torch.Tensor, emb: dict) -> torch.Tensor:
        """Entropy_base(t) [B, T] of the probes ``keys`` [(prompt, seed)] from ``x``: cached ones from the cache,
        the others by one probe of the reference network (not inserted here: see `plan_groups`)."""
        out = torch.empty(len(keys), self.num_steps)
        missing = [n for n, key in enumerate(keys) if key not in self.base_entropy]
        if missing:
            with ctx.policy.reference() as ref_net:
                _, out[missing] = self.probe(ctx, x[missing], {k: v[missing] for k, v in emb.items()},
                                             transformer=ref_net)
        for n, key in enumerate(keys):
            if n not in missing:
                out[n] = self.base_entropy[key]
        return out

    # ---------------------------------------------------------------------------------------- plans
    def plan_groups(self, ctx, step, prompt_idx, generators):
        policy, T = ctx.policy, self.num_steps
        noise_idx = [int(torch.randint(self.probe_noises, (1,), generator=g)) for g in generators]
        seeds = [probe_seed(self.run_seed, i, j) for i, j in zip(prompt_idx, noise_idx)]
        keys = [(ctx.prompts[i], s) for i, s in zip(prompt_idx, seeds)]
        x_T = torch.cat([policy.initial_latents(1, torch.Generator().manual_seed(s)) for s in seeds])
        emb = policy.encode_prompts([k[0] for k in keys])
        latents, entropy = self.probe(ctx, x_T, emb)
        base = self.base_entropies(ctx, keys, x_T, emb)

        # The whole batch, gathered: the median is over every prompt of the step, and each process caches the
        # base entropies of all, so the caches stay identical.
        ids = torch.tensor([prompt_idx, noise_idx], dtype=torch.int64).T
        all_ids, all_entropy, all_base = all_gather_cat(ids), all_gather_cat(entropy), all_gather_cat(base)
        for (i, j), b in zip(all_ids.tolist(), all_base):
            self.base_entropy.setdefault((ctx.prompts[i], probe_seed(self.run_seed, i, j)), b.clone())
        delta = (all_entropy.double() - all_base.double()).abs().mean(dim=1)
        if step < self.warmup_steps:
            rollouts = [self.r_mean] * len(delta)
        else:
            rollouts = allocate_rollouts(delta, self.r_low, self.r_high)
        rank, _ = world()
        mine = rollouts[rank * len(prompt_idx):(rank + 1) * len(prompt_idx)]

        plans, branch = [], torch.full((len(prompt_idx), self.top_k), -1, dtype=torch.int64)
        for n, r in enumerate(mine):
            peaks = entropy_peaks(entropy[n], self.top_k)
            if self.exploration == "branch":
                splits = dict(zip(peaks, split_factors(r, self.top_k)))
            else:
                splits = {peaks[int(torch.randint(len(peaks), (1,), generator=generators[n]))]: r}
            start = min(splits)
            sde = torch.arange(T) >= start if self.exploration == "branch" else torch.arange(T) == start
            plans.append(GroupPlan(roots=1, sde=sde, splits=splits, start=start,
                                   x_start=latents[start, n:n + 1]))
            branch[n, :len(splits)] = torch.tensor(sorted(splits))
        self.record(entropy_t=all_entropy.mean(dim=0).tolist(), entropy_delta=delta.tolist(),
                    rollouts_per_prompt=rollouts,
                    branch_steps=[[s for s in row if s >= 0] for row in all_gather_cat(branch).tolist()])
        return plans

    # ---------------------------------------------------------------------------------------- credit
    def noise_scale(self, step, plan):
        return self._explorer.noise_scale(step, plan)

    def step_weights(self, stds, steps, sigmas):
        return self._explorer.step_weights(stds, steps, sigmas)

    def node_advantages(self, tree, leaf_rewards, leaf_advantages):
        return self._explorer.node_advantages(tree, leaf_rewards, leaf_advantages)
