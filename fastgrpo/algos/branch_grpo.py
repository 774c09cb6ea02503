"""BranchGRPO (Fredreic1849/BranchGRPO, arXiv 2509.06040): tree-shaped rollouts with depth-wise advantages.

Each prompt starts one trajectory; at each split step every active trajectory splits in 2 (default steps 0, 3, 6, 9
of 20 -> 16 leaves), each child taking the step with its own noise; every step is stochastic (DanceGRPO's SDE,
eta 0.3, the codebase BranchGRPO builds on). Optionally the noise at split steps is scaled by
``split_noise_scale`` while the log-prob stays under the unscaled std, as the reference does.

Advantages (the tree-based estimator, `fastgrpo.tree_advantages`, the released rule): leaves get their reward, an
internal node the mean reward of the leaves below it; rewards are normalised among the nodes of the same depth of
the same prompt's tree, ``(r - mean_depth) / (std_depth + eps)`` with the sample std (ddof 1) and eps 1e-8; a depth
whose std is below 1e-6, or with a single node, gets 0. Every transition of a node (the segment between two splits)
trains with its node's advantage, so shared prefixes are trained once with their subtree's value. Nodes of one
depth step together in one batch (the reference forwards each node alone).

The released tree has a node per denoising step and trains each transition with its child's advantage, among the
nodes of the child's depth (Fredreic1849/BranchGRPO ``fastvideo/train_branchgrpo_flux.py`` at 19fbb9f, lines
655-687 and 1199-1221). Our node is a segment: the children of a split take the split step themselves, so a
transition at step i belongs to the node the released code would call its child at depth i + 1, and the nodes of
that depth are the same branches with the same leaves. The root segment (the steps before the first split, when
``split_steps`` does not start at 0) is alone at depth 0: advantage 0, as the released single-node depths; it is
still sampled stochastically, but carries no policy gradient. ``train.adv_ddof`` / ``train.adv_eps`` override ddof
and eps (they also set the group advantages of the leaves the loop computes, which the node advantages do not
use); the 1e-6 threshold is ``adv_min_std``. Left as they were: the released code clamps every advantage to
``+-adv_clip_max`` (5) in its loss, which can bind only at depths of 27 nodes or more (max |A| = (n - 1) / sqrt(n)),
so never on the 16-leaf trees; its optional ``tree_prob_weighted`` aggregation, ``use_group`` mode and depth /
width pruning of the trained transitions are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastgrpo.ops.advantages import tree_advantages

from .base import GroupPlan, Strategy


@dataclass
class BranchGRPO(Strategy):
    name: str = "branch_grpo"
    sde_kind: str = "dance"
    noise_level: float = 0.3
    timestep_fraction: float = 1.0
    adv_std: str = "group"
    adv_ddof: int = 1  # the released rewards.std() (torch's default)
    adv_eps: float = 1e-8
    adv_min_std: float = 1e-6  # a depth whose std is below this gets advantages 0 (released)
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
        """Depth-wise normalised mean leaf rewards, per prompt tree (`tree_advantages`; the root: 0) [N] float32.
        Nodes below which no leaf survived (none in BranchGRPO's trees) get NaN, which the trainer never trains."""
        return tree_node_advantages(tree, leaf_rewards, ddof=self.adv_ddof, eps=self.adv_eps,
                                    min_std=self.adv_min_std)


def tree_layout(tree) -> dict:
    """Each group's tree as `tree_advantages` sees it: group -> (leaf positions [L] (indices into
    ``tree.leaf_nodes``), branching (children per split level), the node ids of every depth 0..D in leaf order).

    The leaves of a group are contiguous in the wave and every leaf lies at the same depth D; the nodes of depth d
    each cover an equal, contiguous block of the group's leaves. A tree that is not of that shape (e.g. pruned
    unevenly) raises ValueError."""
    leaves = tree.leaf_nodes.tolist()
    by_group: dict = {}
    for pos, leaf in enumerate(leaves):
        by_group.setdefault(tree.group[leaf], []).append(pos)
    out = {}
    for g, positions in by_group.items():
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise ValueError(f"group {g}: its leaves are not contiguous in the wave")
        paths = []
        for pos in positions:
            path, n = [], leaves[pos]
            while n != -1:
                path.append(n)
                n = tree.parent[n]
            paths.append(path[::-1])
        D = len(paths[0]) - 1
        if any(len(p) != D + 1 for p in paths):
            raise ValueError(f"group {g}: its leaves lie at different depths; tree advantages need a uniform tree")
        L, nodes, branching = len(paths), [], []
        for d in range(D + 1):
            col = [p[d] for p in paths]
            ids = list(dict.fromkeys(col))
            if L % len(ids) or col != [n for n in ids for _ in range(L // len(ids))]:
                raise ValueError(f"group {g}: the nodes of depth {d} do not cover equal blocks of leaves")
            if d == 0 and len(ids) != 1:
                raise ValueError(f"group {g}: tree advantages need one root per group, got {len(ids)}")
            if d > 0:
                branching.append(len(ids) // len(nodes[-1]))
            nodes.append(ids)
        out[g] = (positions, tuple(branching), nodes)
    return out


def tree_node_advantages(tree, leaf_rewards, *, ddof: int = 1, eps: float = 1e-8, min_std: float = 1e-6):
    """Advantages [N] float32 (CPU) of a wave's tree nodes by `tree_advantages`, each group its own tree; groups
    of the same branching are computed in one call. Roots get 0, nodes without leaves NaN."""
    r = leaf_rewards.detach().to("cpu", torch.float64).reshape(-1)
    adv = torch.full((tree.num_nodes,), float("nan"), dtype=torch.float64)
    same: dict = {}
    for g, (positions, branching, nodes) in tree_layout(tree).items():
        same.setdefault(branching, []).append((positions, nodes))
    for branching, groups in same.items():
        for _, nodes in groups:
            adv[nodes[0]] = 0.0  # the root, alone at depth 0 (the steps before the first split)
        if not branching:
            continue
        per_depth = tree_advantages(torch.stack([r[pos] for pos, _ in groups]), branching, ddof=ddof, eps=eps,
                                    min_std=min_std)
        for k, (_, nodes) in enumerate(groups):
            for d, a in enumerate(per_depth, start=1):
                adv[nodes[d]] = a[k]
    return adv.float()
