"""Optimal Variance Filtering: the exact size-k maximum-variance subset of every reward group, one launch.

One program per group (row of ``rewards [P, G]``, G <= 1024). With the group sorted ascending, the optimal subset
is the j smallest plus the k - j largest rewards for some j in 0..k (see ``fastgrpo.ops.ovf``), so a program

1. packs each reward into one signed 64-bit key -- the order-preserving bits of its float32 value above its index --
   and sorts the keys (``tl.sort``, a bitonic sort in registers): ascending rewards, equal rewards by index;
2. centres the sorted values on the middle one (a data value, so small-integer and dyadic rewards stay exact) and
   takes prefix sums of d and d^2 for the bottom part and suffix sums for the top part (``tl.cumsum``), so each
   part's sum is accumulated only over the elements it contains;
3. scores every j at once, ``score_j = k * sum d^2 - (sum d)^2 = k^2 * Var_j`` (gathering the prefix at j and the
   suffix at G - k + j), and takes the first maximum (smallest j on ties, ``tl.argmax(tie_break_left=True)``);
4. sorts the chosen original indices ascending and writes them, and the population variance of the chosen
   rewards recomputed in two passes (mean, then squared deviations) so its error is plain fp32 rounding.

Bytes moved: read P*G rewards, write P*k int64 indices and P float32 variances.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import next_power_of_2

MAX_GROUP = 1024  # the whole sorted group lives in one program's registers


@triton.jit
def ovf_select_kernel(r_ptr, idx_ptr, var_ptr, G, k, stride_r, BLOCK_G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    x = tl.load(r_ptr + row * stride_r + offs, mask=valid, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are equal rewards: one key order for both

    # Order-preserving int32 image of a float: negative floats have their magnitude bits flipped.
    bits = x.to(tl.int32, bitcast=True)
    okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (okey.to(tl.int64) << 32) | offs.to(tl.int64)
    key = tl.where(valid, key, 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    key = tl.sort(key)

    order = (key & 0xFFFFFFFF).to(tl.int32)  # original index of the p-th smallest reward
    skey = (key >> 32).to(tl.int32)
    xs = (skey ^ ((skey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    xs = tl.where(valid, xs, 0.0)

    centre = tl.sum(tl.where(offs == G // 2, xs, 0.0), axis=0)
    d = tl.where(valid, xs - centre, 0.0)
    d2 = d * d
    pre1 = tl.cumsum(d, 0)  # sum over positions <= p
    pre2 = tl.cumsum(d2, 0)
    suf1 = tl.cumsum(d, 0, reverse=True)  # sum over positions >= p
    suf2 = tl.cumsum(d2, 0, reverse=True)

    # Candidate j = offs: bottom = positions < j, top = positions >= G - k + j. Candidate j = k = G = BLOCK_G
    # falls outside the block, but it is the same (full) set as j = 0, which wins the tie anyway.
    j = offs
    lo = tl.maximum(j - 1, 0)
    hi = tl.minimum(G - k + j, BLOCK_G - 1)
    has_bot = j > 0
    has_top = j < k
    s1 = tl.where(has_bot, tl.gather(pre1, lo, 0), 0.0) + tl.where(has_top, tl.gather(suf1, hi, 0), 0.0)
    s2 = tl.where(has_bot, tl.gather(pre2, lo, 0), 0.0) + tl.where(has_top, tl.gather(suf2, hi, 0), 0.0)
    score = k * s2 - s1 * s1
    score = tl.where(j <= k, score, float("-inf"))
    best = tl.argmax(score, 0, tie_break_left=True)

    chosen = valid & ((offs < best) | (offs >= G - k + best))
    mean = tl.sum(tl.where(chosen, d, 0.0), axis=0) / k
    dev = tl.where(chosen, d - mean, 0.0)
    tl.store(var_ptr + row, tl.sum(dev * dev, axis=0) / k)

    picked = tl.sort(tl.where(chosen, order, 0x7FFFFFFF))  # chosen indices ascending, then padding
    tl.store(idx_ptr + row * k + offs, picked.to(tl.int64), mask=offs < k)


def _num_warps(block: int) -> int:
    return 1 if block <= 64 else 2 if block <= 256 else 4 if block <= 512 else 8


def ovf_select_launch(rewards: torch.Tensor, k: int):
    """rewards: [P, G] float32/float16/bfloat16 with unit column stride, G <= MAX_GROUP, 1 <= k <= G.

    Returns (indices [P, k] int64 ascending, variance [P] float32).
    """
    P, G = rewards.shape
    idx = torch.empty((P, k), dtype=torch.int64, device=rewards.device)
    var = torch.empty((P,), dtype=torch.float32, device=rewards.device)
    if P > 0:
        block = next_power_of_2(max(G, 2))
        # No FMA contraction: score = k*s2 - s1*s1 fused into one fma rounds the two products differently, so
        # exactly tied candidates (k = 1: every variance is 0) stop comparing equal on a GPU and the tie rule
        # (smallest j) breaks; without fusion both products round alike, as in the interpreter (H100, 2026-11).
        ovf_select_kernel[(P,)](rewards, idx, var, G, k, rewards.stride(0), BLOCK_G=block,
                                num_warps=_num_warps(block), enable_fp_fusion=False)
    return idx, var


def compile_specs():
    """(kernel, signature, constexprs) for the sm_90 compile check: each input dtype, small and largest blocks."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for block in (64, MAX_GROUP):
            sig = {"r_ptr": f"*{dt}", "idx_ptr": "*i64", "var_ptr": "*fp32", "G": "i32", "k": "i32",
                   "stride_r": "i32"}
            specs.append((ovf_select_kernel, sig, {"BLOCK_G": block}))
    return specs
