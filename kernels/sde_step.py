"""Fused SDE step + Gaussian log-prob (+ KL) kernels, forward and backward.

Every kind of step in DESIGN.md §3.1 is affine in the latent and the velocity, with per-sample coefficients:

    mean = cx[b] * x + cv[b] * v          prev = mean + std[b] * eps

so one elementwise kernel serves them all. Besides ``mean`` (and ``prev`` when it samples) the forward pass
reduces, per sample b and per chunk of its N = C*H*W elements,

    ssq[b]   = sum (prev - mean)^2                      (-> log-prob, finished on [B] in fastgrpo.ops.sde)
    klssq[b] = sum (cv[b] * (v - v_ref))^2 = sum (mean - mean_ref)^2   (-> KL)

Partial sums go to a [B, n_chunks] buffer that the host sums in a fixed order, so the reduction is
deterministic and large latents (16x128x128) spread over many programs. The backward pass recomputes ``mean``
from x and v instead of saving it.

Bytes moved (forward, sampling with given noise, fp32): read x, v, eps; write prev, mean = 5 * 4 * numel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOISE modes of the forward kernel.
NO_SAMPLE = 0  # ODE: prev = mean, no log-prob
SAMPLE = 1  # prev = mean + std * eps, eps read from memory
GIVEN = 2  # prev read from memory (log-prob of a given sample)


@triton.jit
def sde_step_fwd_kernel(
    x_ptr, v_ptr, eps_ptr, prev_ptr, vref_ptr, mean_ptr, ssq_ptr, klssq_ptr,
    cx_ptr, cv_ptr, std_ptr,
    N, n_chunks,
    NOISE: tl.constexpr, HAS_VREF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * N
    cx = tl.load(cx_ptr + b)
    cv = tl.load(cv_ptr + b)
    std = tl.load(std_ptr + b)
    ssq = tl.zeros([BLOCK], dtype=tl.float32)
    klssq = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        mean = cx * x + cv * v
        tl.store(mean_ptr + base + offs, mean, mask=m)
        if NOISE == 1:
            eps = tl.load(eps_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            prev = mean + std * eps
            tl.store(prev_ptr + base + offs, prev, mask=m)
            d = prev - mean
            ssq += tl.where(m, d * d, 0.0)
        if NOISE == 2:
            prev = tl.load(prev_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            d = prev - mean
            ssq += tl.where(m, d * d, 0.0)
        if HAS_VREF:
            vr = tl.load(vref_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            dk = cv * (v - vr)
            klssq += tl.where(m, dk * dk, 0.0)
    if NOISE != 0:
        tl.store(ssq_ptr + b * n_chunks + chunk, tl.sum(ssq, 0))
    if HAS_VREF:
        tl.store(klssq_ptr + b * n_chunks + chunk, tl.sum(klssq, 0))


@triton.jit
def sde_step_bwd_kernel(
    x_ptr, v_ptr, prev_ptr, vref_ptr, gmean_ptr, gssq_ptr, gklssq_ptr,
    cx_ptr, cv_ptr, gx_ptr, gv_ptr, gvref_ptr,
    N,
    HAS_DIFF: tl.constexpr, HAS_VREF: tl.constexpr, HAS_GMEAN: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_GV: tl.constexpr, NEED_GVREF: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    # d mean/dx = cx, d mean/dv = cv; d ssq/d mean = -2 (prev - mean); d klssq/dv = 2 cv^2 (v - v_ref) = -d/dv_ref.
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * N
    cx = tl.load(cx_ptr + b)
    cv = tl.load(cv_ptr + b)
    for it in range(ITERS):
        offs = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_GMEAN:
            g += tl.load(gmean_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_DIFF or HAS_VREF:
            v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_DIFF:
            gssq = tl.load(gssq_ptr + b)
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            prev = tl.load(prev_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            g += -2.0 * gssq * (prev - (cx * x + cv * v))
        if NEED_GX:
            tl.store(gx_ptr + base + offs, (cx * g).to(gx_ptr.dtype.element_ty), mask=m)
        gv = cv * g
        if HAS_VREF:
            gkl = tl.load(gklssq_ptr + b)
            vr = tl.load(vref_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            gk = 2.0 * gkl * cv * cv * (v - vr)
            gv += gk
            if NEED_GVREF:
                tl.store(gvref_ptr + base + offs, (-gk).to(gvref_ptr.dtype.element_ty), mask=m)
        if NEED_GV:
            tl.store(gv_ptr + base + offs, gv.to(gv_ptr.dtype.element_ty), mask=m)


def _blocking(n: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, n_chunks): each program covers BLOCK*ITERS elements of one sample."""
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    iters = max(1, min(4, triton.cdiv(n, block)))
    return block, iters, triton.cdiv(n, block * iters)


def sde_step_fwd(x, v, cx, cv, std, *, eps=None, prev=None, v_ref=None):
    """Launch the forward kernel. x, v, eps, prev, v_ref: contiguous [B, N]; cx, cv, std: float32 [B].

    Returns (prev or None, mean, ssq [B] or None, klssq [B] or None), all float32.
    """
    B, N = x.shape
    mode = SAMPLE if eps is not None else GIVEN if prev is not None else NO_SAMPLE
    block, iters, n_chunks = _blocking(N)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    new_prev = torch.empty((B, N), dtype=torch.float32, device=x.device) if mode == SAMPLE else None
    ssq = torch.empty((B, n_chunks), dtype=torch.float32, device=x.device) if mode != NO_SAMPLE else None
    klssq = torch.empty((B, n_chunks), dtype=torch.float32, device=x.device) if v_ref is not None else None
    if B > 0:
        sde_step_fwd_kernel[(n_chunks, B)](
            x, v, eps if eps is not None else x, new_prev if mode == SAMPLE else (prev if prev is not None else mean),
            v_ref if v_ref is not None else x, mean, ssq if ssq is not None else mean,
            klssq if klssq is not None else mean, cx, cv, std, N, n_chunks,
            NOISE=mode, HAS_VREF=v_ref is not None, BLOCK=block, ITERS=iters, num_warps=4,
        )
    # Fixed-order sum over chunks: deterministic run to run.
    return (
        new_prev,
        mean,
        ssq.sum(1) if ssq is not None else None,
        klssq.sum(1) if klssq is not None else None,
    )


def sde_step_bwd(x, v, cx, cv, *, prev=None, v_ref=None, g_mean=None, g_ssq=None, g_klssq=None,
                 need_gx=True, need_gv=True, need_gvref=False):
    """Launch the backward kernel. Returns (g_x or None, g_v or None, g_vref or None) in the inputs' dtypes."""
    B, N = x.shape
    has_diff = g_ssq is not None and prev is not None
    has_vref = g_klssq is not None and v_ref is not None
    gx = torch.empty_like(x) if need_gx else None
    gv = torch.empty_like(v) if need_gv else None
    gvref = None
    if need_gvref and v_ref is not None:
        # Without a KL gradient, v_ref does not influence anything that was differentiated.
        gvref = torch.empty_like(v_ref) if has_vref else torch.zeros_like(v_ref)
    block, iters, n_chunks = _blocking(N)
    if B > 0 and (need_gx or need_gv or (gvref is not None and has_vref)):
        sde_step_bwd_kernel[(n_chunks, B)](
            x, v, prev if has_diff else x, v_ref if has_vref else x, g_mean if g_mean is not None else x,
            g_ssq if has_diff else cx, g_klssq if has_vref else cx, cx, cv,
            gx if gx is not None else x, gv if gv is not None else v, gvref if gvref is not None else v,
            N,
            HAS_DIFF=has_diff, HAS_VREF=has_vref, HAS_GMEAN=g_mean is not None,
            NEED_GX=need_gx, NEED_GV=need_gv, NEED_GVREF=gvref is not None and has_vref,
            BLOCK=block, ITERS=iters, num_warps=4,
        )
    return gx, gv, gvref


def compile_specs():
    """(kernel, signature, constexprs) triples covering the variants the launchers use, for the sm_90 check."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        for noise in (NO_SAMPLE, SAMPLE, GIVEN):
            for has_vref in (False, True):
                sig = {
                    "x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "eps_ptr": "*fp32", "prev_ptr": "*fp32",
                    "vref_ptr": f"*{dt}", "mean_ptr": "*fp32", "ssq_ptr": "*fp32", "klssq_ptr": "*fp32",
                    "cx_ptr": "*fp32", "cv_ptr": "*fp32", "std_ptr": "*fp32", "N": "i32", "n_chunks": "i32",
                }
                specs.append((sde_step_fwd_kernel, sig,
                              {"NOISE": noise, "HAS_VREF": has_vref, "BLOCK": 1024, "ITERS": 4}))
        for has_diff, has_vref, has_gmean in ((True, True, True), (True, False, False), (False, True, False)):
            sig = {
                "x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "prev_ptr": "*fp32", "vref_ptr": f"*{dt}",
                "gmean_ptr": "*fp32", "gssq_ptr": "*fp32", "gklssq_ptr": "*fp32", "cx_ptr": "*fp32",
                "cv_ptr": "*fp32", "gx_ptr": f"*{dt}", "gv_ptr": f"*{dt}", "gvref_ptr": f"*{dt}", "N": "i32",
            }
            specs.append((sde_step_bwd_kernel, sig, {
                "HAS_DIFF": has_diff, "HAS_VREF": has_vref, "HAS_GMEAN": has_gmean, "NEED_GX": True,
                "NEED_GV": True, "NEED_GVREF": has_vref, "BLOCK": 1024, "ITERS": 4,
            }))
    return specs
