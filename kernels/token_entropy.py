"""Token log-prob + entropy kernels over a row of V logits: forward statistics, their merge, and the backward.

With ``z = logits / T`` for one token row, the forward pass reads the row once and keeps three running numbers in
float32, relative to the running max ``m`` of the raw logits ``x`` (initialised to -inf, never 0: a row of -1e4
logits must not underflow), with ``d_j = (x_j - m) / T``::

    s = sum_j exp(d_j)                     w = sum_j exp(d_j) * d_j

so ``lse = m/T + log s``, ``E_p[z] = m/T + w/s`` and ``entropy = lse - E_p[z] = log s - w/s``: the large offset
``m`` cancels exactly instead of being subtracted in float32 (``x - m`` is exact for nearby values; ``x/T - m/T``
would round at the scale of ``m``). When the max moves from ``m`` to ``m'`` both sums are rescaled by
``exp((m - m')/T)`` and ``w`` picks up ``s * (m - m')/T``. Entries equal to -inf (masked vocabulary) add
nothing; a fully masked block never computes ``0 * (-inf)`` or ``exp(-inf - (-inf))``.

The forward runs one program per row, which loops over all V in blocks of ``BLOCK`` logits (keeping the three
numbers per lane of the block and merging the lanes once at the end, `_lane_stats`; or, ``LANES=False``, merging
each block into one running triple; either loading each block in its loop step or, ``PREFETCH``, one step ahead)
and writes the row's results directly (one launch; no partials and no merge kernel; the summation order is a
function of V only, so results do not depend on R). With thousands of rows per call (T2I-R1: 4,096 and 9,216)
that is enough programs to fill the GPU. Per row it saves only ``rowmax`` (raw logits), ``log s`` and ``w / s``
for the backward, which is split into ``n_split`` chunks of ``BLOCK * ITERS`` logits per row (no merge needed
there) and recomputes ``p = exp((x - rowmax)/T - log s)`` in one more pass over V, writing, into a fresh buffer
of the logits' dtype::

    dlogits = [ g_logp * (onehot(target) - p) - g_H * p * (z - E_p[z]) ] / T

Targets outside ``[0, V)`` (and not ignored) are not read; they set ``flag[0] = 1``, which the caller reads once
after all of the call's kernels are queued and turns into the ValueError of the host check. Their rows get NaN
``logp`` and ``entropy`` and no gradient (what a caller sees that does not read the flag: ``validate=False``).

EG-GRPO pass 2 (`eg_shaping_kernel`, see fastgrpo/ops/eg_grpo.py): one program per (row, modality) sorts that
modality's entropies with ``tl.sort`` (others pushed to +inf; a row of L <= ``MAX_SHAPING_L`` tokens fits in one
block), picks both thresholds (the released index rule of that modality, text or image, or numpy's linear
quantile: position and fraction in float64 from the fractions passed as three float32 scalars that sum exactly
to the float64 value, interpolation rounded to the entropies' dtype after every operation, fused multiply-adds
disabled), and writes the modality's ``low``/``high`` masks and shaped advantages in one pass; it also sets
``flag[1]`` for modality values other than -1/0/1 (whose shaped advantage it writes as NaN). The calibrated
bonus (batch-level ``alpha``) adds one small launch, `eg_calibrate_kernel`.

Rows whose target equals ``ignore_index`` read no logits, give logp = entropy = 0 and a zero gradient.

Bytes moved: forward reads R*V logits once (+ O(R) statistics); backward reads them once more and writes R*V
gradients.
"""
from __future__ import annotations

import functools
import itertools
import struct

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

# Upper bounds of the blocking; tests lower them to force the multi-chunk merge on small rows.
MAX_BLOCK = 4096
MAX_ITERS = 4
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the blocked forward works in base 2
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _first_block(base, n_read, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVEN_V: tl.constexpr):
    """PREFETCH: the row's first block of logits, loaded before the loop (in the logits' dtype); else nothing."""
    first = 0.0
    if PREFETCH:
        lane = tl.arange(0, BLOCK)
        if EVEN_V:
            first = tl.load(base + lane, mask=n_read > 0, other=-float("inf"))
        else:
            first = tl.load(base + lane, mask=lane < n_read, other=-float("inf"))
    return first


@triton.jit
def _block(base, start, V, n_read, ahead, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVEN_V: tl.constexpr):
    """(the block of logits at ``start`` in float32, the block to keep for the next step).

    PREFETCH: the block at ``start`` is ``ahead`` (loaded one step earlier), and the next one is loaded now, before
    this step's arithmetic, so that its memory latency overlaps the step (twice the loads in flight per program, for
    a bf16 block's registers); the load past the row's last block is fully masked and reads nothing. Otherwise
    the block is loaded here and ``ahead`` passes through. ``n_read`` is V or 0, so ``offs < n_read`` is the row's
    bound. EVEN_V (V a multiple of BLOCK): every block is whole, so a block is loaded without a per-logit mask
    (the prefetch's with one condition for the whole block), which saves a compare per logit."""
    offs = start + tl.arange(0, BLOCK)
    if PREFETCH:
        x = ahead.to(tl.float32)
        if EVEN_V:
            ahead = tl.load(base + BLOCK + offs, mask=start + BLOCK < n_read, other=-float("inf"))
        else:
            ahead = tl.load(base + BLOCK + offs, mask=BLOCK + offs < n_read, other=-float("inf"))
    elif EVEN_V:
        x = tl.load(base + offs).to(tl.float32)
    else:
        x = tl.load(base + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
    return x, ahead


@triton.jit
def _lane_stats(base, V, n_read, inv_t, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVEN_V: tl.constexpr):
    """The row's (m, s, w) with one running (m, s, w) per lane of the block, merged across lanes after the loop.

    Per logit x a lane's max either stays (``x <= m``: s += t, w += t d with ``d = (x - m)/T``, ``t = exp(d)``)
    or moves to x (s = t s + 1, w = t (w + s d) with ``d = (m - x)/T``): one exp per logit, as in the blocked
    update, but no block-wide max or sum per step. Masked lanes and -inf logits add nothing; a NaN logit makes s
    NaN. The cross-lane merge is the chunk merge of the module docstring. PREFETCH: see `_block`."""
    m = tl.full((BLOCK,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)
    ahead = _first_block(base, n_read, BLOCK, PREFETCH, EVEN_V)
    for start in range(0, n_read, BLOCK):
        x, ahead = _block(base, start, V, n_read, ahead, BLOCK, PREFETCH, EVEN_V)
        up = x > m  # false for NaN and for -inf logits
        fresh = m == -float("inf")  # the lane has seen no finite logit yet (s = w = 0)
        diff = (x - tl.where(fresh, 0.0, m)) * inv_t  # -inf for x = -inf; no inf - inf anywhere
        d = tl.where(up, tl.where(fresh, -float("inf"), -diff), diff)  # <= 0
        t = tl.exp(d)
        dd = tl.where(t > 0.0, d, 0.0)  # d only where t > 0: 0 * -inf is NaN (up with t = 0: a fresh lane, s = 0)
        w = tl.where(up, t * (w + s * dd), w + t * dd)
        s = tl.where(up, t * s + 1.0, s + t)
        m = tl.where(up, x, m)
    big = tl.max(m, 0)
    big_ref = tl.where(big == -float("inf"), 0.0, big)
    d = (m - big_ref) * inv_t  # <= 0 (-inf on lanes that saw no finite logit, whose s = w = 0)
    a = tl.exp(d)
    s_row = tl.sum(a * s, 0)
    w_row = tl.sum(a * (w + s * tl.where(s > 0.0, d, 0.0)), 0)
    return big, s_row, w_row


@triton.jit
def token_stats_fwd_kernel(
    logits_ptr, targets_ptr, mod_ptr, efft_ptr, logp_ptr, ent_ptr, rowmax_ptr, logs_ptr, meanrel_ptr, flag_ptr,
    L, stride_b, stride_l, mod_sb, mod_sl, V, inv_t, ignore_index, ent_scale,
    HAS_MOD: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, PREFETCH: tl.constexpr, EVEN_V: tl.constexpr,
):
    """One program per row: the whole pass over V and the per-row statistics (no partials, no merge launch).

    LANES: keep (m, s, w) per lane of the block and reduce across lanes once, after the loop (no block-wide
    reduction, so no barrier, inside the loop); else reduce each block and update one running (m, s, w).
    PREFETCH: load each block one loop step ahead (`_block`). EVEN_V: V is a multiple of BLOCK (`_block`).

    The blocked update works in base-2 units (``k2 = log2(e)/T``, ``exp2``; ``w`` converted once at the end), and
    keeps ``0 * -inf`` out of ``e * d`` by clamping ``d`` at -1e30 (``exp2`` of it is 0; NaN still propagates)
    instead of a compare and a select per logit: compiled for sm_90, fewer instructions per logit, which at 2
    bytes per logit is what bounds a bandwidth-bound loop once its loads are in flight."""
    row = tl.program_id(0)
    pb = (row // L).to(tl.int64)
    pl = (row % L).to(tl.int64)
    base = logits_ptr + pb * stride_b + pl * stride_l
    tgt = tl.load(targets_ptr + row)
    valid = tgt != ignore_index
    if HAS_MOD:  # eg_grpo_shaping: modality -1 also means "not read"
        mod = tl.load(mod_ptr + pb * mod_sb + pl * mod_sl)
        valid = valid & (mod != -1)
    bad = valid & ((tgt < 0) | (tgt >= V))
    tl.store(flag_ptr, 1, mask=bad)  # the host reads the flag once, after every kernel of the call is queued
    valid = valid & (tgt >= 0) & (tgt < V)  # a bad row reads nothing: NaN logp/entropy (validate=False)
    if HAS_MOD:
        tl.store(efft_ptr + row, tl.where(valid, tgt, ignore_index))  # the backward's and pass 2's targets
    n_read = tl.where(valid, V, 0)  # ignored rows loop zero times
    if LANES:
        m, s, w = _lane_stats(base, V, n_read, inv_t, BLOCK, PREFETCH, EVEN_V)
    else:
        m = -float("inf")
        s = 0.0
        w = 0.0  # in base-2 units until after the loop
        k2 = inv_t * LOG2E
        ahead = _first_block(base, n_read, BLOCK, PREFETCH, EVEN_V)
        for start in range(0, n_read, BLOCK):
            x, ahead = _block(base, start, V, n_read, ahead, BLOCK, PREFETCH, EVEN_V)
            m_new = tl.maximum(m, tl.max(x, 0))
            # Any finite reference works while every value so far is -inf (then s = w = 0).
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            # x - max is exact in fp32 for nearby values ((x * k2) - max would not be); -inf logits and masked
            # lanes give -1e30 (e = 0, e * d = 0), a NaN logit NaN
            d = tl.maximum((x - m_ref) * k2, -1e30, propagate_nan=tl.PropagateNan.ALL)
            e = tl.exp2(d)
            alpha = tl.exp2((m - m_ref) * k2)
            shift = tl.where(s > 0.0, (m - m_ref) * k2, 0.0)
            w = alpha * (w + s * shift) + tl.sum(e * d, 0)
            s = alpha * s + tl.sum(e, 0)
            m = m_new  # stays -inf until a finite logit is seen: a later block of -1e4 logits must set the max
        w = w * LN2
    big = tl.where(m == -float("inf"), 0.0, m)
    total = tl.where(valid, s, 1.0)  # ignored rows: neutral statistics, no log(0)
    logs = tl.log(total)
    mean_rel = tl.where(valid, w / total, 0.0)  # E_p[z] - rowmax / T
    xt = tl.load(base + tl.where(valid, tgt, 0), mask=valid, other=0.0).to(tl.float32)
    unread = tl.where(bad, float("nan"), 0.0)  # ignored rows 0; out-of-range targets NaN (never a finite number)
    tl.store(logp_ptr + row, tl.where(valid, (xt - big) * inv_t - logs, unread))
    tl.store(ent_ptr + row, tl.where(valid, (logs - mean_rel) * ent_scale, unread))
    tl.store(rowmax_ptr + row, big)
    tl.store(logs_ptr + row, logs)
    tl.store(meanrel_ptr + row, mean_rel)


@triton.jit
def token_stats_bwd_kernel(
    logits_ptr, targets_ptr, rowmax_ptr, logs_ptr, meanrel_ptr, glogp_ptr, gent_ptr, dlogits_ptr,
    L, stride_b, stride_l, V, inv_t, ignore_index, ent_scale,
    HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + (row // L).to(tl.int64) * stride_b + (row % L).to(tl.int64) * stride_l
    out = dlogits_ptr + row.to(tl.int64) * V
    tgt = tl.load(targets_ptr + row)
    valid = (tgt != ignore_index) & (tgt >= 0) & (tgt < V)  # an out-of-range target's row: no gradient
    big = tl.load(rowmax_ptr + row)
    logs = tl.load(logs_ptr + row)
    mean_rel = tl.load(meanrel_ptr + row)
    gl = 0.0
    ge = 0.0
    if HAS_GLOGP:
        gl = tl.load(glogp_ptr + row).to(tl.float32)
    if HAS_GENT:
        ge = tl.load(gent_ptr + row).to(tl.float32) * ent_scale
    for it in range(ITERS):
        offs = (split * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(base + offs, mask=inb & valid, other=-float("inf")).to(tl.float32)
        d = (x - big) * inv_t
        p = tl.exp(d - logs)
        # dH/dz = -p (z - E_p[z]); p = 0 on -inf logits, where (z - E_p[z]) is -inf: keep the product 0.
        g = -ge * p * tl.where(p > 0.0, d - mean_rel, 0.0) - gl * p + tl.where(offs == tgt, gl, 0.0)
        g = tl.where(valid, g * inv_t, 0.0)
        tl.store(out + offs, g.to(dlogits_ptr.dtype.element_ty), mask=inb)


def blocking(V: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, n_split) for rows of V logits: a function of V only, so results do not depend on R.

    The forward runs one program per row and loops over all V in BLOCK steps (n_split is the backward's grid)."""
    block = min(MAX_BLOCK, next_power_of_2(max(V, 16)))
    iters = max(1, min(MAX_ITERS, cdiv(V, block)))
    return block, iters, cdiv(V, block * iters)


def fwd_config(V: int) -> dict:
    """The forward kernel's launch configuration for rows of V logits: ``BLOCK`` (logits per loop step, from
    `blocking`), ``num_warps`` and ``LANES`` (per-lane statistics, `_lane_stats`). One function so that
    bench/gpu_probe.py can sweep it on a GPU.

    The default is the blocked update with 4 warps. On the H200 the blocked update at (4096, 8 warps) read at
    56-60% of copy bandwidth at the T2I-R1 shapes, with 20 instructions per logit in its loop (sm_90 SASS,
    nvdisasm), where about 16 keep pace with the memory at 2 bytes per logit. Its base-2 form without the
    per-logit compare and select, and with unmasked loads when V is a multiple of BLOCK (``EVEN_V``), takes 14 at
    8 warps and 11 at 4 warps (48 registers, 10 programs per SM: 80 KB of loads in flight per SM, 64 KB at 8
    warps). The per-lane update (``LANES=True``, no barrier in the loop; the default for a while, never timed on
    a GPU) takes 24-26 instructions per logit and more registers (76 at 8 warps), so it is left to the sweep, as is
    ``PREFETCH`` (load each block one step ahead, `_block`): ``gpu_session.sh round`` times all four variants at
    each tile, and the default follows it."""
    block = blocking(V)[0]
    return {"BLOCK": block, "num_warps": 4, "LANES": False, "PREFETCH": False}


def _row_strides(logits3):
    _, L, _ = logits3.shape
    return max(L, 1), logits3.stride(0), logits3.stride(1)


def token_stats_fwd(logits3, targets, inv_t: float, ignore_index: int, ent_scale: float, *, modality=None,
                    flag=None):
    """Forward: one launch. logits3: [P, L, V] with unit stride along V; targets: contiguous int64 [P*L].

    modality: optional integer [P, L] (any strides); rows where it is -1 are ignored like ignore_index.
    flag: optional int32 tensor whose element 0 is set to 1 when a non-ignored target lies outside [0, V)
    (the kernel never reads out of bounds and writes NaN logp/entropy for that row; the caller raises after
    reading the flag once, or leaves the NaN to its loss check).

    Returns float32 [P*L] tensors (logp, entropy, rowmax, log_s, mean_rel) -- the last three are the backward's
    per-row statistics -- and the effective targets (ignore_index where modality == -1 or the target is out of
    range; the given targets when modality is None).
    """
    P, L, V = logits3.shape
    R = P * L
    cfg = fwd_config(V)
    dev = logits3.device
    # one allocation for the five rows (a host-bound call pays per allocation)
    logp, ent, rowmax, logs, mean_rel = torch.empty((5, R), dtype=torch.float32, device=dev).unbind(0)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
    eff = torch.empty_like(targets) if modality is not None else targets
    if R > 0:
        Lr, sb, sl = _row_strides(logits3)
        msb, msl = (modality.stride(0), modality.stride(1)) if modality is not None else (0, 0)
        token_stats_fwd_kernel[(R,)](
            logits3, targets, modality if modality is not None else targets, eff, logp, ent, rowmax, logs, mean_rel,
            flag, Lr, sb, sl, msb, msl, V, inv_t, ignore_index, ent_scale,
            HAS_MOD=modality is not None, EVEN_V=V % cfg["BLOCK"] == 0, **cfg,
        )
    return logp, ent, rowmax, logs, mean_rel, eff


def token_stats_bwd(logits3, targets, rowmax, logs, mean_rel, g_logp, g_ent, inv_t: float, ignore_index: int,
                    ent_scale: float):
    """Backward. g_logp, g_ent: contiguous float [P*L] or None. Returns dlogits [P, L, V] (contiguous, logits' dtype)."""
    P, L, V = logits3.shape
    R = P * L
    block, iters, n_split = blocking(V)
    dlogits = torch.empty((P, L, V), dtype=logits3.dtype, device=logits3.device)
    if R > 0:
        Lr, sb, sl = _row_strides(logits3)
        token_stats_bwd_kernel[(R, n_split)](
            logits3, targets, rowmax, logs, mean_rel, g_logp if g_logp is not None else rowmax,
            g_ent if g_ent is not None else rowmax, dlogits, Lr, sb, sl, V, inv_t, ignore_index, ent_scale,
            HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None, BLOCK=block, ITERS=iters,
            num_warps=_bwd_num_warps(block),
        )
    return dlogits


def _bwd_num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# ------------------------------------------------------------------------------------------ EG-GRPO pass 2


@triton.jit
def _round_as(x, ET: tl.constexpr, ROUND: tl.constexpr):
    """float32 x rounded to the entropies' dtype and back (one torch op in that dtype). ROUND: 0 float32/64 (no-op),
    1 bfloat16, 2 float16. bf16 rounds to nearest-even on the bits: Triton's interpreter truncates in .to(bf16)."""
    y = x
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        y = x.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _pick(s, offs, k):
    """s[k] of a register tensor (k a scalar; 0 when k is outside)."""
    return tl.sum(tl.where(offs == k, s, 0.0), 0)


@triton.jit
def _quantile(s, offs, n, q, ET: tl.constexpr, F64: tl.constexpr, ROUND: tl.constexpr):
    """numpy's linear quantile of the n first (sorted) values of s: position and fraction in float64, the
    interpolation in the entropies' dtype, from the upper value when the fraction is >= 0.5 (numpy's _lerp)."""
    h = (n.to(tl.float64) - 1.0) * q
    lo = h.to(tl.int32)  # h >= 0 wherever the result is used (n >= 1): truncation is floor
    gamma = h - lo.to(tl.float64)
    hi = tl.minimum(lo + 1, tl.maximum(n - 1, 0))
    a = _pick(s, offs, lo)
    b = _pick(s, offs, hi)
    if F64:
        g = gamma
        g1 = 1.0 - gamma
    else:  # torch's float64 -> bf16/fp16 cast goes through float32
        g = _round_as(gamma.to(tl.float32), ET, ROUND)
        g1 = _round_as((1.0 - gamma).to(tl.float32), ET, ROUND)
    diff = _round_as(b - a, ET, ROUND)
    up = _round_as(b - _round_as(diff * g1, ET, ROUND), ET, ROUND)
    dn = _round_as(a + _round_as(diff * g, ET, ROUND), ET, ROUND)
    return tl.where(gamma >= 0.5, up, dn)


@triton.jit
def eg_shaping_kernel(
    ent_ptr, mod_ptr, efft_ptr, adv_ptr, low_ptr, high_ptr, tadv_ptr, hsum_ptr, hcnt_ptr, flag_ptr,
    L, ent_sb, ent_sl, mod_sb, mod_sl, ignore_index,
    qlo_a, qlo_b, qlo_c, qhi_a, qhi_b, qhi_c, bonus,
    QUANTILE: tl.constexpr, HAS_TGT: tl.constexpr, ADV: tl.constexpr, F64: tl.constexpr, ROUND: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per (row, modality): sort the modality's entropies (others pushed to +inf), pick both
    thresholds, write that modality's low/high masks and shaped advantages (program 0 also writes the ignored
    tokens). ADV: 0 masks only, 1 released bonus, 2 calibrated (advantages without the bonus + per-program
    sums of H over high tokens; `eg_calibrate_kernel` adds the bonus)."""
    b = tl.program_id(0)
    mod_id = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    inb = offs < L
    ET = ent_ptr.dtype.element_ty
    h = tl.load(ent_ptr + b64 * ent_sb + offs * ent_sl, mask=inb, other=0.0)
    if F64:
        hc = h.to(tl.float64)
    else:
        hc = h.to(tl.float32)
    m = tl.load(mod_ptr + b64 * mod_sb + offs * mod_sl, mask=inb, other=-1)
    bad_tok = (m < -1) | (m > 1)
    bad_mod = tl.sum(bad_tok.to(tl.int32), 0) > 0
    tl.store(flag_ptr + 1, 1, mask=bad_mod & (mod_id == 0))
    if HAS_TGT:
        t = tl.load(efft_ptr + b64 * L + offs, mask=inb, other=ignore_index)
        m = tl.where(t == ignore_index, -1, m)
    sel = (m == mod_id) & inb
    n = tl.sum(sel.to(tl.int32), 0)
    s = tl.sort(tl.where(sel, hc, float("inf")), 0)  # the n valid values first, ascending
    q_lo = tl.cast(qlo_a, tl.float64) + tl.cast(qlo_b, tl.float64) + tl.cast(qlo_c, tl.float64)  # exact
    q_hi = tl.cast(qhi_a, tl.float64) + tl.cast(qhi_b, tl.float64) + tl.cast(qhi_c, tl.float64)
    if QUANTILE:  # q_hi = 1 - high_frac here
        sq = tl.where(offs < n, s, 0.0)  # no inf - inf in a row/modality without tokens (its masks are empty)
        tau_lo = _quantile(sq, offs, n, q_lo, ET, F64, ROUND)
        tau_hi = _quantile(sq, offs, n, q_hi, ET, F64, ROUND)
    else:  # released, float64 products (fastgrpo/ops/eg_grpo.py):
        # text:  s[min(n-1, max(1, floor(lf n)))] and s[n - max(1, floor(hf n))]
        # image: s[min(n-1, floor(lf n))] and s[min(n-1, floor((1 - hf) n))] (1 - hf: python's float64 value)
        nd = n.to(tl.float64)
        text = mod_id == 0
        f_lo = (q_lo * nd).to(tl.int32)  # >= 0: truncation is floor
        k_lo = tl.minimum(n - 1, tl.where(text, tl.maximum(1, f_lo), f_lo))
        k_hi = tl.where(text, n - tl.maximum(1, (q_hi * nd).to(tl.int32)),
                        tl.minimum(n - 1, ((1.0 - q_hi) * nd).to(tl.int32)))
        tau_lo = _pick(s, offs, k_lo)
        tau_hi = _pick(s, offs, k_hi)
    low = sel & (hc < tau_lo)
    high = sel & (hc > tau_hi)
    mine = inb & tl.where(mod_id == 0, m != 1, m == 1)  # program 0 also owns ignored (and invalid) tokens
    out = b64 * L + offs
    tl.store(low_ptr + out, low, mask=mine)
    tl.store(high_ptr + out, high, mask=mine)
    if ADV > 0:
        A = tl.load(adv_ptr + b).to(tl.float32)
        H = hc.to(tl.float32)
        keep = sel & (low == 0)
        if ADV == 1:
            bt = tl.where(high, tl.minimum(bonus * tl.abs(A), bonus * H), 0.0)
            tadv = tl.where(keep, A + bt, 0.0)
        else:
            tadv = tl.where(keep, A, 0.0)
            tl.store(hsum_ptr + b * 2 + mod_id, tl.sum(tl.where(high, H, 0.0), 0))
            tl.store(hcnt_ptr + b * 2 + mod_id, tl.sum(high.to(tl.int32), 0))
        tadv = tl.where(bad_tok, float("nan"), tadv)  # a modality value not in -1/0/1: NaN (validate=False)
        tl.store(tadv_ptr + out, tadv, mask=mine)


@triton.jit
def eg_calibrate_kernel(
    ent_ptr, adv_ptr, low_ptr, high_ptr, tadv_ptr, hsum_ptr, hcnt_ptr, B, L, bonus,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Calibrated bonus: alpha = bonus mean(|A|) / mean(H[high]) from the per-program sums (each program
    reduces them again: B is small), then token_adv = A + min(alpha H, bonus |A|) on the high tokens of its row
    that are not also low (low removes the advantage: issue 14, low_frac + high_frac > 1 makes masks overlap)."""
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_B)
    n_high = tl.sum(tl.load(hcnt_ptr + j, mask=j < 2 * B, other=0), 0)
    h_sum = tl.sum(tl.load(hsum_ptr + j, mask=j < 2 * B, other=0.0), 0)
    mean_abs_a = tl.sum(tl.abs(tl.load(adv_ptr + j, mask=j < B, other=0.0)), 0) / B
    mean_h = h_sum / tl.maximum(n_high, 1).to(tl.float32)
    alpha = bonus * mean_abs_a / tl.maximum(mean_h, 1.1754943508222875e-38)
    alpha = tl.where(n_high > 0, alpha, 0.0)  # no high token: no bonus, not 0/0
    A = tl.load(adv_ptr + b)
    offs = tl.arange(0, BLOCK_L)
    inb = offs < L
    out = b.to(tl.int64) * L + offs
    H = tl.load(ent_ptr + out, mask=inb, other=0.0)
    high = tl.load(high_ptr + out, mask=inb, other=0) != 0
    high = high & (tl.load(low_ptr + out, mask=inb, other=0) == 0)
    t = tl.load(tadv_ptr + out, mask=inb, other=0.0)
    t = tl.where(high, A + tl.minimum(alpha * H, bonus * tl.abs(A)), t)
    tl.store(tadv_ptr + out, t, mask=inb)


MAX_SHAPING_L = 8192  # a row (both modalities) is sorted in registers; longer rows take the torch sort


_DUMMY: dict = {}


def _scratch_f32(device) -> torch.Tensor:
    """A per-device float32 [1] tensor passed for pointer arguments a kernel variant never touches."""
    t = _DUMMY.get(device)
    if t is None:
        t = _DUMMY[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


@functools.lru_cache(maxsize=64)
def _split3(q: float) -> tuple[float, float, float]:
    """Three float32 numbers whose float64 sum is exactly q (kernel scalars are float32)."""
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731  (round to nearest, like torch)
    a = f32(q)
    b = f32(q - a)
    c = f32(q - a - b)
    assert a + b + c == q, q
    return a, b, c


def eg_shaping(entropy, modality, *, low_frac, high_frac, rule, flag, eff_targets=None, ignore_index=-100,
               advantages=None, bonus=0.0, calibrate=False):
    """Pass 2 of EG-GRPO on device: masks (and shaped advantages when ``advantages`` is given) in one launch
    (two with ``calibrate``). entropy [B, L] float (any strides); modality [B, L] int (any strides);
    eff_targets: contiguous [B*L] (ignore_index marks ignored tokens) or None. flag[1] is set to 1 when a
    modality value is not -1/0/1. Returns (low, high, token_adv or None)."""
    B, L = entropy.shape
    dev = entropy.device
    low, high = torch.empty((2, B, L), dtype=torch.bool, device=dev).unbind(0)  # one allocation
    adv_mode = 0 if advantages is None else (2 if calibrate else 1)
    tadv = torch.empty((B, L), dtype=torch.float32, device=dev) if adv_mode else None
    if B * L == 0:
        if tadv is not None:
            tadv.zero_()
        return low, high, tadv
    quantile = rule == "quantile"
    qlo = _split3(low_frac)
    qhi = _split3(1 - high_frac if quantile else high_frac)
    dummy = _scratch_f32(dev)  # unused float32 pointers
    adv = advantages.detach().float().contiguous() if adv_mode else dummy
    parts = torch.empty(2 * B, dtype=torch.float32, device=dev) if adv_mode == 2 else dummy
    counts = torch.empty(2 * B, dtype=torch.int32, device=dev) if adv_mode == 2 else flag
    block_l = max(16, next_power_of_2(L))
    eg_shaping_kernel[(B, 2)](
        entropy, modality, eff_targets if eff_targets is not None else modality, adv, low, high,
        tadv if tadv is not None else dummy, parts, counts, flag,
        L, entropy.stride(0), entropy.stride(1), modality.stride(0), modality.stride(1), ignore_index,
        *qlo, *qhi, float(bonus),
        QUANTILE=quantile, HAS_TGT=eff_targets is not None, ADV=adv_mode, F64=entropy.dtype == torch.float64,
        ROUND={torch.bfloat16: 1, torch.float16: 2}.get(entropy.dtype, 0), BLOCK_L=block_l,
        num_warps=8 if block_l >= 2048 else 4, enable_fp_fusion=False,
    )
    if adv_mode == 2:
        assert entropy.is_contiguous()
        eg_calibrate_kernel[(B,)](
            entropy, adv, low, high, tadv, parts, counts, B, L, float(bonus),
            BLOCK_B=max(16, next_power_of_2(2 * B)), BLOCK_L=block_l, num_warps=4, enable_fp_fusion=False,
        )
    return low, high, tadv


def _fwd_signature(dt: str) -> dict:
    """token_stats_fwd_kernel's runtime arguments for logits of Triton type ``dt`` (the sm_90 check)."""
    return {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "mod_ptr": "*i64", "efft_ptr": "*i64", "logp_ptr": "*fp32",
            "ent_ptr": "*fp32", "rowmax_ptr": "*fp32", "logs_ptr": "*fp32", "meanrel_ptr": "*fp32",
            "flag_ptr": "*i32", "L": "i32", "stride_b": "i64", "stride_l": "i32", "mod_sb": "i32", "mod_sl": "i32",
            "V": "i32", "inv_t": "fp32", "ignore_index": "i32", "ent_scale": "fp32"}


def _bwd_signature(dt: str) -> dict:
    """token_stats_bwd_kernel's runtime arguments for logits of Triton type ``dt`` (the sm_90 check)."""
    return {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "rowmax_ptr": "*fp32", "logs_ptr": "*fp32",
            "meanrel_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dlogits_ptr": f"*{dt}", "L": "i32",
            "stride_b": "i64", "stride_l": "i32", "V": "i32", "inv_t": "fp32", "ignore_index": "i32",
            "ent_scale": "fp32"}


def compile_specs():
    """(kernel, signature, constexprs) triples covering the variants the launchers use, for the sm_90 check."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        for has_mod, lanes, prefetch in itertools.product((False, True), (True, False), (False, True)):
            specs.append((token_stats_fwd_kernel, _fwd_signature(dt), {"HAS_MOD": has_mod, "BLOCK": 4096,
                                                                        "LANES": lanes, "PREFETCH": prefetch,
                                                                        "EVEN_V": False}))
        for has_glogp, has_gent in ((True, True), (True, False), (False, True)):
            specs.append((token_stats_bwd_kernel, _bwd_signature(dt),
                          {"HAS_GLOGP": has_glogp, "HAS_GENT": has_gent, "BLOCK": 4096, "ITERS": 4}))

    def shaping(et, adv, quantile, block_l):
        sig = {
            "ent_ptr": f"*{et}", "mod_ptr": "*i64", "efft_ptr": "*i64", "adv_ptr": "*fp32", "low_ptr": "*i1",
            "high_ptr": "*i1", "tadv_ptr": "*fp32", "hsum_ptr": "*fp32", "hcnt_ptr": "*i32", "flag_ptr": "*i32",
            "L": "i32", "ent_sb": "i32", "ent_sl": "i32", "mod_sb": "i32", "mod_sl": "i32", "ignore_index": "i32",
            "qlo_a": "fp32", "qlo_b": "fp32", "qlo_c": "fp32", "qhi_a": "fp32", "qhi_b": "fp32", "qhi_c": "fp32",
            "bonus": "fp32",
        }
        return (eg_shaping_kernel, sig, {"QUANTILE": quantile, "HAS_TGT": adv > 0, "ADV": adv, "F64": et == "fp64",
                                         "ROUND": {"bf16": 1, "fp16": 2}.get(et, 0), "BLOCK_L": block_l})

    for quantile in (False, True):
        for adv in (0, 1, 2):  # eg_token_masks; eg_grpo_shaping released / calibrated
            specs.append(shaping("fp32", adv, quantile, 1024))
        for et in ("bf16", "fp16", "fp64"):
            specs.append(shaping(et, 0, quantile, 1024))
    specs.append(shaping("fp32", 1, False, 4096))
    calib = {"ent_ptr": "*fp32", "adv_ptr": "*fp32", "low_ptr": "*i1", "high_ptr": "*i1", "tadv_ptr": "*fp32",
             "hsum_ptr": "*fp32", "hcnt_ptr": "*i32", "B": "i32", "L": "i32", "bonus": "fp32"}
    specs.append((eg_calibrate_kernel, calib, {"BLOCK_B": 32, "BLOCK_L": 1024}))
    return specs + _launched_specs()


def _launched_specs() -> list:
    """The forward and backward as they compile at T2I-R1's image shape (bf16 [16, 576, 16384], contiguous;
    bench/test_bench_token.py): the launches' configuration (`fwd_config`, `blocking`; all four forward variants),
    and the arguments divisible by 16 there (every pointer, the row count, V and the strides; the modality's
    [16, 576] row stride 576, its unit stride a constant, as the launcher makes it; without a modality both its
    strides are 0)."""
    V = 16384
    cfg = fwd_config(V)
    specs = []
    fwd = _fwd_signature("bf16")
    for has_mod in (True, False):  # eg_grpo_shaping, token_logprob_entropy
        mod = {"mod_sl": 1} if has_mod else {}
        for lanes, prefetch in itertools.product((True, False), (False, True)):
            specs.append((token_stats_fwd_kernel, {k: t for k, t in fwd.items() if k not in mod},
                          {"HAS_MOD": has_mod, "BLOCK": cfg["BLOCK"], "LANES": lanes, "PREFETCH": prefetch,
                           "EVEN_V": V % cfg["BLOCK"] == 0, **mod},
                          {"num_warps": cfg["num_warps"], "ptx_has": ("ld.global.v4",),
                           "divisible": ("*", "L", "stride_b", "stride_l", "V", "mod_sb",
                                         *(() if has_mod else ("mod_sl",)))}))
    block, iters, _ = blocking(V)
    specs.append((token_stats_bwd_kernel, _bwd_signature("bf16"),
                  {"HAS_GLOGP": True, "HAS_GENT": True, "BLOCK": block, "ITERS": iters},
                  {"num_warps": _bwd_num_warps(block), "ptx_has": ("ld.global.v4", "st.global.v4"),
                   "divisible": ("*", "L", "stride_b", "stride_l", "V")}))
    return specs
