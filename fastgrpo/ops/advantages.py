"""Group-relative advantages: the normalisations of Flow-GRPO, DanceGRPO and EG-GRPO, one or several rewards.

For rewards ``r [P, G]`` (P prompt groups of G rollouts), every variant computes

    A[p, g] = (r[p, g] - mean_g r[p, :]) / (s + eps),   optionally clamped to [-clip, clip]

and differs only in ``s`` (DESIGN.md §3.4):

* Flow-GRPO (yifan123/flow_grpo, ``flow_grpo/stat_tracking.py``, ``PerPromptStatTracker`` with
  ``global_std=True``): ``s = np.std`` of *all* rewards of the batch (ddof 0), ``eps = 1e-4``; the trainer clamps
  advantages to ``+-train.adv_clip_max = 5``. ``global_std=False`` ("Flow-GRPO (Fixed)") uses the group's std.
* DanceGRPO (XueZeyue/DanceGRPO, ``train_grpo_*.py`` with ``use_group``): ``s = group_rewards.std()`` (torch's
  default, ddof 1), ``eps = 1e-8``; advantages clamped to ``+-adv_clip_max`` (default 5).
* EG-GRPO (minebetter/EG-GRPO): group std, ddof 1, ``eps = 1e-4``, no clamp.

`ADVANTAGE_CONVENTIONS` holds these as keyword sets: ``group_advantages(r, **ADVANTAGE_CONVENTIONS["dance_grpo"])``.

Several rewards, ``r [P, G, R]`` with weights ``w [R]`` (default all 1):

* ``aggregate="rewards"``: normalise the weighted sum ``sum_i w_i r_i`` (Flow-GRPO's multi-reward ``avg``).
* ``aggregate="advantages"``: normalise each reward on its own, then ``A = sum_i w_i A_i`` (MixGRPO's advantage
  aggregation, arXiv 2507.21802): a reward with a large scale cannot drown the others.

Decisions where DESIGN.md is silent:

* Statistics are computed in float64 (as Flow-GRPO's tracker does in numpy) and the advantages returned as
  float32 ``[P, G]`` (``[G]`` for a ``[G]`` input, one group). They carry no gradient: advantages are constants
  of the policy-gradient loss.
* ``std="global"`` pools the rewards of all P groups given (gather across ranks before calling, as the trainer
  does); the mean is always per group.
* ``eps`` must be a finite float > 0 (a constant group then gets advantages 0, not NaN; ``eps=inf`` and
  ``eps=True`` raise); ``ddof`` must leave at least one degree of freedom (``ddof < G``, or ``< P*G`` for the
  global std); NaN or infinite rewards raise ValueError. ``weights`` and ``group_sizes`` that are not numbers
  (e.g. strings) raise ValueError naming them, not torch's TypeError. No groups (P = 0) give an empty result
  on both `group_advantages` and `group_advantages_ref`.
* Groups of different sizes (AEGPO gives 16 rollouts to some prompts and 8 to others): ``rewards [N]`` (or
  ``[N, R]``) holds the groups one after another and ``group_sizes [P]`` their sizes. The mean (and the group std)
  is each group's own; the global std pools all N rewards, each rollout counting once (so a larger group weighs
  more in it). When all sizes are equal this is exactly the ``[P, G]`` computation (the same float operations).

`tree_advantages` is BranchGRPO's tree estimator (its docstring cites the released code): one tree per prompt,
a node's reward the mean of its leaves' rewards, rewards normalised among the nodes of one depth.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch

from ._backend import check_float

STD_MODES = ("group", "global")
AGGREGATES = ("rewards", "advantages")

ADVANTAGE_CONVENTIONS = {
    "flow_grpo": dict(std="global", ddof=0, eps=1e-4, clip=5.0),
    "flow_grpo_fixed": dict(std="group", ddof=0, eps=1e-4, clip=5.0),
    "dance_grpo": dict(std="group", ddof=1, eps=1e-8, clip=5.0),
    "eg_grpo": dict(std="group", ddof=1, eps=1e-4, clip=None),
}

Weights = Union[None, Sequence[float], torch.Tensor]


def _check_inputs(rewards, std, ddof, eps, clip, weights, aggregate) -> torch.Tensor:
    """Validate; returns the weights as a float64 [R] tensor (R = 1 for a single reward)."""
    check_float("rewards", rewards)
    if rewards.ndim not in (1, 2, 3):
        raise ValueError(f"rewards must have shape [P, G], [G], or [P, G, R] for R rewards, "
                         f"got {tuple(rewards.shape)}")
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be an int >= 0 (0: Flow-GRPO, 1: DanceGRPO/EG-GRPO), got {ddof!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a float > 0 and finite (1e-4 Flow-GRPO/EG-GRPO, 1e-8 DanceGRPO), got {eps!r}")
    if clip is not None and (isinstance(clip, bool) or not (isinstance(clip, numbers.Real) and clip > 0)):
        raise ValueError(f"clip must be None or a float > 0 (Flow-GRPO clamps to 5), got {clip!r}")
    G = rewards.shape[1] if rewards.ndim == 3 else rewards.shape[-1]
    n = G if std == "group" else (rewards.shape[0] * G if rewards.ndim == 3 else rewards.numel())
    if rewards.numel() and ddof >= n:
        raise ValueError(f"ddof={ddof} needs more than {ddof} rewards per std ({std} std over {n}); "
                         f"rewards shape {tuple(rewards.shape)}")
    R = rewards.shape[2] if rewards.ndim == 3 else 1
    if weights is None:
        w = torch.ones(R, dtype=torch.float64)
    else:
        if rewards.ndim != 3:
            raise ValueError(f"weights are for several rewards, rewards [P, G, R]; got rewards of shape "
                             f"{tuple(rewards.shape)}")
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"weights must be a sequence or tensor of R floats, got {weights!r}") from e
        if w.numel() != R:
            raise ValueError(f"weights must have one entry per reward (R = {R}), got {w.numel()}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or infinite values")
    return w.to(rewards.device)


def _check_group_sizes(rewards, group_sizes, std, ddof) -> torch.Tensor:
    """Validate ragged groups; returns their sizes as an int64 [P] tensor on the rewards' device."""
    try:
        sizes = torch.as_tensor(group_sizes)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"group_sizes must be a non-empty 1-D sequence of ints, got {group_sizes!r}") from e
    if sizes.ndim != 1 or sizes.numel() == 0 or sizes.dtype.is_floating_point or sizes.dtype == torch.bool:
        raise ValueError(f"group_sizes must be a non-empty 1-D sequence of ints, got {group_sizes!r}")
    check_float("rewards", rewards)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"with group_sizes, rewards must have shape [N] (the groups one after another) or [N, R], "
                         f"got {tuple(rewards.shape)}")
    if bool((sizes < 1).any()):
        raise ValueError(f"group_sizes must all be >= 1, got {sizes.tolist()}")
    if int(sizes.sum()) != rewards.shape[0]:
        raise ValueError(f"group_sizes sum to {int(sizes.sum())} but rewards has {rewards.shape[0]} rows")
    if std == "group" and isinstance(ddof, int) and ddof >= int(sizes.min()):
        raise ValueError(f"ddof={ddof} needs more than {ddof} rewards per std (group std; the smallest group has "
                         f"{int(sizes.min())})")
    return sizes.to(device=rewards.device, dtype=torch.int64)


def _normalise_ragged(r: torch.Tensor, sizes: torch.Tensor, std: str, ddof: int, eps: float) -> torch.Tensor:
    """(r - group mean) / (s + eps) for float64 r [N, R] holding groups of ``sizes`` [P] one after another."""
    gid = torch.repeat_interleave(torch.arange(sizes.numel(), device=r.device), sizes)
    n = sizes.to(torch.float64).unsqueeze(1)
    mean = torch.zeros(sizes.numel(), r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, gid, r) / n
    dev = r - mean[gid]
    if std == "group":
        var = torch.zeros_like(mean).index_add_(0, gid, dev * dev) / (n - ddof)
        s = var.sqrt()[gid]
    else:
        s = r.std(dim=0, correction=ddof, keepdim=True)
    return dev / (s + eps)


def _normalise(r: torch.Tensor, std: str, ddof: int, eps: float) -> torch.Tensor:
    """(r - group mean) / (s + eps) for float64 r [P, G, R] (each reward r[..., i] separately)."""
    mean = r.mean(dim=1, keepdim=True)
    if std == "group":
        s = r.std(dim=1, correction=ddof, keepdim=True)
    else:
        s = r.reshape(-1, r.shape[2]).std(dim=0, correction=ddof).view(1, 1, -1)
    return (r - mean) / (s + eps)


def group_advantages(rewards: torch.Tensor, *, std: str = "group", ddof: int = 0, eps: float = 1e-4,
                     clip: Optional[float] = None, weights: Weights = None,
                     aggregate: str = "rewards", group_sizes=None) -> torch.Tensor:
    """Group-normalised GRPO advantages.

    Args:
        rewards: [P, G] (P groups of G rollouts), [G] (one group), or [P, G, R] (R reward models).
        std: "group" (each group's std) or "global" (the std of all rewards given; Flow-GRPO's default).
        ddof: 0 (population std: Flow-GRPO) or 1 (sample std: DanceGRPO, EG-GRPO).
        eps: added to the std (1e-4 Flow-GRPO and EG-GRPO, 1e-8 DanceGRPO).
        clip: clamp the advantages to [-clip, clip] (Flow-GRPO and DanceGRPO: 5), or None.
        weights: [R] weights of the rewards (default all 1); only with [P, G, R] rewards.
        aggregate: "rewards" (normalise the weighted reward sum) or "advantages" (sum of the weighted
            per-reward advantages, MixGRPO).
        group_sizes: [P] ints, for groups of different sizes: then ``rewards`` is [N] (or [N, R]) with the groups
            one after another, ``N = sum(group_sizes)``.

    Returns:
        float32 advantages [P, G] ([G] for a [G] input; [N] with ``group_sizes``), without gradient.

    Example:
        >>> adv = group_advantages(rewards.view(P, G), **ADVANTAGE_CONVENTIONS["flow_grpo"])
    """
    kw = dict(std=std, ddof=ddof, eps=eps, clip=clip, weights=weights, aggregate=aggregate)
    if group_sizes is not None:
        sizes = _check_group_sizes(rewards, group_sizes, std, ddof)
        if bool((sizes == sizes[0]).all()):  # equal groups: exactly the [P, G] computation
            return group_advantages(rewards.reshape(sizes.numel(), int(sizes[0]), *rewards.shape[1:]),
                                    **kw).reshape(-1)
        w = _check_inputs(rewards.unsqueeze(0), std, ddof, eps, clip, weights, aggregate)
        r = rewards.detach().to(torch.float64)
        r = r.unsqueeze(1) if r.ndim == 1 else r  # [N, R]
        squeeze = False

        def normalise(x):
            return _normalise_ragged(x, sizes, std, ddof, eps)
    else:
        w = _check_inputs(rewards, std, ddof, eps, clip, weights, aggregate)
        squeeze = rewards.ndim == 1
        r = rewards.detach().to(torch.float64)
        r = r.view(1, -1, 1) if squeeze else (r if r.ndim == 3 else r.unsqueeze(2))  # [P, G, R]

        def normalise(x):
            return _normalise(x, std, ddof, eps)
    if aggregate == "rewards":
        adv = normalise((r * w).sum(dim=-1, keepdim=True))[..., 0]
    else:
        adv = (normalise(r) * w).sum(dim=-1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = adv.float()
    return adv[0] if squeeze else adv


def group_advantages_ref(rewards: torch.Tensor, *, std: str = "group", ddof: int = 0, eps: float = 1e-4,
                         clip: Optional[float] = None, weights: Weights = None,
                         aggregate: str = "rewards", group_sizes=None) -> torch.Tensor:
    """Plain twin of `group_advantages` (the test oracle): a loop over groups and rewards written like the
    sources' trackers, std from its definition ``sqrt(sum (r - mean)^2 / (n - ddof))``; float64 output."""
    r = rewards.detach().to(torch.float64)
    if group_sizes is not None:
        sizes = _check_group_sizes(rewards, group_sizes, std, ddof).tolist()
        w = _check_inputs(rewards.unsqueeze(0), std, ddof, eps, clip, weights, aggregate)
        groups = list(torch.split(r if r.ndim == 2 else r.unsqueeze(1), sizes))  # each [n_p, R]
        shape = (r.shape[0],)
    else:
        w = _check_inputs(rewards, std, ddof, eps, clip, weights, aggregate)
        r = r.view(1, -1, 1) if rewards.ndim == 1 else (r if r.ndim == 3 else r.unsqueeze(2))
        groups = list(r)
        shape = rewards.shape[:1] if rewards.ndim == 1 else rewards.shape[:2]
    if aggregate == "rewards":
        groups = [(g * w.view(1, -1)).sum(dim=1, keepdim=True) for g in groups]
        w = torch.ones(1, dtype=torch.float64, device=r.device)

    def std_of(x):
        return torch.sqrt(((x - x.mean()) ** 2).sum() / (x.numel() - ddof))

    if not groups or groups[0].shape[0] == 0:  # P = 0 (or G = 0): nothing to normalise
        return torch.zeros(shape, dtype=torch.float64, device=r.device)
    out = []
    for group in groups:
        adv = torch.zeros(group.shape[0], dtype=torch.float64, device=r.device)
        for i in range(group.shape[1]):
            s = std_of(group[:, i]) if std == "group" else std_of(torch.cat([g[:, i] for g in groups]))
            adv += w[i] * (group[:, i] - group[:, i].mean()) / (s + eps)
        out.append(adv)
    out = torch.cat(out).reshape(shape)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


# ------------------------------------------------------------------------------------------------ tree advantages


def _check_tree(leaf_rewards, branching, ddof, eps, min_std) -> tuple:
    """Validate `tree_advantages`' inputs; returns the branching as a tuple of ints."""
    check_float("leaf_rewards", leaf_rewards)
    if leaf_rewards.ndim not in (1, 2):
        raise ValueError(f"leaf_rewards must have shape [P, L] (P trees of L leaves) or [L] (one tree), "
                         f"got {tuple(leaf_rewards.shape)}")
    if isinstance(branching, (str, bytes)) or not hasattr(branching, "__len__") or (
            isinstance(branching, torch.Tensor) and branching.ndim != 1):
        raise ValueError(f"branching must be a non-empty sequence of ints >= 1 (children per split), "
                         f"got {branching!r}")
    levels = []
    for b in (branching.tolist() if isinstance(branching, torch.Tensor) else list(branching)):
        try:
            if isinstance(b, bool):
                raise TypeError
            b = operator.index(b)
        except TypeError:
            raise ValueError(f"branching must be a non-empty sequence of ints >= 1 (children per split), "
                             f"got {branching!r}") from None
        levels.append(b)
    if not levels or min(levels) < 1:
        raise ValueError(f"branching must be a non-empty sequence of ints >= 1 (children per split), "
                         f"got {branching!r}")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1 (1: torch's default .std(), as the released BranchGRPO), got {ddof!r}")
    for name, value in (("eps", eps), ("min_std", min_std)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if eps == 0 and min_std == 0:
        raise ValueError("eps and min_std must not both be 0 (a depth of equal rewards would give 0 / 0)")
    L = math.prod(levels)
    if leaf_rewards.shape[-1] != L:
        raise ValueError(f"leaf_rewards must have L = prod(branching) = {L} leaves per tree (branching "
                         f"{levels}), got shape {tuple(leaf_rewards.shape)}")
    if leaf_rewards.device.type == "meta":
        raise ValueError("leaf_rewards is on meta: tree advantages need the reward values")
    if leaf_rewards.numel() and not bool(torch.isfinite(leaf_rewards).all()):
        raise ValueError("leaf_rewards contain NaN or infinite values")
    return tuple(levels)


def tree_advantages(leaf_rewards: torch.Tensor, branching: Sequence[int], *, ddof: int = 1, eps: float = 1e-8,
                    min_std: float = 1e-6) -> list:
    """BranchGRPO's depth-wise tree advantages, as released.

    Every prompt's rollouts form one tree: the root splits into ``branching[0]`` children, each of those into
    ``branching[1]``, ..., so that depth ``d + 1`` has ``n_d = prod(branching[:d + 1])`` nodes and the leaves
    number ``L = prod(branching)``. Leaves are in depth-first order, so node ``j`` of depth ``d + 1`` covers the
    leaves ``j * L / n_d`` to ``(j + 1) * L / n_d - 1``. Then, per tree and depth:

    * a node's reward is the mean of its leaves' rewards;
    * a depth with a single node (``n_d == 1``) gets advantage 0;
    * ``s`` = the std of the node rewards of that depth (ddof 1 by default); if ``s < min_std`` every node of
      that depth gets 0, else ``A = (r - mean) / (s + eps)``.

    This is the released rule of Fredreic1849/BranchGRPO (``fastvideo/train_branchgrpo_flux.py`` at commit
    19fbb9f: ``compute_node_rewards_from_leaves``, lines 545-652, its non-prob-weighted branch, lines 642-648, and
    ``compute_hierarchical_advantages_by_depth``, lines 655-687: ``rewards.std()`` is torch's default ddof 1,
    ``std_reward < 1e-6`` gives 0, else ``(rewards - mean) / (std + 1e-8)``; a depth of one node gets 0). Each
    transition parent -> child trains with the child's advantage (``collect_all_transitions``, lines 1199-1221);
    each root's (prompt's) tree is normalised on its own (lines 1134-1181).
    The released tree has one node per denoising step; the nodes of the steps between two splits have the same
    leaves, so they get the advantage of the depth after the last split, which is what this op returns per split
    level. The root (depth 0, the steps before the first split) is alone at its depth: advantage 0, not returned.

    Args:
        leaf_rewards: [P, L] (P trees, one per prompt) or [L] (one tree), any float dtype, any strides.
        branching: children per split level, ints >= 1 (a level of 1 child repeats the previous depth's nodes).
        ddof: 1 (sample std, the released code's ``.std()``) or 0 (population std).
        eps: added to the std (released: 1e-8).
        min_std: a depth whose std is below this gets advantages 0 (released: 1e-6; an absolute threshold, so
            rewards whose spread is below it get no signal whatever their scale).

    Returns:
        A list with one tensor per split level ``d``: ``[P, n_d]`` (``[n_d]`` for an ``[L]`` input), the
        advantages of the nodes of depth ``d + 1`` in leaf order (the last entry is the leaves'). Statistics are
        computed in float64; the result is float64 for a float64 input and float32 otherwise, on the input's
        device, without gradient.

    Example:
        >>> adv = tree_advantages(rewards.view(P, 16), [2, 2, 2, 2])  # BranchGRPO's 4 binary splits
        >>> adv[0].shape, adv[-1].shape
        (torch.Size([P, 2]), torch.Size([P, 16]))
    """
    levels = _check_tree(leaf_rewards, branching, ddof, eps, min_std)
    squeeze = leaf_rewards.ndim == 1
    r = leaf_rewards.detach().to(torch.float64)
    r = r.reshape(1, -1) if squeeze else r
    P, L = r.shape
    out_dtype = torch.float64 if leaf_rewards.dtype == torch.float64 else torch.float32
    out, n = [], 1
    for b in levels:
        n *= b
        if n == 1 or P == 0:
            adv = torch.zeros(P, n, dtype=torch.float64, device=r.device)
        else:
            value = r.reshape(P, n, L // n).mean(dim=2)  # [P, n]: each node's mean leaf reward
            std = value.std(dim=1, correction=ddof, keepdim=True)
            adv = (value - value.mean(dim=1, keepdim=True)) / (std + eps)
            adv = torch.where(std < min_std, torch.zeros_like(adv), adv)
        adv = adv.to(out_dtype)
        out.append(adv[0] if squeeze else adv)
    return out


def tree_advantages_ref(leaf_rewards: torch.Tensor, branching: Sequence[int], *, ddof: int = 1, eps: float = 1e-8,
                        min_std: float = 1e-6) -> list:
    """Plain twin of `tree_advantages` (the test oracle), written like the released code: per tree, each node's
    reward is the mean of a list of its leaves' rewards, then per depth a loop over the nodes with the std from
    its definition ``sqrt(sum (r - mean)^2 / (n - ddof))``; float64 output, same shapes."""
    levels = _check_tree(leaf_rewards, branching, ddof, eps, min_std)
    squeeze = leaf_rewards.ndim == 1
    rows = leaf_rewards.detach().to(torch.float64).cpu().reshape(-1, math.prod(levels)).tolist()
    L = math.prod(levels)
    out, n = [], 1
    for b in levels:
        n *= b
        per_tree = []
        for leaves in rows:
            width = L // n
            nodes = [sum(leaves[j * width:(j + 1) * width]) / width for j in range(n)]
            if len(nodes) <= 1:
                per_tree.append([0.0] * len(nodes))
                continue
            mean = sum(nodes) / len(nodes)
            std = math.sqrt(sum((x - mean) ** 2 for x in nodes) / (len(nodes) - ddof))
            per_tree.append([0.0 if std < min_std else (x - mean) / (std + eps) for x in nodes])
        adv = torch.tensor(per_tree, dtype=torch.float64, device=leaf_rewards.device).reshape(len(rows), n)
        out.append(adv[0] if squeeze else adv)
    return out
