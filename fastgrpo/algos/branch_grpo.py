"""BranchGRPO (Fredreic1849/BranchGRPO, arXiv 2509.06040): tree-shaped rollouts with depth-wise advantages.

Each prompt starts one trajectory; at each split step every active trajectory splits in 2 (default steps 0, 3, 6, 9
of 20 -> 16 leaves), each child taking the step with its own noise; every step is stochastic (DanceGRPO's SDE,
eta 0.3, the codebase BranchGRPO builds on). Optionally the noise at split steps is scaled by
``split_noise_scale`` while the log-prob stays under the unscaled std, as the reference does.

Advantages (the tree-based estimator): leaves get their reward, an internal node the mean reward of the leaves
below it; rewards are normalised among the nodes of the same depth of the same prompt's tree,
``(r - mean_depth) / (std_depth + eps)``; every transition of a node (the segment between two splits) trains with
its node's advantage, so shared prefixes are trained once with their subtree's value. Nodes of one depth step
together in one batch (the reference forwards each node alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastgrpo.train.strategy import GroupPlan, Strategy


@dataclass
class BranchGRPO(Strategy):
    name: str = "branch_grpo"
    sde_kind: str = "dance"
    noise_level: float = 0.3
    timestep_fraction: float = 1.0
    adv_std: str = "group"
    split_steps: tuple = (0, 3, 6, 9)
    split_noise_scale: float = 1.0
    minibatch_unit: str = "transition"  # the released trainer shuffles the tree's edges one by one
    ARGS: ClassVar[tuple] = ("split_steps", "split_noise_scale")

    def configure(self, cfg) -> None:
        a, T = cfg.algo_args, cfg.sample.num_steps
        steps = tuple(a.get("split_steps", self.split_steps))
        if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < T for s in steps) or \
                list(steps) != sorted(set(steps)):
            raise ValueError(f"algo_args.split_steps must be increasing distinct steps in [0, {T}), got {steps!r}")
        self.split_steps = steps
        self.split_noise_scale = float(a.get("split_noise_scale", 1.0))
        if not self.split_noise_scale > 0:
            raise ValueError(f"algo_args.split_noise_scale must be > 0, got {self.split_noise_scale}")
        if cfg.sample.group_size != 2 ** len(steps):
            raise ValueError(f"sample.group_size must be 2 ** len(algo_args.split_steps) = {2 ** len(steps)} "
                             f"(the tree's leaves), got {cfg.sample.group_size}")

    def group_plan(self, num_steps, group_size, generator):
        return GroupPlan(roots=1, sde=torch.ones(num_steps, dtype=torch.bool),
                         splits={s: 2 for s in self.split_steps})

    def noise_scale(self, step, plan):
        return self.split_noise_scale if step in plan.splits else 1.0

    def node_advantages(self, tree, leaf_rewards, leaf_advantages):
        """Depth-wise normalised mean leaf rewards, per prompt tree."""
        r = leaf_rewards.double().cpu()
        value = torch.tensor([r[tree.leaves_of(n)].mean().item() for n in range(tree.num_nodes)],
                             dtype=torch.float64)
        depth, group = torch.tensor(tree.depth), torch.tensor(tree.group)
        adv = torch.zeros(tree.num_nodes, dtype=torch.float64)
        for g in group.unique().tolist():
            for d in depth[group == g].unique().tolist():
                sel = (group == g) & (depth == d)
                vals = value[sel]
                std = vals.std(correction=self.adv_ddof) if vals.numel() > self.adv_ddof else torch.tensor(0.0)
                adv[sel] = (vals - vals.mean()) / (std + self.adv_eps)
        return adv.float()
