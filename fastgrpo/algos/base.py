"""The strategy interface: what a GRPO variant may change in the one loop.

A variant (``fastgrpo.algos``) is a `Strategy` subclass with its defaults (SDE kind, noise level, which denoising
steps are trained, advantage conventions, KL weight) plus, where needed, overridden hooks. The config's
``sample.noise_level`` and ``train.*`` values override the defaults when set.

A strategy never sees the trainer. Its rollout hooks (`Strategy.plan_groups`, `Strategy.prune`) receive a
`RolloutContext`: the prompt list, the sigma schedule, the sizes, the chunked velocity, the policy adapter and the
reward, nothing else; the other hooks receive plain values (tensors, a wave's tree). What a variant logs per
optimizer step it records on
itself (`Strategy.record`, from any hook of the sample phase); the loop takes the records after the sample phase
(`Strategy.take_log`) and adds them to the step's ``metrics.jsonl`` row. A variant's state across steps (AEGPO's
base-entropy cache) lives on the strategy and travels in checkpoints through `Strategy.state_dict`.

Rollouts of one prompt form a tree (`fastgrpo.train.flow`): ``GroupPlan.roots`` trajectories start from noise,
and at a step listed in ``GroupPlan.splits`` every active trajectory splits into that many children, each taking
the step with its own noise. Plain GRPO is the tree with G roots and no splits (Flow-GRPO, DanceGRPO); trajectory
branching is one root split into G at step k (TempFlow-GRPO); BranchGRPO splits in 2 at several steps. The leaves
are the group's G rollouts; a node is the segment of a trajectory between two splits. A plan may start its roots at
a later step from latents computed elsewhere (``start``, ``x_start``: AEGPO's probe trajectory is the shared
prefix), and a variant that plans all groups of a step together (`Strategy.plan_groups`) may give them different
numbers of rollouts; the advantages phase then normalises each group by its own statistics. A variant may also
return several plans per prompt (``GroupPlan.prompt``, TempFlow-GRPO's released mode): each plan is then an
advantage group of its own, its randomness from its own ``GroupPlan.generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch


@dataclass(frozen=True)
class RolloutContext:
    """What a strategy's rollout hooks may use of the run; the family's trainer builds it for each sample phase
    (`fastgrpo.train.flow.FlowTrainer.rollout_context`).

    Attributes:
        prompts: the run's prompt list; ``plan_groups`` gets its groups' prompts as indices into it.
        sigmas: the sampler's schedule [T + 1] (CPU float32): step i goes from ``sigmas[i]`` to ``sigmas[i + 1]``.
        num_steps: T (``sample.num_steps``).
        group_size: the rollouts per group (``sample.group_size``).
        batch_size: the most rows one forward takes (``sample.batch_size``).
        velocity: ``velocity(x, step_idx, emb, rows_group, transformer=None) -> v``: the velocity of rows ``x``
            at ``step_idx`` (an int for every row, or one per row) with the prompt embeddings ``emb`` (as returned
            by ``policy.encode_prompts``) of each row's group ``rows_group`` [n], guided as in sampling
            (``sample.guidance_scale``), in chunks of ``batch_size`` rows; ``transformer``: another network than the
            policy's (the reference, from ``policy.reference()``).
        policy: the family's adapter (`fastgrpo.diffusion.adapter.FlowAdapter`): ``encode_prompts``,
            ``initial_latents``, ``decode``, ``reference()``, ``transformer``, ``conditional_rows``.
        reward: the run's reward, ``reward(images, prompts) -> (total [B], {name: [B]})``.
    """

    prompts: Sequence[str]
    sigmas: torch.Tensor
    num_steps: int
    group_size: int
    batch_size: int
    velocity: Callable
    policy: Any
    reward: Callable


@dataclass
class GroupPlan:
    """How one prompt's rollouts unfold over the T steps."""

    roots: int  # trajectories started from noise
    sde: torch.Tensor  # bool [T]: stochastic steps (the others are deterministic ODE steps)
    splits: dict = field(default_factory=dict)  # step -> children per active trajectory
    same_noise: bool = False  # the roots share one initial noise
    pruned_to: int | None = None  # rollouts left at the end when the strategy prunes (Pro-GRPO)
    start: int = 0  # the step the roots begin at; the steps before it are not sampled
    x_start: torch.Tensor | None = None  # the roots' latent at ``start`` ([1 or roots, ...]); None: initial noise
    # Several plans per prompt (TempFlow-GRPO's released mode: one per (spine, branch step)): the index, into the
    # groups given to `Strategy.plan_groups`, of the prompt this plan samples (None: its own position, one plan per
    # group), and the generator of its randomness (None: the group's). Each plan is its own advantage group.
    prompt: int | None = None
    generator: torch.Generator | None = None

    def leaves(self) -> int:
        """The group's final rollouts."""
        return self.pruned_to if self.pruned_to is not None else self.roots * math.prod(self.splits.values())


@dataclass
class Strategy:
    """Defaults are Flow-GRPO's; a variant states only what it changes.

    A new variant subclasses it (a dataclass) and sets:

    * its conventions, as field defaults: ``sde_kind``, ``noise_level``, ``timestep_fraction``, ``beta``,
      ``adv_std`` / ``adv_ddof`` / ``adv_eps``, ``minibatch_unit``; ``kinds`` (the family kinds it trains);
    * its ``algo_args``: their keys in ``ARGS``, read and validated in `configure` (bad values: ValueError naming
      ``algo_args.<key>``);
    * the hooks it changes. Rollouts: `group_plan` (one prompt's tree: roots, split steps, SDE steps) or, to plan a
      step's groups together, `plan_groups`; `noise_scale`; `prune`. Training: `train_steps`, `step_weights`,
      `node_advantages`. State that must survive ``--resume``: `state_dict` / `load_state_dict`;

    and is registered in `fastgrpo.algos.STRATEGIES` under its ``name`` (the config's ``algo``).

    Rollout hooks get a `RolloutContext`, never the trainer. Log fields are recorded, not written anywhere: a hook
    of the sample phase calls ``self.record(name=value, ...)`` (JSON values; a later record of the same name
    replaces the earlier one, so a field recorded once per wave holds the last wave's value); after the sample
    phase the loop calls `take_log` and adds the fields to every update's stats of the step, hence to its
    ``metrics.jsonl`` row (a list keeps its value; a number is averaged over the step's updates). Decision: records
    rather than return values, because the hooks already return what the sampler needs (plans, kept rows) and a
    field may be known only at a later hook of the wave (Pro-GRPO's survivors at each checkpoint).
    """

    name: str = "base"
    sde_kind: str = "flow_grpo"
    noise_level: float = 0.7
    timestep_fraction: float = 0.99
    beta: float = 0.0
    adv_std: str = "global"
    adv_ddof: int = 0
    adv_eps: float = 1e-4
    same_noise: bool = False
    # What one minibatch takes whole (`fastgrpo.train.flow.FlowTrainer.train_rows`): "trajectory" (a tree node's
    # trained transitions together: Flow-GRPO shuffles samples, each with all its timesteps) or "transition"
    # (every transition alone: BranchGRPO shuffles its tree's edges).
    minibatch_unit: str = "trajectory"
    # The family kinds the variant trains (`fastgrpo.families.Family.kind`): "flow" (SDE rollouts over latents) or
    # "ar" (token-by-token rollouts)
    kinds: ClassVar[tuple] = ("flow",)
    needs_reference: ClassVar[bool] = False  # evaluates the reference policy even without a KL term (AEGPO)
    _log: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # `record`ed, not yet taken

    @classmethod
    def from_config(cls, cfg) -> "Strategy":
        s = cls()
        if cfg.sample.noise_level is not None:
            s.noise_level = cfg.sample.noise_level
        for key in ("timestep_fraction", "beta", "adv_std", "adv_ddof", "adv_eps"):
            value = getattr(cfg.train, key)
            if value is not None:
                setattr(s, key, value)
        s.same_noise = cfg.sample.same_noise_per_group
        s.configure(cfg)
        return s

    ARGS: ClassVar[tuple] = ()  # the keys of ``algo_args`` this variant accepts

    @classmethod
    def check_args(cls, cfg) -> None:
        """Validate ``cfg.algo_args`` when the config is built (unknown keys and bad values raise ValueError)."""
        unknown = sorted(set(cfg.algo_args) - set(cls.ARGS))
        if unknown:
            raise ValueError(f"algo_args.{unknown[0]} is not a setting of {cfg.algo} "
                             f"(known: {', '.join(cls.ARGS) or 'none'})")
        cls().configure(cfg)

    def configure(self, cfg) -> None:
        """Read ``cfg.algo_args`` into this strategy, validating against the rest of the config (default: none)."""

    def state_dict(self) -> dict:
        """What the variant keeps between steps and a checkpoint must carry (AEGPO's base-entropy cache)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` on ``--resume``."""

    # ------------------------------------------------------------------------------------------- log
    def record(self, **fields) -> None:
        """Record log fields of this optimizer step (JSON values); the loop takes them with `take_log`."""
        self._log.update(fields)

    def take_log(self) -> dict:
        """The fields recorded since the last call, in the order first recorded; clears them."""
        out, self._log = self._log, {}
        return out

    # ------------------------------------------------------------------------------------------- rollouts
    def plan_groups(self, ctx: RolloutContext, step: int, prompt_idx: list, generators: list) -> list:
        """The plans of this rank's groups at optimizer ``step`` (``prompt_idx``: their prompts' indices into
        ``ctx.prompts``, in order; ``generators``: each group's own generator, keyed by its global index, which
        a plan must draw from so that it does not depend on the number of processes). Default: one `group_plan`
        per group, each yielding ``sample.group_size`` rollouts. AEGPO overrides it: it probes every prompt first
        and plans the groups from what it measured."""
        T, G = ctx.num_steps, ctx.group_size
        plans = [self.group_plan(T, G, gen) for gen in generators]
        for p in plans:
            if p.leaves() != G:
                raise ValueError(f"{self.name}: a group plan yields {p.leaves()} rollouts but sample.group_size is "
                                 f"{G}; set sample.group_size={p.leaves()}")
        return plans

    def group_plan(self, num_steps: int, group_size: int, generator: torch.Generator) -> GroupPlan:
        """Plain GRPO: ``group_size`` independent SDE trajectories."""
        return GroupPlan(roots=group_size, sde=torch.ones(num_steps, dtype=torch.bool), same_noise=self.same_noise)

    def noise_scale(self, step: int, plan: GroupPlan) -> float:
        """Scale of the noise drawn at ``step`` (the log-prob stays under the unscaled std); BranchGRPO's option."""
        return 1.0

    def prune(self, ctx: RolloutContext, step: int, rows: dict) -> torch.Tensor | None:
        """Called at every step of a wave, in order, after the velocity is computed, with the wave's active
        ``rows``: ``x`` [n, ...] (the latents at ``step``), ``v`` [n, ...] (their velocity), ``group`` [n] (CPU:
        each row's group in the wave, rows ordered by group), ``prompts`` (the wave's groups' prompts) and
        ``emb`` (their embeddings); return the indices of the rows to keep (sorted), or None to keep all
        (Pro-GRPO overrides it)."""
        return None

    # ------------------------------------------------------------------------------------------- training
    def num_train_steps(self, num_steps: int) -> int:
        return max(1, int(num_steps * self.timestep_fraction))

    def train_steps(self, num_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """For trajectories without splits: the steps each one trains on, [batch, n] int64. Default (Flow-GRPO):
        the first ``floor(timestep_fraction * T)`` steps, in order."""
        n = self.num_train_steps(num_steps)
        return torch.arange(n).expand(batch, n)

    def step_weights(self, stds: torch.Tensor, steps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Per-transition loss weights from the transition stds [n] at ``steps`` [n] of the schedule ``sigmas``,
        or None for uniform (TempFlow-GRPO overrides this)."""
        return None

    def node_advantages(self, tree, leaf_rewards: torch.Tensor, leaf_advantages: torch.Tensor) -> torch.Tensor:
        """Advantage of every node of a wave's trees [N]. Default: a node's advantage is its leaf's (the trained
        transitions of plain GRPO and of single-split trees belong to one leaf each); BranchGRPO overrides it."""
        adv = torch.full((tree.num_nodes,), float("nan"))
        adv[tree.leaf_nodes] = leaf_advantages.float().cpu()
        return adv


def random_train_steps(num_steps: int, batch: int, fraction: float, generator: torch.Generator,
                       exclude_last: bool = True) -> torch.Tensor:
    """A random ``int(fraction * pool)`` of the steps per sample (at least 1), where the pool is the T - 1 steps
    before the last (``exclude_last``) or all T. DanceGRPO stores the T - 1 transitions before the last and trains
    ``int(len(timesteps) * timestep_fraction)`` of them, the first of a random permutation per sample
    (XueZeyue/DanceGRPO @15cc71d fastvideo/train_grpo_flux.py lines 511-519, 551-556 and 570; T = 20, f = 0.6:
    11 steps, where ``floor(T * f)`` gave 12)."""
    pool = num_steps - 1 if exclude_last and num_steps > 1 else num_steps
    n = max(1, int(pool * fraction))
    return torch.stack([torch.randperm(pool, generator=generator)[:n] for _ in range(batch)])
