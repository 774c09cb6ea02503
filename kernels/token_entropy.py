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

Long rows are split across programs (``n_split`` chunks of ``BLOCK * ITERS`` logits, a function of V only); each
writes its partial (m, s, w), and a merge kernel combines the chunks of a row in a fixed order (deterministic).
Per row the merge saves only ``rowmax`` (raw logits), ``log s`` and ``w / s`` for the backward, which recomputes
``p = exp((x - rowmax)/T - log s)`` in one more pass over V and writes, into a fresh buffer of the logits' dtype::

    dlogits = [ g_logp * (onehot(target) - p) - g_H * p * (z - E_p[z]) ] / T

Rows whose target equals ``ignore_index`` read no logits, give logp = entropy = 0 and a zero gradient.

Bytes moved: forward reads R*V logits once (+ O(R) statistics); backward reads them once more and writes R*V
gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Upper bounds of the blocking; tests lower them to force the multi-chunk merge on small rows.
MAX_BLOCK = 4096
MAX_ITERS = 4


@triton.jit
def token_stats_fwd_kernel(
    logits_ptr, targets_ptr, m_ptr, s_ptr, w_ptr, zt_ptr,
    L, stride_b, stride_l, V, n_split, inv_t, ignore_index,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + (row // L).to(tl.int64) * stride_b + (row % L).to(tl.int64) * stride_l
    tgt = tl.load(targets_ptr + row)
    valid = tgt != ignore_index
    m = -float("inf")
    s = 0.0
    w = 0.0
    for it in range(ITERS):
        offs = (split * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        inb = (offs < V) & valid
        x = tl.load(base + offs, mask=inb, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # Any finite reference works while every value so far is -inf (then s = w = 0).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = (x - m_ref) * inv_t  # x - max is exact in fp32 for nearby values; (x * inv_t) - max would not be
        e = tl.exp(d)
        ed = e * tl.where(e > 0.0, d, 0.0)  # masked lanes: e = 0, d = -inf
        alpha = tl.exp((m - m_ref) * inv_t)
        shift = tl.where(s > 0.0, (m - m_ref) * inv_t, 0.0)
        w = alpha * (w + s * shift) + tl.sum(ed, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new  # stays -inf until a finite logit is seen: a later block of -1e4 logits must set the max
    out = row * n_split + split
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    tl.store(w_ptr + out, w)
    xt = tl.load(base + tl.where(valid, tgt, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(zt_ptr + row, xt, mask=split == 0)


@triton.jit
def token_stats_merge_kernel(
    m_ptr, s_ptr, w_ptr, zt_ptr, targets_ptr, logp_ptr, ent_ptr, rowmax_ptr, logs_ptr, meanrel_ptr,
    n_split, inv_t, ignore_index, ent_scale,
    S_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.arange(0, S_PAD)
    mk = j < n_split
    m = tl.load(m_ptr + row * n_split + j, mask=mk, other=-float("inf"))
    s = tl.load(s_ptr + row * n_split + j, mask=mk, other=0.0)
    w = tl.load(w_ptr + row * n_split + j, mask=mk, other=0.0)
    big = tl.max(m, 0)
    big = tl.where(big == -float("inf"), 0.0, big)
    c = tl.exp((m - big) * inv_t)
    shift = tl.where(s > 0.0, (m - big) * inv_t, 0.0)
    total = tl.sum(c * s, 0)
    wsum = tl.sum(c * (w + s * shift), 0)
    tgt = tl.load(targets_ptr + row)
    valid = tgt != ignore_index
    total = tl.where(valid, total, 1.0)  # ignored rows: neutral statistics, no log(0)
    logs = tl.log(total)
    mean_rel = tl.where(valid, wsum / total, 0.0)  # E_p[z] - rowmax / T
    xt = tl.load(zt_ptr + row)
    logp = tl.where(valid, (xt - big) * inv_t - logs, 0.0)
    ent = tl.where(valid, (logs - mean_rel) * ent_scale, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
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
    valid = tgt != ignore_index
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
    """(BLOCK, ITERS, n_split) for rows of V logits: a function of V only, so results do not depend on R."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(V, 16)))
    iters = max(1, min(MAX_ITERS, triton.cdiv(V, block)))
    return block, iters, triton.cdiv(V, block * iters)


def _row_strides(logits3):
    _, L, _ = logits3.shape
    return max(L, 1), logits3.stride(0), logits3.stride(1)


def token_stats_fwd(logits3, targets, inv_t: float, ignore_index: int, ent_scale: float):
    """Forward. logits3: [P, L, V] with unit stride along V; targets: contiguous int64 [P*L].

    Returns float32 [P*L] tensors (logp, entropy, rowmax, log_s, mean_rel); the last three are the backward's
    per-row statistics.
    """
    P, L, V = logits3.shape
    R = P * L
    block, iters, n_split = blocking(V)
    dev = logits3.device
    f32 = dict(dtype=torch.float32, device=dev)
    part_m, part_s, part_w = (torch.empty((R, n_split), **f32) for _ in range(3))
    zt = torch.empty(R, **f32)
    logp, ent, rowmax, logs, mean_rel = (torch.empty(R, **f32) for _ in range(5))
    if R > 0:
        Lr, sb, sl = _row_strides(logits3)
        token_stats_fwd_kernel[(R, n_split)](
            logits3, targets, part_m, part_s, part_w, zt, Lr, sb, sl, V, n_split, inv_t, ignore_index,
            BLOCK=block, ITERS=iters, num_warps=8 if block >= 2048 else 4,
        )
        token_stats_merge_kernel[(R,)](
            part_m, part_s, part_w, zt, targets, logp, ent, rowmax, logs, mean_rel, n_split, inv_t, ignore_index,
            ent_scale, S_PAD=max(16, triton.next_power_of_2(n_split)), num_warps=1,
        )
    return logp, ent, rowmax, logs, mean_rel


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
            num_warps=8 if block >= 2048 else 4,
        )
    return dlogits


def compile_specs():
    """(kernel, signature, constexprs) triples covering the variants the launchers use, for the sm_90 check."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        fwd = {
            "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32", "w_ptr": "*fp32",
            "zt_ptr": "*fp32", "L": "i32", "stride_b": "i64", "stride_l": "i32", "V": "i32", "n_split": "i32",
            "inv_t": "fp32", "ignore_index": "i32",
        }
        specs.append((token_stats_fwd_kernel, fwd, {"BLOCK": 4096, "ITERS": 4}))
        for has_glogp, has_gent in ((True, True), (True, False), (False, True)):
            bwd = {
                "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "rowmax_ptr": "*fp32", "logs_ptr": "*fp32",
                "meanrel_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dlogits_ptr": f"*{dt}",
                "L": "i32", "stride_b": "i64", "stride_l": "i32", "V": "i32", "inv_t": "fp32",
                "ignore_index": "i32", "ent_scale": "fp32",
            }
            specs.append((token_stats_bwd_kernel, bwd,
                          {"HAS_GLOGP": has_glogp, "HAS_GENT": has_gent, "BLOCK": 4096, "ITERS": 4}))
    merge = {
        "m_ptr": "*fp32", "s_ptr": "*fp32", "w_ptr": "*fp32", "zt_ptr": "*fp32", "targets_ptr": "*i64",
        "logp_ptr": "*fp32", "ent_ptr": "*fp32", "rowmax_ptr": "*fp32", "logs_ptr": "*fp32", "meanrel_ptr": "*fp32",
        "n_split": "i32", "inv_t": "fp32", "ignore_index": "i32", "ent_scale": "fp32",
    }
    specs.append((token_stats_merge_kernel, merge, {"S_PAD": 16}))
    return specs
