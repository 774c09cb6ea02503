"""Optimal Variance Filtering (OVF): per group, the size-k subset of rewards with the largest variance.

Pro-GRPO ("Expand and Prune: Maximizing Trajectory Diversity for Effective GRPO in Generative Models",
eq. 10 and 17) keeps, per prompt group of G trajectories, the k whose rewards have the largest population variance

    K* = argmax_{|K| = k}  (1/k) sum_{g in K} (R_g - mean_K)^2

and gives neither an algorithm nor code. Searching all C(G, k) subsets is hopeless (C(48, 12) ~ 7e10), but the
problem is exact and cheap:

    k*Var(K) = sum_K R^2 - (sum_K R)^2 / k is, in any one member R_g (the others fixed), a convex quadratic
    (coefficient 1 - 1/k >= 0). So swapping one member for the smallest or the largest unused reward never lowers
    it, and some optimum takes every member from the extremes: the j smallest plus the k - j largest, j in 0..k.

Hence: sort the group, prefix sums of R and R^2, evaluate the k + 1 candidates, keep the best -- O(G log G) per
group instead of O(C(G, k)). The tests check this against brute force over all subsets. (The same argument
applied to the bottom part's largest member shows that for k >= 2 some optimum holds both the minimum and the
maximum: j = 0 and j = k only ever tie with j = 1 and j = k - 1.)

Conventions (DESIGN.md §3.4, and decisions where it is silent):

* ``rewards [P, G]`` (or ``[G]``, one group: then ``indices [k]`` and a 0-d ``variance``). Returns
  ``(indices [P, k] int64, ascending; variance [P] float32)``, the population variance (ddof 0) of the chosen
  rewards, as in eq. 17. Nothing is differentiable (a selection is piecewise constant); outputs carry no grad.
* Ties: one stable ascending sort (equal rewards ordered by index), then the smallest j among the best
  candidates. So with ``k = 1`` (all variances 0) the answer is the largest reward, and among equal largest
  rewards the one with the largest index (it sorts last); with ``k = G`` every candidate is the whole group.
  ``-0.0`` and ``+0.0`` are the same reward. Ties between candidates are decided on computed scores: exact for
  rewards whose sums are exact in float32 (small integers, dyadic fractions), arbitrary within rounding otherwise.
* Rewards are compared in float32 (float64 rewards are rounded to float32 first on the Triton and C++ paths;
  the torch path computes in float64 for float64 input, so it is the float64 oracle; ``ovf_select_ref`` then
  returns a float64 variance, ``ovf_select`` always float32). Scores centre the sorted rewards on the middle one,
  prefix sums serve the bottom part and suffix sums the top part, and the returned variance is recomputed in
  two passes over the chosen rewards: its error is plain float32 rounding.
* ``k`` is a python int with ``1 <= k <= G``; NaN or infinite rewards, or a tensor that is not 1-d or 2-d,
  raise ValueError (checking for NaN costs one host sync).
* Magnitude (issue 14): rewards with ``|r| > max_abs_reward(G, k) = sqrt(FLT_MAX / (16 k G))`` (1.4e17 for
  G=48, k=24) raise ValueError naming ``rewards`` on every impl, float64 input included: the check runs on the
  values themselves, so float64 rewards beyond float32 range (which the C++/Triton paths would round to inf after
  a finiteness check) and rewards whose float32 scores ``k * sum r^2`` overflow (a wrong subset at ~1e30) are
  refused rather than rescaled. Rewards in use are O(1)-O(100).
* ``impl="auto"`` runs the Triton kernel on CUDA tensors with ``G <= 1024`` (one program per group holds the
  whole sorted group in registers), the C++ extension on CPU tensors when it is built (any G; csrc/ovf.cpp, the
  same algorithm with float64 sums and scores, so it separates near-ties the float32 kernel cannot), and the
  torch path otherwise; ``impl="triton"`` with ``G > 1024`` raises.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import check_float, kernel_module, resolve_impl


# Largest group the kernel takes (fastgrpo.kernels.ovf.MAX_GROUP; not imported here, see _ovf_fused).
TRITON_MAX_GROUP = 1024
_FLT_MAX = float(torch.finfo(torch.float32).max)


class OVFSelection(NamedTuple):
    """Result of `ovf_select`: ``indices [P, k]`` int64 ascending, ``variance [P]`` float32."""

    indices: torch.Tensor
    variance: torch.Tensor


# ----------------------------------------------------------------------------------------------- validation


def _check_inputs(rewards, k, top=None) -> None:
    """Validate `ovf_select`'s inputs; ``top``: a function giving max |rewards| as a float (default: torch ops,
    one host sync; the C++ path passes its one-call loop)."""
    check_float("rewards", rewards)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must have shape [P, G] (groups x group size) or [G], got {tuple(rewards.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be a python int (the number of survivors per group), got {type(k).__name__}")
    G = rewards.shape[-1]
    if not 1 <= k <= G:
        raise ValueError(f"k must satisfy 1 <= k <= G = {G} (rewards shape {tuple(rewards.shape)}), got k={k}")
    if rewards.numel():
        top = float(rewards.detach().abs().amax()) if top is None else top()  # one host sync; NaN propagates
        if not math.isfinite(top):
            raise ValueError("rewards contain NaN or infinite values; OVF needs finite rewards to compare variances")
        limit = max_abs_reward(G, k)
        if top > limit:
            raise ValueError(f"rewards must satisfy |r| <= {limit:.3g} for G={G}, k={k} (the float32 scores "
                             f"k * sum r^2 would overflow), got max |r| = {top:.3g}; rescale the rewards")


def max_abs_reward(G: int, k: int) -> float:
    """The largest |reward| `ovf_select` accepts for groups of G with k survivors: sqrt(FLT_MAX / (16 k G)).

    Scores ``k * sum_K d^2 - (sum_K d)^2`` of centred rewards (|d| <= 2 max|r|) and the prefix sums over a group
    stay below FLT_MAX / 4 there, so the float32 kernels neither overflow nor pick a wrong subset (issue 14: at
    |r| ~ 1e30 they did). E.g. 1.4e17 for G=48, k=24; 8e15 for G=1024, k=512.
    """
    return math.sqrt(_FLT_MAX / (16.0 * max(k, 1) * max(G, 1)))


# ----------------------------------------------------------------------------------------------- reference


def ovf_select_ref(rewards: torch.Tensor, k: int) -> OVFSelection:
    """Plain-PyTorch twin of `ovf_select`, vectorised over groups (the test oracle and benchmark baseline).

    The same algorithm and tie rule as the kernel (stable sort, k + 1 candidates from prefix and suffix sums,
    first best j), computed in float32, or in float64 for float64 rewards (then the variance is float64 too:
    the oracle keeps its precision).
    """
    _check_inputs(rewards, k)
    return _ovf_torch(rewards, k)


def ovf_scores(r: torch.Tensor, k: int):
    """The torch path's choice for float rewards ``r`` [P, G] (no checks): ``(order, d, best)`` with ``order`` the
    stable sort permutation, ``d`` the sorted rewards centred on the middle one, and ``best`` [P, 1] the first j
    (smallest on ties) whose "j smallest + k - j largest" subset has the largest ``k * sum d^2 - (sum d)^2``, from
    prefix and suffix sums over the k + 1 candidates. Shared by `ovf_select_ref` and bench/compiled.py's compiled
    baseline (only data-independent shapes: it compiles with ``fullgraph=True``)."""
    P, G = r.shape
    xs, order = torch.sort(r, dim=1, stable=True)
    d = xs - xs[:, G // 2:G // 2 + 1]  # centre on the middle reward (exact for small-integer rewards)
    pre1, pre2 = d.cumsum(1), (d * d).cumsum(1)
    suf1, suf2 = d.flip(1).cumsum(1).flip(1), (d * d).flip(1).cumsum(1).flip(1)
    j = torch.arange(k + 1, device=r.device)
    lo = (j - 1).clamp(min=0).expand(P, -1)
    hi = (G - k + j).clamp(max=G - 1).expand(P, -1)
    has_bot, has_top = j > 0, j < k
    zero = d.new_zeros(())
    s1 = torch.where(has_bot, pre1.gather(1, lo), zero) + torch.where(has_top, suf1.gather(1, hi), zero)
    s2 = torch.where(has_bot, pre2.gather(1, lo), zero) + torch.where(has_top, suf2.gather(1, hi), zero)
    best = torch.argmax(k * s2 - s1 * s1, dim=1, keepdim=True)  # first maximum: smallest j on ties
    return order, d, best


def _ovf_torch(rewards: torch.Tensor, k: int) -> OVFSelection:
    squeeze = rewards.ndim == 1
    r = rewards.detach().reshape(-1, rewards.shape[-1]).to(torch.promote_types(rewards.dtype, torch.float32))
    P, G = r.shape
    order, d, best = ovf_scores(r, k)
    pos = torch.arange(G, device=r.device)
    chosen = (pos < best) | (pos >= G - k + best)  # exactly k per row
    indices = torch.sort(order[chosen].view(P, k), dim=1).values
    picked = d[chosen].view(P, k)
    dev = picked - picked.mean(dim=1, keepdim=True)
    variance = (dev * dev).mean(dim=1)
    if squeeze:
        return OVFSelection(indices[0], variance[0])
    return OVFSelection(indices, variance)


# ----------------------------------------------------------------------------------------------- fused path


def _ovf_fused(rewards: torch.Tensor, k: int, backend: str) -> OVFSelection:
    ovf_select_launch = kernel_module(backend, "fastgrpo.kernels.ovf").ovf_select_launch
    squeeze = rewards.ndim == 1
    r = rewards.detach().reshape(-1, rewards.shape[-1])
    if r.dtype == torch.float64:
        r = r.float()
    if r.stride(1) != 1:
        r = r.contiguous()
    indices, variance = ovf_select_launch(r, k)
    if squeeze:
        return OVFSelection(indices[0], variance[0])
    return OVFSelection(indices, variance)


def ovf_select(rewards: torch.Tensor, k: int, *, impl: str = "auto") -> OVFSelection:
    """Per group, the indices of the k rewards with the largest population variance (Pro-GRPO's OVF), exactly.

    Args:
        rewards: [P, G] (P groups of G trajectories, e.g. prompts x rollouts) or [G]; float32/float16/bfloat16
            (float64 accepted). Finite.
        k: survivors per group, a python int with 1 <= k <= G.
        impl: "auto" | "triton" | "torch" | "cpp" (see ``fastgrpo.ops._backend``); "auto" takes Triton on CUDA
            for G <= 1024, the C++ extension on CPU when built, else the torch path.

    Returns:
        OVFSelection(indices [P, k] int64 ascending, variance [P] float32 of the chosen rewards, ddof 0); for
        [G] input, indices [k] and a 0-d variance.

    Example:
        >>> sel = ovf_select(preview_rewards.view(P, 48), 24)       # Pro-GRPO's first checkpoint: 48 -> 24
        >>> rows = (sel.indices + 48 * torch.arange(P, device=sel.indices.device)[:, None]).reshape(-1)
        >>> latents = latents[rows]                                     # [P*48, ...] -> the [P*24, ...] survivors
    """
    backend = resolve_impl(impl, rewards.device if isinstance(rewards, torch.Tensor) else torch.device("cpu"),
                           has_cpp=True)
    if backend == "cpp" and isinstance(rewards, torch.Tensor) and rewards.ndim in (1, 2):
        launch = kernel_module("cpp", "fastgrpo.kernels.ovf")
        _check_inputs(rewards, k, top=lambda: launch.max_abs(rewards.detach().reshape(-1, rewards.shape[-1])))
    else:
        _check_inputs(rewards, k)
    G = rewards.shape[-1]
    if backend == "triton" and G > TRITON_MAX_GROUP:
        if impl == "triton":
            raise ValueError(f"impl='triton' handles groups of up to {TRITON_MAX_GROUP} rewards (one program per "
                             f"group), got G={G}; use impl='torch' or 'auto'")
        backend = "torch"
    if backend == "torch":
        indices, variance = _ovf_torch(rewards, k)
        return OVFSelection(indices, variance.float())
    return _ovf_fused(rewards, k, backend)
