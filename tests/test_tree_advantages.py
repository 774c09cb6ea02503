"""tree_advantages (BranchGRPO's released depth-wise tree advantages) and BranchGRPO / AEGPO's node advantages.

The oracle here is written from the released code's formulas (Fredreic1849/BranchGRPO,
``fastvideo/train_branchgrpo_flux.py`` at commit 19fbb9f): ``compute_node_rewards_from_leaves`` (lines 545-652, the
non-prob-weighted branch at lines 642-648: an internal node's reward is the mean of its leaf descendants' rewards)
and ``compute_hierarchical_advantages_by_depth`` (lines 655-687: nodes grouped by depth; a depth of one node gets
0; ``rewards.std()`` is torch's default, ddof 1; ``std < 1e-6`` gives 0 to the whole depth, else
``(r - mean) / (std + 1e-8)``); each transition parent -> child trains with the child's advantage (lines
1199-1221). Like the released sampler (``run_tree_sample_step``, lines 352-519) the oracle's tree has one node per
denoising step, a split step making every current node's children.
"""
import math

import numpy as np
import pytest
import torch

from fastgrpo import tree_advantages, tree_advantages_ref
from fastgrpo.algos.branch_grpo import BranchGRPO, tree_layout
from fastgrpo.train.flow import Tree


class _Node:
    def __init__(self, parent):
        self.parent, self.children, self.reward = parent, [], None
        self.depth = 0 if parent is None else parent.depth + 1
        if parent is not None:
            parent.children.append(self)

    def leaves(self):
        return [self] if not self.children else [leaf for c in self.children for leaf in c.leaves()]


def _released(row, branching, split_steps=None, num_steps=None, ddof=1):
    """One prompt's tree as the released sampler builds it (a node per step; at ``split_steps`` every current node
    gets ``branching[k]`` children, elsewhere one), rewards and advantages by the released formulas. Returns
    {depth: [advantage of each node of that depth, in depth-first order]} (float64 numpy)."""
    split_steps = list(range(len(branching))) if split_steps is None else list(split_steps)
    num_steps = len(branching) if num_steps is None else num_steps
    root = _Node(None)
    current = [root]
    for i in range(num_steps):
        k = split_steps.index(i) if i in split_steps else None
        current = [_Node(n) for n in current for _ in range(branching[k] if k is not None else 1)]
    for leaf, r in zip(current, row):
        leaf.reward = float(r)
    by_depth, stack = {}, [root]
    while stack:  # depth-first, children in order (the released collect_nodes)
        n = stack.pop()
        by_depth.setdefault(n.depth, []).append(n)
        stack.extend(reversed(n.children))
    out = {}
    for depth, nodes in by_depth.items():
        vals = np.array([np.mean([leaf.reward for leaf in n.leaves()]) for n in nodes])
        if len(nodes) <= 1:
            out[depth] = np.zeros(len(nodes))
            continue
        std = vals.std(ddof=ddof)
        out[depth] = np.zeros_like(vals) if std < 1e-6 else (vals - vals.mean()) / (std + 1e-8)
    return out


def _rewards(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


BRANCHINGS = [[3, 2], [2, 2, 2, 2], [5], [1, 4], [2, 1, 3], [4, 3, 1]]


@pytest.mark.parametrize("branching", BRANCHINGS)
def test_matches_the_released_rule(branching):
    P, L = 3, math.prod(branching)
    r = _rewards((P, L), 1)
    got, ref = tree_advantages(r, branching), tree_advantages_ref(r, branching)
    assert len(got) == len(branching)
    for d, (a, b) in enumerate(zip(got, ref)):
        n = math.prod(branching[:d + 1])
        assert a.shape == (P, n) and a.dtype == torch.float32 and b.dtype == torch.float64
    for p in range(P):
        want = _released(r[p].double().numpy(), branching)
        for d in range(len(branching)):
            np.testing.assert_allclose(got[d][p].double().numpy(), want[d + 1], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ref[d][p].numpy(), want[d + 1], rtol=1e-12, atol=1e-12)
        assert want[0].tolist() == [0.0]  # the root: alone at depth 0


def test_steps_between_splits_get_the_advantage_of_the_last_split():
    """The released tree has a node per step: with splits at steps 1, 3, 4 of 6 the nodes of step depth k (after k
    steps) are the branches after the last split before step k, and get that split level's advantages; the steps
    before the first split (depth 1 here) are a single node: 0."""
    branching, splits, T = [2, 3, 2], [1, 3, 4], 6
    r = _rewards((2, 12), 2)
    got = tree_advantages(r, branching)
    for p in range(2):
        want = _released(r[p].double().numpy(), branching, splits, T)
        for k in range(1, T + 1):
            level = sum(s < k for s in splits) - 1
            expect = np.zeros(1) if level < 0 else got[level][p].double().numpy()
            np.testing.assert_allclose(want[k], expect, rtol=1e-6, atol=1e-6)


def test_two_nodes_are_sqrt2_smaller_than_with_the_population_std():
    """Two nodes a, b: with ddof 1 the advantages are +-1/sqrt(2) (released), with ddof 0 they were +-1."""
    r = torch.tensor([[0.0, 1.0, 3.0, 5.0]])
    new = tree_advantages(r, [2, 2])[0]
    old = tree_advantages(r, [2, 2], ddof=0, eps=1e-4)[0]
    torch.testing.assert_close(new, torch.tensor([[-1.0, 1.0]]) / math.sqrt(2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(old / new, torch.full((1, 2), math.sqrt(2)), rtol=1e-4, atol=0)


def test_ddof0_and_other_eps_follow_the_formula():
    r = _rewards((3, 8), 3)
    for kw in (dict(ddof=0), dict(ddof=0, eps=1e-4), dict(eps=0.5), dict(min_std=0.0)):
        got, ref = tree_advantages(r, [2, 4], **kw), tree_advantages_ref(r, [2, 4], **kw)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    want = _released(r[1].double().numpy(), [2, 4], ddof=0)
    got = tree_advantages(r, [2, 4], ddof=0)
    np.testing.assert_allclose(got[1][1].double().numpy(), want[2], rtol=1e-6, atol=1e-6)


def test_equal_subtree_means_give_zero_at_that_depth_only():
    # depth 1: both halves average 2 -> std 0 -> all 0; depth 2 still normalises the leaves
    r = torch.tensor([[1.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    a1, a2 = tree_advantages(r, [2, 2])
    assert a1.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(a2[0], torch.tensor([-1.0, 1.0, 1.0, -1.0]) * (math.sqrt(3) / 2))
    assert a2[1].tolist() == [0.0] * 4  # a constant tree: 0 everywhere, not NaN
    # near-equal: a spread below 1e-6 is zeroed (absolute threshold), one above it is normalised
    base = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    tiny = base + torch.tensor([[0.0, 0.0, 0.0, 5e-7]], dtype=torch.float64)
    small = base + torch.tensor([[0.0, 0.0, 0.0, 1e-5]], dtype=torch.float64)
    assert all(bool((a == 0).all()) for a in tree_advantages(tiny, [2, 2]))
    assert float(tree_advantages(small, [2, 2])[1].abs().max()) > 1.0
    for a, b in zip(tree_advantages(small, [2, 2]), tree_advantages_ref(small, [2, 2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [1e30, 1e12, 1e-2])
def test_reward_scale_does_not_matter_above_the_threshold(scale):
    r = _rewards((3, 12), 4, dtype=torch.float64)
    unit = tree_advantages(r, [3, 2, 2])
    for dtype in (torch.float32, torch.float64):
        scaled = tree_advantages((r * scale).to(dtype), [3, 2, 2])
        for a, b in zip(scaled, unit):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_a_spread_below_min_std_gives_zero_whatever_the_shape():
    r = _rewards((3, 12), 5, dtype=torch.float64) * 1e-9
    assert all(bool((a == 0).all()) for a in tree_advantages(r, [3, 2, 2]))
    # without the threshold (and no eps) the tiny rewards normalise like any others
    free = tree_advantages(r, [3, 2, 2], eps=0.0, min_std=1e-300)
    for a, b in zip(free, tree_advantages(r * 1e9, [3, 2, 2], eps=0.0, min_std=1e-300)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    r = _rewards((3, 8), 6, dtype=dtype)
    got = tree_advantages(r, [2, 2, 2])
    ref = tree_advantages_ref(r.double(), [2, 2, 2])  # the input's values, in float64
    for a, b in zip(got, ref):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_strided_and_expanded_inputs():
    base = _rewards((12, 3), 7)  # [L, P]: its transpose is a non-contiguous [P, L]
    r = base.t()
    assert not r.is_contiguous()
    for a, b in zip(tree_advantages(r, [3, 4]), tree_advantages(r.contiguous(), [3, 4])):
        assert torch.equal(a, b)
    wide = _rewards((3, 24), 8)
    for a, b in zip(tree_advantages(wide[:, ::2], [2, 2, 3]), tree_advantages(wide[:, ::2].clone(), [2, 2, 3])):
        assert torch.equal(a, b)
    row = _rewards((1, 6), 9).expand(4, 6)  # stride 0 over the trees: every tree the same
    got = tree_advantages(row, [2, 3])
    for a, b in zip(got, tree_advantages(row[:1].clone(), [2, 3])):
        assert torch.equal(a, b.expand_as(a))


def test_one_tree_no_tree_and_no_grad():
    r = _rewards((1, 6), 10).requires_grad_()
    two_d = tree_advantages(r, (2, 3))
    one_d = tree_advantages(r[0], torch.tensor([2, 3]))  # [L]: one tree; a tensor branching works too
    for a, b in zip(one_d, two_d):
        assert a.shape == b.shape[1:] and torch.equal(a, b[0]) and not a.requires_grad
    for a, b in zip(tree_advantages_ref(r[0], [2, 3]), tree_advantages_ref(r, [2, 3])):
        assert torch.equal(a, b[0])
    empty = tree_advantages(torch.zeros(0, 6), [2, 3])
    assert [tuple(a.shape) for a in empty] == [(0, 2), (0, 6)]
    assert [tuple(a.shape) for a in tree_advantages_ref(torch.zeros(0, 6), [2, 3])] == [(0, 2), (0, 6)]


@pytest.mark.parametrize("kwargs, msg", [
    (dict(leaf_rewards=torch.zeros(2, 5)), "leaf_rewards must have L = prod"),
    (dict(leaf_rewards=torch.zeros(2, 4, 1)), "leaf_rewards must have shape"),
    (dict(leaf_rewards=torch.tensor([[0.0, float("nan"), 1.0, 2.0]])), "leaf_rewards contain NaN"),
    (dict(leaf_rewards=torch.zeros(2, 4, dtype=torch.int64)), "leaf_rewards must be a floating tensor"),
    (dict(branching=[2, 0, 2]), "branching must"),
    (dict(branching=[]), "branching must"),
    (dict(branching=[2.0, 2]), "branching must"),
    (dict(branching=4), "branching must"),
    (dict(ddof=2), "ddof must be 0 or 1"),
    (dict(eps=-1.0), "eps must be"),
    (dict(min_std=float("nan")), "min_std must be"),
    (dict(eps=0.0, min_std=0.0), "eps and min_std must not both be 0"),
])
def test_bad_inputs(kwargs, msg):
    call = dict(leaf_rewards=torch.zeros(2, 4), branching=[2, 2])
    call.update(kwargs)
    r, b = call.pop("leaf_rewards"), call.pop("branching")
    for op in (tree_advantages, tree_advantages_ref):
        with pytest.raises(ValueError, match="^" + msg):
            op(r, b, **call)


# ------------------------------------------------------------------------------------- BranchGRPO / AEGPO trees


def _wave(branchings):
    """A wave's Tree built as FlowTrainer._rollout does: per group one root; at every split level each active row
    becomes its group's factor of children (1: a chain node, as a group that does not split at another group's
    split step gets), new nodes added in row order (rows stay ordered by group). Returns the tree, its leaf
    rewards and each group's leaf count."""
    assert len({len(b) for b in branchings}) == 1
    tree = Tree()
    node = tree.add_nodes([-1] * len(branchings), [0] * len(branchings), list(range(len(branchings))))
    group = torch.arange(len(branchings))
    for level in range(len(branchings[0])):
        factors = torch.tensor([branchings[g][level] for g in group.tolist()])
        group, parent = group.repeat_interleave(factors), node.repeat_interleave(factors)
        node = tree.add_nodes(parent.tolist(), [tree.depth[p] + 1 for p in parent.tolist()], group.tolist())
    tree.leaf_nodes = node
    sizes = [math.prod(b) for b in branchings]
    return tree, _rewards((sum(sizes),), 11), sizes


def _check_tree(tree, rewards, sizes, branchings, adv):
    """Every node of every group against the released rule on that group's own tree."""
    depth, start = np.array(tree.depth), 0
    for g, (n, b) in enumerate(zip(sizes, branchings)):
        want = _released(rewards[start:start + n].double().numpy(), b)
        for d in range(len(b) + 1):
            nodes = [i for i in range(tree.num_nodes) if tree.group[i] == g and depth[i] == d]
            np.testing.assert_allclose(adv[nodes].double().numpy(), want[d], rtol=1e-6, atol=1e-6)
        start += n


def test_branch_grpo_node_advantages_on_a_hand_built_tree():
    branchings = [[2, 2, 2], [2, 2, 2]]
    tree, rewards, sizes = _wave(branchings)
    adv = BranchGRPO().node_advantages(tree, rewards, torch.zeros(len(rewards)))
    assert adv.dtype == torch.float32 and adv.shape == (tree.num_nodes,) and torch.isfinite(adv).all()
    _check_tree(tree, rewards, sizes, branchings, adv)
    assert adv[0] == 0 and adv[1] == 0  # the roots (also when split_steps does not start at 0: their segment)
    # the old rule (population std, + 1e-4) differs; its population std alone gives sqrt(2) x these at the first
    # split's two nodes
    old = BranchGRPO(adv_ddof=0, adv_eps=1e-4).node_advantages(tree, rewards, torch.zeros(len(rewards)))
    assert not torch.allclose(old, adv, rtol=1e-2, atol=0)
    pop = BranchGRPO(adv_ddof=0).node_advantages(tree, rewards, torch.zeros(len(rewards)))
    first = [i for i in range(tree.num_nodes) if tree.depth[i] == 1]
    torch.testing.assert_close(pop[first] / adv[first], torch.full((4,), math.sqrt(2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(pop[first].abs(), torch.ones(4), rtol=1e-5, atol=0)
    # and the op itself on the leaves in order
    for d, a in enumerate(tree_advantages(rewards.view(2, 8), [2, 2, 2]), start=1):
        nodes = [i for i in range(tree.num_nodes) if tree.depth[i] == d]
        torch.testing.assert_close(adv[nodes], a.reshape(-1))


def test_groups_with_their_own_branching_as_aegpo_plans_them():
    """AEGPO's branch exploration: one wave holds groups of 16, 8 and 12 rollouts (factors in step order; a group
    that does not split at another's split step gets a chain node there: a level of 1 child)."""
    branchings = [[2, 2, 2, 2], [2, 2, 1, 2], [2, 3, 2, 1], [1, 3, 2, 2]]
    tree, rewards, sizes = _wave(branchings)
    layout = tree_layout(tree)
    assert [layout[g][1] for g in range(4)] == [tuple(b) for b in branchings]
    adv = BranchGRPO().node_advantages(tree, rewards, torch.zeros(len(rewards)))
    assert torch.isfinite(adv).all()
    _check_tree(tree, rewards, sizes, branchings, adv)


def test_config_overrides_and_aegpo_explorer():
    from fastgrpo.algos.aegpo import AEGPO
    from fastgrpo.train import resolve_config

    quiet = ["log.progress=false", "log.tensorboard=false"]
    s = BranchGRPO.from_config(resolve_config(preset="tiny-branch-grpo", overrides=quiet))
    assert (s.adv_ddof, s.adv_eps, s.adv_min_std) == (1, 1e-8, 1e-6)
    s = BranchGRPO.from_config(resolve_config(preset="tiny-branch-grpo",
                                              overrides=[*quiet, "train.adv_ddof=0", "train.adv_eps=1e-4"]))
    assert (s.adv_ddof, s.adv_eps) == (0, 1e-4)
    tree, rewards, sizes = _wave([[2, 2, 2]])
    got = s.node_advantages(tree, rewards, torch.zeros(8))
    want = BranchGRPO(adv_ddof=0, adv_eps=1e-4).node_advantages(tree, rewards, torch.zeros(8))
    assert torch.equal(got, want)
    a = AEGPO.from_config(resolve_config(preset="tiny-aegpo", overrides=quiet))
    assert (a._explorer.adv_ddof, a._explorer.adv_eps) == (1, 1e-8)
    assert (a.adv_ddof, a.adv_eps) == (0, 1e-4)  # AEGPO's own (leaf) advantages keep their defaults
    a = AEGPO.from_config(resolve_config(preset="tiny-aegpo", overrides=[*quiet, "train.adv_ddof=0"]))
    assert (a._explorer.adv_ddof, a._explorer.adv_eps) == (0, 1e-8)


def test_uneven_trees_are_refused():
    tree = Tree()
    root = tree.add_nodes([-1], [0], [0])
    kids = tree.add_nodes([0, 0], [1, 1], [0, 0])
    grand = tree.add_nodes([1, 1, 1], [2, 2, 2], [0, 0, 0])  # node 1 has 3 children, node 2 none below
    tree.leaf_nodes = torch.cat([grand, kids[1:]])
    assert root.tolist() == [0]
    with pytest.raises(ValueError, match="different depths"):
        tree_layout(tree)
