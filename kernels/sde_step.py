"""Fused SDE step + Gaussian log-prob (+ KL) kernels: forward, finish, backward.

Every kind of step in DESIGN.md §3.1 is affine in the latent and the velocity, with per-sample coefficients:

    mean = cx[b] * x + cv[b] * v          prev = mean + std[b] * eps

so one elementwise kernel serves them all. The coefficients are computed inside the kernels (`_coefficients`, in
float64, once per program) from sigma and sigma_next, each given either as a float64 scalar argument (python float
sigmas: nothing on the device but the kernels) or as a [B] pointer with a stride (tensor sigmas; stride 0 for one
sigma shared by the batch). A sample whose sigmas are invalid (outside 0 <= sigma_next < sigma <= 1, sigma == 1
for flow_grpo without sigma_max, sigma_next == 0 for cps with a KL) gets NaN coefficients, hence NaN outputs: the
host validates every sigma it can see without a device sync (python floats and CPU tensors, with a ValueError);
sigmas that live on the GPU are checked here instead, and never give a silent wrong number.

Per call: `sde_step_fwd_kernel` (grid [n_chunks, B]) writes mean (and prev when it samples) and per-chunk partial
sums of squares into one buffer ``parts`` [n_parts, B, n_chunks] (the ssq rows first when there is a sample, then
the klssq rows when there is a v_ref),

    ssq[b, c]   = sum (prev - mean)^2                      (-> log-prob)
    klssq[b, c] = sum (cv[b] * (v - v_ref))^2 = sum (mean - mean_ref)^2   (-> KL)

then `sde_step_finish_kernel` (one program per sample) adds a sample's partials in chunk order in float64
(deterministic run to run) and writes log_prob, std and kl. Two launches in all. The backward kernel recomputes
``mean`` from x and v instead of saving it and takes the gradients of log_prob and kl directly (with their strides:
the gradient of a ``.sum()`` is an expanded tensor, no copy needed).

Host path (on a GPU a call is host-bound at the benchmark shapes: bench/test_bench_host.py times it with the
kernels stubbed): the grids, blocking and constexprs of each launch depend only on (B, N) and the variant, and are
planned once per such key (`_fwd_plan`, `_bwd_plan`, cached); per call the launchers allocate the outputs and pass
the tensors and the step's scalars. Inputs are taken in their own [B, ...] shape (contiguous), outputs are
allocated in it: no reshape on the way in or out.

Bytes moved (forward, sampling with given noise, fp32): read x, v, eps; write prev, mean = 5 * 4 * numel.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

# NOISE modes of the forward kernel.
NO_SAMPLE = 0  # ODE: prev = mean, no log-prob
SAMPLE = 1  # prev = mean + std * eps, eps read from memory
GIVEN = 2  # prev read from memory (log-prob of a given sample)

# KIND constexpr of every kernel.
KIND_IDS = {"flow_grpo": 0, "dance": 1, "cps": 2, "ode": 3}

LOG_SQRT_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))


@triton.jit
def _sigma(ptr, val, stride, b, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        s = tl.load(ptr + b * stride).to(tl.float64)
    else:
        # Through tl.full: Triton's interpreter hands python floats to the kernel as float32 scalars; compiled, the
        # tl.float64 annotation already makes them float64 arguments.
        s = tl.full([], val, tl.float64)
    return s


@triton.jit
def _coefficients(s, sn, noise_level, sigma_max, sin_a,
                  KIND: tl.constexpr, KL_EXACT: tl.constexpr, HAS_SIGMA_MAX: tl.constexpr, HAS_VREF: tl.constexpr):
    """float64 (cx, cv, std, kl_d) of one sample; NaN when its sigmas are invalid."""
    noise_level = tl.full([], noise_level, tl.float64)
    sigma_max = tl.full([], sigma_max, tl.float64)
    sin_a = tl.full([], sin_a, tl.float64)
    dt = sn - s
    ok = (s <= 1.0) & (sn >= 0.0) & (sn < s)
    if KIND == 0 or KIND == 1:
        if KIND == 0:
            if HAS_SIGMA_MAX:
                guard = tl.where(s == 1.0, sigma_max, s)
            else:
                ok = ok & (s != 1.0)
                guard = tl.where(s == 1.0, 0.5, s)
            sd = noise_level * tl.sqrt(s / (1.0 - guard))
        else:
            sd = noise_level + 0.0 * s
        sd2 = sd * sd
        cx = 1.0 + sd2 * dt / (2.0 * s)
        cv = (1.0 + sd2 * (1.0 - s) / (2.0 * s)) * dt
        std = sd * tl.sqrt(tl.maximum(-dt, 0.0))
        if KL_EXACT:
            kl_d = std
        else:
            kl_d = sd
    elif KIND == 2:
        std = sn * sin_a
        c = tl.sqrt(tl.maximum(sn * sn - std * std, 0.0))
        cx = (1.0 - sn) + c  # x0*(1-sn) + x1*c with x0 = x - s*v, x1 = x + (1-s)*v
        cv = -s * (1.0 - sn) + (1.0 - s) * c
        kl_d = std
        if HAS_VREF:
            ok = ok & (sn != 0.0)
    else:
        cx = 1.0 + 0.0 * s
        cv = dt
        std = 0.0 * s
        kl_d = 1.0 + 0.0 * s
    # NaN as 0/0 (float64), not a NaN constexpr global: Triton re-checks globals on every cached launch and a NaN
    # never equals itself ("Global variable NAN has changed"); tests/test_compile_gpu_target.py guards this.
    zero = 0.0 * s
    nan = zero / zero
    cx = tl.where(ok, cx, nan)
    cv = tl.where(ok, cv, nan)
    std = tl.where(ok, std, nan)
    kl_d = tl.where(ok, kl_d, nan)
    return cx, cv, std, kl_d


@triton.jit
def sde_step_fwd_kernel(
    x_ptr, v_ptr, eps_ptr, prev_ptr, vref_ptr, mean_ptr, parts_ptr,
    s_ptr, sn_ptr, s_val: tl.float64, sn_val: tl.float64, s_stride, sn_stride,
    noise_level: tl.float64, sigma_max: tl.float64, sin_a: tl.float64,
    N, n_chunks,
    KIND: tl.constexpr, KL_EXACT: tl.constexpr, HAS_SIGMA_MAX: tl.constexpr, S_PTR: tl.constexpr,
    SN_PTR: tl.constexpr, NOISE: tl.constexpr, HAS_VREF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * N
    s = _sigma(s_ptr, s_val, s_stride, b, S_PTR)
    sn = _sigma(sn_ptr, sn_val, sn_stride, b, SN_PTR)
    cx64, cv64, std64, _kl_d = _coefficients(s, sn, noise_level, sigma_max, sin_a, KIND, KL_EXACT, HAS_SIGMA_MAX,
                                             HAS_VREF)
    cx = cx64.to(tl.float32)
    cv = cv64.to(tl.float32)
    std = std64.to(tl.float32)
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
    # parts [n_parts, B, n_chunks]: the ssq rows (with a sample), then the klssq rows (with v_ref)
    if NOISE != 0:
        tl.store(parts_ptr + b * n_chunks + chunk, tl.sum(ssq, 0))
    if HAS_VREF:
        kl_parts = parts_ptr
        if NOISE != 0:
            kl_parts += tl.num_programs(1) * n_chunks  # past the B ssq rows
        tl.store(kl_parts + b * n_chunks + chunk, tl.sum(klssq, 0))


@triton.jit
def sde_step_finish_kernel(
    parts_ptr, log_prob_ptr, std_ptr, kl_ptr,
    s_ptr, sn_ptr, s_val: tl.float64, sn_val: tl.float64, s_stride, sn_stride,
    noise_level: tl.float64, sigma_max: tl.float64, sin_a: tl.float64,
    N, n_chunks,
    KIND: tl.constexpr, KL_EXACT: tl.constexpr, HAS_SIGMA_MAX: tl.constexpr, S_PTR: tl.constexpr,
    SN_PTR: tl.constexpr, HAS_SAMPLE: tl.constexpr, HAS_VREF: tl.constexpr, CBLOCK: tl.constexpr,
):
    # One program per sample: the chunk partials in a fixed order (float64), then the [B] epilogue.
    b = tl.program_id(0)
    s = _sigma(s_ptr, s_val, s_stride, b, S_PTR)
    sn = _sigma(sn_ptr, sn_val, sn_stride, b, SN_PTR)
    cx, cv, std, kl_d = _coefficients(s, sn, noise_level, sigma_max, sin_a, KIND, KL_EXACT, HAS_SIGMA_MAX,
                                      HAS_VREF)
    n = N.to(tl.float64)
    tl.store(std_ptr + b, std.to(tl.float32))
    lp = 0.0 * std  # kind="ode": no density; NaN with invalid sigmas
    if HAS_SAMPLE:
        acc = tl.zeros([CBLOCK], dtype=tl.float64)
        for c0 in range(0, n_chunks, CBLOCK):
            offs = c0 + tl.arange(0, CBLOCK)
            acc += tl.load(parts_ptr + b * n_chunks + offs, mask=offs < n_chunks, other=0.0).to(tl.float64)
        ssq = tl.sum(acc, 0)
        if KIND == 2:
            lp = -ssq / n + 0.0 * std
        else:
            lp = -ssq / (2.0 * n * std * std) - tl.log(std) - LOG_SQRT_2PI
    tl.store(log_prob_ptr + b, lp.to(tl.float32))
    if HAS_VREF:
        kl_parts = parts_ptr
        if HAS_SAMPLE:
            kl_parts += tl.num_programs(0) * n_chunks  # past the B ssq rows
        acck = tl.zeros([CBLOCK], dtype=tl.float64)
        for c0 in range(0, n_chunks, CBLOCK):
            offs = c0 + tl.arange(0, CBLOCK)
            acck += tl.load(kl_parts + b * n_chunks + offs, mask=offs < n_chunks, other=0.0).to(tl.float64)
        kl = tl.sum(acck, 0) / (2.0 * n * kl_d * kl_d)
        tl.store(kl_ptr + b, kl.to(tl.float32))


@triton.jit
def sde_step_bwd_kernel(
    x_ptr, v_ptr, prev_ptr, vref_ptr, gmean_ptr, glp_ptr, gkl_ptr, glp_stride, gkl_stride,
    gx_ptr, gv_ptr, gvref_ptr,
    s_ptr, sn_ptr, s_val: tl.float64, sn_val: tl.float64, s_stride, sn_stride,
    noise_level: tl.float64, sigma_max: tl.float64, sin_a: tl.float64,
    N,
    KIND: tl.constexpr, KL_EXACT: tl.constexpr, HAS_SIGMA_MAX: tl.constexpr, S_PTR: tl.constexpr,
    SN_PTR: tl.constexpr,
    HAS_DIFF: tl.constexpr, HAS_VREF: tl.constexpr, HAS_GMEAN: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_GV: tl.constexpr, NEED_GVREF: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    # d mean/dx = cx, d mean/dv = cv; d ssq/d mean = -2 (prev - mean); d klssq/dv = 2 cv^2 (v - v_ref) = -d/dv_ref;
    # d log_prob/d ssq = -1/(2 N std^2) (cps: -1/N); d kl/d klssq = 1/(2 N kl_d^2).
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * N
    s = _sigma(s_ptr, s_val, s_stride, b, S_PTR)
    sn = _sigma(sn_ptr, sn_val, sn_stride, b, SN_PTR)
    cx64, cv64, std64, kl_d64 = _coefficients(s, sn, noise_level, sigma_max, sin_a, KIND, KL_EXACT,
                                              HAS_SIGMA_MAX, HAS_VREF)
    n = N.to(tl.float64)
    cx = cx64.to(tl.float32)
    cv = cv64.to(tl.float32)
    gssq = 0.0
    gkl = 0.0
    if HAS_DIFF:
        glp = tl.load(glp_ptr + b * glp_stride).to(tl.float64)
        if KIND == 2:
            gssq = (-glp / n).to(tl.float32)
        else:
            gssq = (-glp / (2.0 * n * std64 * std64)).to(tl.float32)
    if HAS_VREF:
        gkl = (tl.load(gkl_ptr + b * gkl_stride).to(tl.float64) / (2.0 * n * kl_d64 * kl_d64)).to(tl.float32)
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
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            prev = tl.load(prev_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            g += -2.0 * gssq * (prev - (cx * x + cv * v))
        if NEED_GX:
            tl.store(gx_ptr + base + offs, (cx * g).to(gx_ptr.dtype.element_ty), mask=m)
        gv = cv * g
        if HAS_VREF:
            vr = tl.load(vref_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            gk = 2.0 * gkl * cv * cv * (v - vr)
            gv += gk
            if NEED_GVREF:
                tl.store(gvref_ptr + base + offs, (-gk).to(gvref_ptr.dtype.element_ty), mask=m)
        if NEED_GV:
            tl.store(gv_ptr + base + offs, gv.to(gv_ptr.dtype.element_ty), mask=m)


def _blocking(n: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, n_chunks): each program covers BLOCK*ITERS elements of one sample."""
    block = min(1024, next_power_of_2(max(n, 16)))
    iters = max(1, min(4, cdiv(n, block)))
    return block, iters, cdiv(n, block * iters)


def _variant(sched) -> tuple:
    """The constexprs a `fastgrpo.ops.sde._Schedule` fixes: (KIND, KL_EXACT, HAS_SIGMA_MAX, S_PTR, SN_PTR)."""
    return (KIND_IDS[sched.kind], sched.kl_exact, sched.has_sigma_max, sched.s_tensor is not None,
            sched.sn_tensor is not None)


def _schedule_args(sched, like) -> tuple:
    """The runtime arguments of a `fastgrpo.ops.sde._Schedule` (``like`` stands in for an absent sigma tensor)."""
    s_t, sn_t = sched.s_tensor, sched.sn_tensor
    return (s_t if s_t is not None else like, sn_t if sn_t is not None else like, sched.s, sched.sn,
            sched.s_stride, sched.sn_stride, sched.noise_level, sched.sigma_max, sched.sin_a)


def _consts(variant) -> dict:
    kind, kl_exact, has_max, s_ptr, sn_ptr = variant
    return dict(KIND=kind, KL_EXACT=kl_exact, HAS_SIGMA_MAX=has_max, S_PTR=s_ptr, SN_PTR=sn_ptr)


class _FwdPlan(NamedTuple):
    grid: tuple
    kw: dict  # constexprs and launch options of sde_step_fwd_kernel
    finish_grid: tuple
    finish_kw: dict
    n_chunks: int
    parts_shape: Optional[tuple]  # None: no partial sums (an ODE step without v_ref)


@functools.lru_cache(maxsize=256)
def _fwd_plan(B: int, N: int, variant: tuple, mode: int, has_vref: bool) -> _FwdPlan:
    """Grids, blocking and constexprs of the forward's two launches for one (B, N) and variant (B > 0)."""
    block, iters, n_chunks = _blocking(N)
    consts = _consts(variant)
    n_parts = (mode != NO_SAMPLE) + has_vref
    return _FwdPlan(
        (n_chunks, B), dict(NOISE=mode, HAS_VREF=has_vref, BLOCK=block, ITERS=iters, num_warps=4, **consts),
        (B,), dict(HAS_SAMPLE=mode != NO_SAMPLE, HAS_VREF=has_vref, CBLOCK=min(128, next_power_of_2(n_chunks)),
                   num_warps=1, **consts),
        n_chunks, (n_parts, B, n_chunks) if n_parts else None)


@functools.lru_cache(maxsize=256)
def _bwd_plan(B: int, N: int, variant: tuple, has_diff: bool, has_vref: bool, has_gmean: bool, need_gx: bool,
              need_gv: bool, need_gvref: bool) -> tuple:
    """(grid, constexprs and launch options) of the backward launch for one (B, N) and variant (B > 0)."""
    block, iters, n_chunks = _blocking(N)
    return (n_chunks, B), dict(HAS_DIFF=has_diff, HAS_VREF=has_vref, HAS_GMEAN=has_gmean, NEED_GX=need_gx,
                               NEED_GV=need_gv, NEED_GVREF=need_gvref, BLOCK=block, ITERS=iters, num_warps=4,
                               **_consts(variant))


def sde_step_fwd(x, v, sched, *, eps=None, prev=None, v_ref=None):
    """Forward + finish (2 launches). x, v, eps, prev, v_ref: contiguous [B, ...] of one shape; ``sched``: the step's
    sigmas and constants (`fastgrpo.ops.sde._Schedule`).

    Returns (new prev or None, mean, log_prob [B], std [B], kl [B] or None), all float32; mean and prev in x's
    shape.
    """
    shape = x.shape
    B = shape[0]
    mode = NO_SAMPLE if sched.kind == "ode" else SAMPLE if eps is not None else GIVEN if prev is not None \
        else NO_SAMPLE
    dev = x.device
    mean = torch.empty(shape, dtype=torch.float32, device=dev)
    new_prev = torch.empty(shape, dtype=torch.float32, device=dev) if mode == SAMPLE else None
    log_prob = torch.empty(B, dtype=torch.float32, device=dev)
    std = torch.empty(B, dtype=torch.float32, device=dev)
    has_vref = v_ref is not None
    kl = torch.empty(B, dtype=torch.float32, device=dev) if has_vref else None
    if B > 0:
        N = x.numel() // B
        plan = _fwd_plan(B, N, _variant(sched), mode, has_vref)
        parts = torch.empty(plan.parts_shape, dtype=torch.float32, device=dev) if plan.parts_shape else mean
        sargs = _schedule_args(sched, mean)
        sde_step_fwd_kernel[plan.grid](
            x, v, eps if eps is not None else x, new_prev if mode == SAMPLE else (prev if prev is not None else mean),
            v_ref if has_vref else x, mean, parts, *sargs, N, plan.n_chunks, **plan.kw,
        )
        sde_step_finish_kernel[plan.finish_grid](
            parts, log_prob, std, kl if kl is not None else log_prob, *sargs, N, plan.n_chunks, **plan.finish_kw,
        )
    return new_prev, mean, log_prob, std, kl


def sde_step_bwd(x, v, sched, *, prev=None, v_ref=None, g_mean=None, g_log_prob=None, g_kl=None,
                 need_gx=True, need_gv=True, need_gvref=False):
    """Launch the backward kernel (1 launch). x, v, prev, v_ref, g_mean: contiguous [B, ...] of one shape;
    g_log_prob, g_kl: [B] float32, any stride (None when unused). Returns (g_x or None, g_v or None, g_vref or None)
    in the inputs' dtypes and shapes."""
    B = x.shape[0]
    has_diff = g_log_prob is not None and prev is not None and sched.kind != "ode"
    has_vref = g_kl is not None and v_ref is not None
    gx = torch.empty_like(x) if need_gx else None
    gv = torch.empty_like(v) if need_gv else None
    gvref = None
    if need_gvref and v_ref is not None:
        # Without a KL gradient, v_ref does not influence anything that was differentiated.
        gvref = torch.empty_like(v_ref) if has_vref else torch.zeros_like(v_ref)
    write_gvref = gvref is not None and has_vref
    if B > 0 and (need_gx or need_gv or write_gvref):
        N = x.numel() // B
        grid, kw = _bwd_plan(B, N, _variant(sched), has_diff, has_vref, g_mean is not None, need_gx, need_gv,
                             write_gvref)
        sde_step_bwd_kernel[grid](
            x, v, prev if has_diff else x, v_ref if has_vref else x, g_mean if g_mean is not None else x,
            g_log_prob if has_diff else x, g_kl if has_vref else x,
            g_log_prob.stride(0) if has_diff else 0, g_kl.stride(0) if has_vref else 0,
            gx if gx is not None else x, gv if gv is not None else v, gvref if write_gvref else v,
            *_schedule_args(sched, x), N, **kw,
        )
    return gx, gv, gvref


_SCHEDULE_SIGNATURE = {"s_val": "fp64", "sn_val": "fp64", "s_stride": "i32", "sn_stride": "i32",
                       "noise_level": "fp64", "sigma_max": "fp64", "sin_a": "fp64"}


def _fwd_signature(dt: str, sdt: str, eps: str = "*fp32") -> dict:
    """sde_step_fwd_kernel's runtime arguments (the sm_90 check): inputs of Triton type ``dt``, sigma pointers of
    ``sdt``, the noise pointer's type ``eps`` (x stands in for an absent one)."""
    return {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "eps_ptr": eps, "prev_ptr": "*fp32", "vref_ptr": f"*{dt}",
            "mean_ptr": "*fp32", "parts_ptr": "*fp32", "s_ptr": f"*{sdt}", "sn_ptr": f"*{sdt}",
            **_SCHEDULE_SIGNATURE, "N": "i32", "n_chunks": "i32"}


def _finish_signature(sdt: str) -> dict:
    return {"parts_ptr": "*fp32", "log_prob_ptr": "*fp32", "std_ptr": "*fp32", "kl_ptr": "*fp32", "s_ptr": f"*{sdt}",
            "sn_ptr": f"*{sdt}", **_SCHEDULE_SIGNATURE, "N": "i32", "n_chunks": "i32"}


def _bwd_signature(dt: str, sdt: str, gmean: str = "*fp32") -> dict:
    return {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "prev_ptr": "*fp32", "vref_ptr": f"*{dt}", "gmean_ptr": gmean,
            "glp_ptr": "*fp32", "gkl_ptr": "*fp32", "glp_stride": "i32", "gkl_stride": "i32", "gx_ptr": f"*{dt}",
            "gv_ptr": f"*{dt}", "gvref_ptr": f"*{dt}", "s_ptr": f"*{sdt}", "sn_ptr": f"*{sdt}",
            **_SCHEDULE_SIGNATURE, "N": "i32"}


def compile_specs():
    """(kernel, signature, constexprs) triples covering the variants the launchers use, for the sm_90 check:
    every kind (with both KL conventions where they differ), scalar and per-sample (fp32/fp64) sigmas, each
    noise mode with and without v_ref, three input dtypes."""
    variants = []  # (KIND, KL_EXACT, HAS_SIGMA_MAX, S_PTR, SN_PTR, sigma dtype)
    for kind in KIND_IDS.values():
        for kl_exact in ((False, True) if kind in (0, 1) else (False,)):
            variants.append((kind, kl_exact, True, False, False, "fp64"))
        variants.append((kind, False, kind != 0, True, True, "fp32"))
        variants.append((kind, False, True, True, False, "fp64"))
    specs = []
    for kind, kl_exact, has_max, s_ptr, sn_ptr, sdt in variants:
        consts = {"KIND": kind, "KL_EXACT": kl_exact, "HAS_SIGMA_MAX": has_max, "S_PTR": s_ptr, "SN_PTR": sn_ptr}
        modes = (NO_SAMPLE,) if kind == 3 else (SAMPLE, GIVEN)
        vrefs = (False,) if kind == 3 else (False, True)
        dts = ("fp32", "bf16", "fp16") if (s_ptr, sn_ptr, kl_exact) == (False, False, False) else ("bf16",)
        for dt in dts:
            for noise in modes:
                for has_vref in vrefs:
                    specs.append((sde_step_fwd_kernel, _fwd_signature(dt, sdt), {
                        **consts, "NOISE": noise, "HAS_VREF": has_vref, "BLOCK": 1024, "ITERS": 4}))
            bwd_cases = ((False, False, True),) if kind == 3 else (
                (True, True, True), (True, False, False), (False, True, False))
            for has_diff, has_vref, has_gmean in bwd_cases:
                specs.append((sde_step_bwd_kernel, _bwd_signature(dt, sdt), {
                    **consts, "HAS_DIFF": has_diff, "HAS_VREF": has_vref, "HAS_GMEAN": has_gmean, "NEED_GX": True,
                    "NEED_GV": True, "NEED_GVREF": has_vref, "BLOCK": 1024, "ITERS": 4,
                }))
        for has_sample in ((False,) if kind == 3 else (True,)):
            for has_vref in vrefs:
                specs.append((sde_step_finish_kernel, _finish_signature(sdt), {
                    **consts, "HAS_SAMPLE": has_sample, "HAS_VREF": has_vref, "CBLOCK": 128}))
    return specs + _launched_specs()


def _launched_specs() -> list:
    """bench/test_bench_sde.py's flow_grpo cases (bf16, scalar sigmas, SD3.5-512's N = 65,536 per sample) as their
    launches compile them: a rollout step (noise drawn) and a training step (prev given, v_ref, gradient to v
    only), with the launches' warps and the arguments found divisible by 16 there (pointers, N, the chunk count,
    the zero strides of the scalar sigmas and of the loss's expanded gradients)."""
    variant = (KIND_IDS["flow_grpo"], False, False, False, False)  # `_variant`: scalar sigmas, no sigma_max
    specs = []

    def launched(kernel, signature, kw, divisible, ptx_has=()):  # a plan's kw: constexprs and num_warps
        consts = {k: v for k, v in kw.items() if k != "num_warps"}
        specs.append((kernel, signature, consts, {"num_warps": kw["num_warps"], "divisible": ("*", *divisible),
                                                  "ptx_has": ptx_has}))

    ints = ("N", "n_chunks", "s_stride", "sn_stride")
    streaming = ("ld.global.v4", "st.global.v4")
    for noise, has_vref in ((SAMPLE, False), (GIVEN, True)):
        plan = _fwd_plan(8, 65536, variant, noise, has_vref)
        # the sigma pointers' stand-in is the mean buffer; x stands in for an absent eps, the drawn noise is float32
        launched(sde_step_fwd_kernel, _fwd_signature("bf16", "fp32", "*fp32" if noise == SAMPLE else "*bf16"),
                 plan.kw, ints, streaming)
        launched(sde_step_finish_kernel, _finish_signature("fp32"), plan.finish_kw, ints)
    # g_mean absent and the sigma pointers' stand-in: x; the gradients of log_prob and kl come from the loss's
    # sums as expanded ones, stride 0 (divisible by 16, like the sigma strides)
    _, kw = _bwd_plan(8, 65536, variant, True, True, False, False, True, False)
    launched(sde_step_bwd_kernel, _bwd_signature("bf16", "bf16", "*bf16"), kw,
             ("N", "s_stride", "sn_stride", "glp_stride", "gkl_stride"), streaming)
    return specs
