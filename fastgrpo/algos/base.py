"""The strategy interface: what a GRPO variant may change in the one loop.

A variant (``fastgrpo.algos``) is a `Strategy` subclass with its defaults (SDE kind, noise level, which denoising
steps are trained, advantage conventions, KL weight) plus, where needed, overridden hooks. The config's
``sample.noise_level`` and ``train.*`` values override the defaults when set.

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
from typing import ClassVar

import torch


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
    """Defaults are Flow-GRPO's; a variant states only what it changes."""

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

    # ------------------------------------------------------------------------------------------- rollouts
    def plan_groups(self, trainer, step: int, prompt_idx: list, generators: list) -> list:
        """The plans of this rank's groups at optimizer ``step`` (``prompt_idx``: their prompts' indices into
        ``trainer.prompts``, in order; ``generators``: each group's own generator, keyed by its global index, which
        a plan must draw from so that it does not depend on the number of processes). Default: one `group_plan`
        per group, each yielding ``sample.group_size`` rollouts. AEGPO overrides it: it probes every prompt first
        and plans the groups from what it measured."""
        T, G = trainer.cfg.sample.num_steps, trainer.cfg.sample.group_size
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

    def prune(self, trainer, step: int, rows) -> torch.Tensor | None:
        """Called at every step after the velocity is computed; return the indices of the rows to keep (sorted),
        or None to keep all (Pro-GRPO overrides it)."""
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
