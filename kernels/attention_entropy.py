"""Flash-attention forward that also returns the entropy of each query's attention over the text keys (AEGPO).

One program owns BLOCK_M queries of one (batch, head) and streams the keys in BLOCK_N blocks with the online
softmax of flash-attention-2 (Dao, 2023, Algorithm 1), all statistics in float32 and in base 2 (``exp2``; the
logits are scaled by ``scale * log2(e)`` after the dot, so no rounding is added to q). The key blocks of the
text range ``[text_start, text_start + text_len)`` come first. While they stream, besides the running max ``m``
and sum ``l = sum_j 2^(s_j - m)``, the program keeps

    w = sum_j 2^(s_j - m) * (s_j - m)          (rescaled like l when m grows: w <- a*(w + (m_old - m_new)*l))

so that when the last text block closes, with ``m`` the text max (nothing but text keys seen yet: no underflow),

    text_lse     = ln2 * (m + log2 l)
    text_entropy = ln l - ln2 * w / l          (= text_lse - E_p[s], with every term O(log text_len), so large
                                                logits lose no precision to cancellation)

Then the remaining key blocks (those before the text range, then those after it) finish ``out`` and ``lse``.
Padded keys get a logit of -inf, hence exactly zero probability, and their ``s - m`` term is selected away
(never 0 * (-inf)); the running max starts at -inf and its first correction is taken as 0. Every block holds at
least one real key, so the max is finite after the first block.

Layouts are strides: q, k, v, out are addressed through their logical [B, H, S, D] strides, so [B, H, S, D]
(SD3) and [B, S, H, D] (FLUX) tensors run the same compiled kernel. Head dims up to 128 are padded to a power of
two >= 16 (tl.dot's minimum) with masked loads.

`text_probs_kernel` is the second op: for a range of queries, the full-softmax probabilities of the text keys
``2^(s - lse*log2e)`` summed over heads, added into a float32 [B, query_len, text_len] buffer (a QK^T pass over
the text keys only, no PV). Each program owns one output tile and loops over the heads, so no atomics are needed
and the sum over heads has a fixed order (deterministic). With ``ACCUMULATE=False`` it stores the tile instead of
adding to it, so the first layer of a forward needs no zero-filled buffer (one launch less).

Under Triton's interpreter (INTERPRET=True) dot operands are upcast to float32: the interpreter's dot on
bf16/fp16 operands is not reliable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def attention_text_entropy_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, text_lse_ptr, text_ent_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S, text_start, text_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    text_end = text_start + text_len
    n_text = tl.cdiv(text_len, BLOCK_N)
    n_pre = tl.cdiv(text_start, BLOCK_N)
    n_post = tl.cdiv(S - text_end, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    text_lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    text_ent = tl.zeros([BLOCK_M], dtype=tl.float32)

    for j in range(0, n_text + n_pre + n_post):
        # Text blocks first, then the keys before the text range, then those after it.
        if j < n_text:
            start = text_start + j * BLOCK_N
            limit = text_end
        elif j < n_text + n_pre:
            start = (j - n_text) * BLOCK_N
            limit = text_start
        else:
            start = text_end + (j - n_text - n_pre) * BLOCK_N
            limit = S
        keys = start + offs_n
        n_ok = keys < limit
        kv_rows = keys[:, None].to(tl.int64)
        if BLOCK_D == HEAD_DIM:
            kv_mask = n_ok[:, None]
        else:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_rows * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_rows * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf, m_new finite)
        p = tl.exp2(s - m_new[:, None])  # exactly 0 on padded keys
        if j < n_text:
            shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_new)  # l_i = 0 there; avoid (-inf) * 0
            centred = tl.where(n_ok[None, :], s - m_new[:, None], 0.0)  # 0, not -inf, on padded keys
            w_i = alpha * (w_i + shift * l_i) + tl.sum(p * centred, 1)
        l_i = alpha * l_i + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if INTERPRET:
            acc += tl.dot(p, v, input_precision=PRECISION)
        else:
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if j == n_text - 1:
            log2_l = tl.log2(l_i)
            text_lse = (m_i + log2_l) * 0.6931471805599453
            text_ent = (log2_l - w_i / l_i) * 0.6931471805599453

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    row = (b * H + h) * S + offs_m
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)
    tl.store(text_lse_ptr + row, text_lse, mask=m_ok)
    tl.store(text_ent_ptr + row, text_ent, mask=m_ok)


@triton.jit
def text_probs_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_ob, stride_on,
    H, S, query_start, query_len, text_start, text_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < query_len
    t_ok = offs_t < text_len
    d_ok = offs_d < HEAD_DIM
    if BLOCK_D == HEAD_DIM:
        q_mask = m_ok[:, None]
        k_mask = t_ok[:, None]
    else:
        q_mask = m_ok[:, None] & d_ok[None, :]
        k_mask = t_ok[:, None] & d_ok[None, :]
    q_rows = (query_start + offs_m)[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    k_rows = (text_start + offs_t)[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    for h in range(0, H):
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + q_rows, mask=q_mask, other=0.0)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + k_rows, mask=k_mask, other=0.0)
        if INTERPRET:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        lse = tl.load(lse_ptr + (b * H + h) * S + query_start + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        acc += tl.exp2(s - lse[:, None])  # padded text columns are finite and never stored
    o_ptrs = out_ptr + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_on + offs_t[None, :]
    o_mask = m_ok[:, None] & t_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, acc, mask=o_mask)


# ----------------------------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (the fp32 tolerance rule), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_config(head_dim: int, interpret: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes and launch options. The interpreter gets small blocks so that test-sized sequences span
    several blocks of every phase; fp32 (exact fp32 products, no tensor cores) gets smaller tiles."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    # Chosen on an H100 (bench/gpu_probe.py sweep, bf16, 2026-11-24; bench/results/h100-probe.json): D=64 at
    # SD3-512 b8 0.91x of SDPA flash with (128, 32, 4 warps, 3 stages) vs 0.85x with (128, 64, 4, 3);
    # D=128 at FLUX-1024 b1 1.16x with (128, 64, 8, 3) vs 0.96x with 2 stages.
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def attention_text_entropy_fwd(q, k, v, text_start: int, text_len: int, scale: float):
    """q, k, v: logical [B, H, S, D] views (any strides, unit stride along D), one dtype.

    Returns (out [B, H, S, D] view of a fresh tensor laid out like q, lse, text_lse, text_entropy float32 [B, H, S]).
    """
    B, H, S, D = q.shape
    # The output keeps q's memory order (e.g. [B, S, H, D] for FLUX): allocate in that order, view logically.
    # D stays innermost whatever q's strides: the kernel writes out with unit stride along D (an expanded q, whose
    # stride-0 dims would sort after D, must not move D outward); stride-0 dims of q go outermost.
    order = sorted(range(3), key=lambda i: (q.stride(i) != 0, -q.stride(i), i)) + [3]
    interpret = _interpreting()
    # The interpreter truncates float32 -> bf16/fp16 stores (a GPU rounds to nearest): there the kernel writes
    # float32 and torch rounds, so tests see the rounding a GPU gives.
    store_dtype = torch.float32 if interpret else q.dtype
    out = torch.empty([q.shape[i] for i in order], dtype=store_dtype, device=q.device).permute(
        *[order.index(i) for i in range(4)])
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    text_lse = torch.empty_like(lse)
    text_ent = torch.empty_like(lse)
    if q.numel() == 0:
        return out.to(q.dtype), lse, text_lse, text_ent
    cfg = _attention_config(D, interpret, q.dtype)
    grid = (cdiv(S, cfg["BLOCK_M"]), B * H)
    attention_text_entropy_fwd_kernel[grid](
        q, k, v, out, lse, text_lse, text_ent,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, S, text_start, text_len, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), INTERPRET=interpret, PRECISION=_precision(q.dtype), **cfg,
    )
    return out.to(q.dtype), lse, text_lse, text_ent


def text_probs_accumulate(q, k, lse, out, query_start: int, query_len: int, text_start: int, text_len: int,
                          scale: float, accumulate: bool = True):
    """Add (``accumulate=False``: write) the head-summed text-key probabilities into ``out`` (float32
    [B, query_len, text_len], unit stride on the last dim). q, k: logical [B, H, S, D] views; lse: contiguous
    float32 [B, H, S]."""
    B, H, S, D = q.shape
    if B == 0 or query_len == 0 or text_len == 0:
        return out
    interpret = _interpreting()
    block_m, block_t = (32, 16) if interpret else (64, 64)
    grid = (cdiv(query_len, block_m), cdiv(text_len, block_t), B)
    text_probs_kernel[grid](
        q, k, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1),
        H, S, query_start, query_len, text_start, text_len, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_T=block_t, INTERPRET=interpret,
        PRECISION=_precision(q.dtype), ACCUMULATE=bool(accumulate), num_warps=4,
    )
    return out


class PlannedLaunches:
    """Both kernels' launches for one fixed geometry, with grids, strides and constants computed once.

    For callers that run the same shapes again and again (the AEGPO collector: the same q/k/v geometry in every
    selected layer of every forward): per call only the tensors' pointers are passed, with no validation, no
    allocation and no shape arithmetic. The caller validates once (``fastgrpo.ops.attention``) and keeps one
    plan per geometry. ``strides``: the logical [B, H, S] strides of q, k, v (unit stride along D); ``out`` must
    have ``out_strides`` and ``lse`` be contiguous [B, H, S].
    """

    def __init__(self, shape, q_strides, k_strides, v_strides, out_strides, dtype, text_start: int, text_len: int,
                 query_start: int, query_len: int, probs_strides, scale: float):
        B, H, S, D = shape
        interpret = _interpreting()
        cfg = _attention_config(D, interpret, dtype)
        prec = _precision(dtype)
        self.attention_grid = (cdiv(S, cfg["BLOCK_M"]), B * H)
        self.attention_args = (*q_strides, *k_strides, *v_strides, *out_strides, H, S, text_start, text_len,
                               scale * LOG2E)
        self.attention_kw = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), INTERPRET=interpret, PRECISION=prec, **cfg)
        block_m, block_t = (32, 16) if interpret else (64, 64)
        self.probs_grid = (cdiv(query_len, block_m), cdiv(text_len, block_t), B)
        self.probs_args = (*q_strides, *k_strides, *probs_strides, H, S, query_start, query_len, text_start,
                           text_len, scale * LOG2E)
        self.probs_kw = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_T=block_t, INTERPRET=interpret,
                             PRECISION=prec, num_warps=4)
        self.has_probs = B > 0 and query_len > 0 and text_len > 0

    def attention(self, q, k, v, out, lse, text_lse, text_ent) -> None:
        attention_text_entropy_fwd_kernel[self.attention_grid](q, k, v, out, lse, text_lse, text_ent,
                                                               *self.attention_args, **self.attention_kw)

    def probs(self, q, k, lse, out, accumulate: bool) -> None:
        if self.has_probs:
            text_probs_kernel[self.probs_grid](q, k, lse, out, *self.probs_args, ACCUMULATE=accumulate,
                                               **self.probs_kw)


def _attention_signature(dt: str) -> dict:
    """attention_text_entropy_fwd_kernel's runtime arguments for q/k/v of Triton type ``dt`` (the sm_90 check)."""
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "lse_ptr": "*fp32",
            "text_lse_ptr": "*fp32", "text_ent_ptr": "*fp32", **{s: "i32" for s in _strides("qkvo")},
            "H": "i32", "S": "i32", "text_start": "i32", "text_len": "i32", "qk_scale": "fp32"}


def _probs_signature(dt: str) -> dict:
    """text_probs_kernel's runtime arguments for q/k of Triton type ``dt`` (the sm_90 check)."""
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "lse_ptr": "*fp32", "out_ptr": "*fp32",
            **{s: "i32" for s in _strides("qk")}, "stride_ob": "i32", "stride_on": "i32", "H": "i32", "S": "i32",
            "query_start": "i32", "query_len": "i32", "text_start": "i32", "text_len": "i32", "qk_scale": "fp32"}


def _strides(tensors: str) -> tuple:
    """The [B, H, S] stride arguments of the kernels' tensors named by their letters (q, k, v, o)."""
    return tuple(f"stride_{t}{a}" for t in tensors for a in "bhs")


def compile_specs():
    """(kernel, signature, constexprs) for the sm_90 check: fp32/bf16/fp16, head dims 64 and 128 (and a padded
    one), with the GPU block sizes. Both layouts (bhsd, bshd) differ only in runtime stride values, so each
    variant below is the binary that serves both."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        prec = "ieee" if dt == "fp32" else "tf32"
        for d in (64, 128, 40):
            cfg = _attention_config(d, False, torch.float32 if dt == "fp32" else torch.bfloat16)
            specs.append((attention_text_entropy_fwd_kernel, _attention_signature(dt), {
                "HEAD_DIM": d, "BLOCK_D": _block_d(d), "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                "INTERPRET": False, "PRECISION": prec}))
            for accumulate in (True, False):
                specs.append((text_probs_kernel, _probs_signature(dt), {
                    "HEAD_DIM": d, "BLOCK_D": _block_d(d), "BLOCK_M": 64, "BLOCK_T": 64, "INTERPRET": False,
                    "PRECISION": prec, "ACCUMULATE": accumulate}))
    return specs + _launched_specs()


def _launched_specs() -> list:
    """The collector's bf16 launches as they compile at SD3.5-Medium's shape (D = 64, q/k/v [B, H, S, D] from the
    joint concatenation, S = 1,024 image + 333 text tokens, text from 1,024) and FLUX.1-dev 1024 px's (D = 128,
    [B, S, H, D], S = 512 text + 4,096 image tokens, text from 0): the launches' warps and stages, and the
    arguments divisible by 16 at those shapes (every pointer and stride; S, the text range and the query range
    where they are)."""
    specs = []
    for d, divisible in ((64, ("text_start",)), (128, ("S", "text_start", "text_len"))):
        cfg = _attention_config(d, False, torch.bfloat16)
        specs.append((attention_text_entropy_fwd_kernel, _attention_signature("bf16"), {
            "HEAD_DIM": d, "BLOCK_D": _block_d(d), "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
            "INTERPRET": False, "PRECISION": "tf32"},
            {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
             "divisible": ("*", *_strides("qkvo"), *divisible)}))
    for accumulate in (False, True):  # SD3.5-Medium: [B, 1024, 333] probabilities (stride_on = 333)
        specs.append((text_probs_kernel, _probs_signature("bf16"), {
            "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": 64, "BLOCK_T": 64, "INTERPRET": False, "PRECISION": "tf32",
            "ACCUMULATE": accumulate},
            {"num_warps": 4, "divisible": ("*", *_strides("qk"), "stride_ob", "query_start", "query_len",
                                           "text_start")}))
    return specs
