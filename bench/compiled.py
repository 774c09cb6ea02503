"""The compiled baseline: ``torch.compile`` of each op's plain-PyTorch formula (issue 20).

A performance-minded user's alternative to our kernels is not the eager reference but the same formula under
``torch.compile``. Each function below is the math of the op's ``*_ref`` in ``fastgrpo/ops`` without its
validation (checks, error messages, host syncs), written the way such a user would: float32 math on upcast
inputs, per-step constants as python floats, no data-dependent shapes. The benchmarks (``impl="compiled"``) run it
under ``torch.compile(fn, mode=MODE, fullgraph=True, dynamic=False)``:

* ``fullgraph=True``: a graph break would leave part of the formula eager, so it fails instead (a bug here);
* ``dynamic=False``: every benchmark shape gets its own static-shape graph, as a trainer with fixed shapes would;
* ``MODE``: ``"default"``, or ``FASTGRPO_BENCH_COMPILE_MODE`` (e.g. ``max-autotune-no-cudagraphs``); recorded as
  ``compile_mode`` in ``extra_info``, with the first call's time as ``compile_s`` (compilation, or loading it from
  inductor's on-disk cache when an earlier process compiled the same graph: then a fraction of a second).

`prepare` compiles and warms up each (function, shapes, dtypes, mode) once per process, outside the timed region,
and returns the zero-argument callable the harness times. Where compiling fails on a machine (no C++ compiler for
inductor's CPU backend, no Triton for its GPU one, a Python that dynamo does not support), the case skips with the
reason; the formula's own errors (and wrong results, which the benchmark's float64 check catches) fail.

Not compiled: the AEGPO whole-step benchmark (a transformer forward; bench/test_bench_round.py times the regional
compile of the whole model) and the ceilings (copy, GEMM).
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from fastgrpo.testing import assert_close as _assert_close, rel_err, tolerance
from harness import sync

MODE = os.environ.get("FASTGRPO_BENCH_COMPILE_MODE", "default")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# The float32 tolerance of the compiled baseline's check (against the float64 oracle, like every case). It is a
# baseline we time, not a kernel we ship: the check is there to catch a formula that computes something else
# (errors of 1e-3 and up), and inductor's CPU reductions are sequential per SIMD lane, so a mean over the 262,144
# elements of a FLUX latent differs from the oracle by ~2e-5 (measured), past the kernels' FP32_RTOL of 1e-5.
COMPILED_FP32_RTOL = 1e-4


# --------------------------------------------------------------------------------------------------- sde_step


def sde_coefficients(sigma: float, sigma_next: float, noise_level: float, sigma_max: float | None = None) -> dict:
    """Flow-GRPO's per-step constants in float64 python math (fastgrpo/ops/sde.py, module docstring): the
    transition ``mean = cx * x + cv * v`` with ``std = sd * sqrt(-dt)``, and the log-prob / KL factors."""
    dt = sigma_next - sigma
    guard = (sigma_max if sigma_max is not None else 0.5) if sigma == 1 else sigma
    sd = noise_level * math.sqrt(sigma / (1 - guard))
    std = sd * math.sqrt(-dt)
    return {"cx": 1 + sd**2 / (2 * sigma) * dt, "cv": (1 + sd**2 * (1 - sigma) / (2 * sigma)) * dt,
            "std": std, "inv_2var": 1 / (2 * std**2), "log_norm": math.log(std) + _LOG_SQRT_2PI,
            "inv_2sd2": 1 / (2 * sd**2)}  # KL, kl_convention="flow_grpo": (mean - mean_ref)^2 / (2 sd^2)


def sde_sample(x, v, noise, cx: float, cv: float, std: float, inv_2var: float, log_norm: float):
    """A rollout step (kind="flow_grpo"): (prev_sample, mean, log_prob), float32."""
    dims = tuple(range(1, x.ndim))
    mean = cx * x.float() + cv * v.float()
    prev = mean + std * noise.float()
    log_prob = (-((prev - mean) ** 2) * inv_2var - log_norm).mean(dim=dims)
    return prev, mean, log_prob


def sde_train(x, v, prev, v_ref, cx: float, cv: float, inv_2var: float, log_norm: float, inv_2sd2: float):
    """A training step (kind="flow_grpo", given prev_sample and v_ref): (mean, log_prob, kl), float32;
    ``mean - mean_ref = cv * (v - v_ref)`` as in the reference."""
    dims = tuple(range(1, x.ndim))
    vf = v.float()
    mean = cx * x.float() + cv * vf
    log_prob = (-((prev.float() - mean) ** 2) * inv_2var - log_norm).mean(dim=dims)
    kl = ((cv * (vf - v_ref.float())) ** 2).mean(dim=dims) * inv_2sd2
    return mean, log_prob, kl


# ------------------------------------------------------------------------------------- token_logprob_entropy


def token_logprob_entropy(logits, targets, temperature: float = 1.0, normalize: bool = False,
                          ignore_index: int = -100):
    """(logp, entropy) float32 [...]: log_softmax of the max-shifted logits over T, ``-sum p log p`` (0 where
    p = 0), the target's log-prob; ignored rows give 0 (token_logprob_entropy_ref)."""
    x = logits.float()
    logp_all = torch.log_softmax((x - x.amax(-1, keepdim=True).detach()) / temperature, dim=-1)
    finite = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))
    entropy = -(logp_all.exp() * finite).sum(-1)
    if normalize:
        entropy = entropy / math.log(logits.shape[-1])
    ignored = targets == ignore_index
    logp = logp_all.gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, 0.0, logp), torch.where(ignored, 0.0, entropy)


def eg_grpo_shaping(logits, targets, modality, advantages, temperature: float = 1.0, low_frac: float = 0.2,
                    high_frac: float = 0.5, bonus: float = 0.3):
    """EG-GRPO shaping, released rule, released bonus (eg_grpo_shaping_ref, with the sort-based masks of
    fastgrpo/ops/eg_grpo.py ``_torch_masks``): (logp, entropy, token_adv, low, high) [B, L]."""
    ignored = (modality == -1) | (targets == -100)
    targets = torch.where(ignored, -100, targets)
    modality = torch.where(ignored, -1, modality)
    logp, entropy = token_logprob_entropy(logits, targets, temperature, True, -100)
    entropy = entropy.detach()
    L = entropy.shape[1]
    low = torch.zeros_like(entropy, dtype=torch.bool)
    high = torch.zeros_like(low)
    for mod in (0, 1):  # text, image: per row, thresholds at positions among the modality's sorted entropies
        sel = modality == mod
        s = torch.where(sel, entropy, float("inf")).sort(dim=1).values
        n = sel.sum(dim=1)
        nf = n.to(torch.float64)
        if mod == 0:
            i_hi = n - torch.floor(high_frac * nf).long().clamp(min=1)
            i_lo = torch.minimum(n - 1, torch.floor(low_frac * nf).long().clamp(min=1))
        else:
            i_hi = torch.minimum(n - 1, torch.floor((1 - high_frac) * nf).long())
            i_lo = torch.minimum(n - 1, torch.floor(low_frac * nf).long())
        tau_hi = s.gather(1, i_hi.clamp(0, L - 1).unsqueeze(1))
        tau_lo = s.gather(1, i_lo.clamp(0, L - 1).unsqueeze(1))
        low = low | (sel & (entropy < tau_lo))
        high = high | (sel & (entropy > tau_hi))
    A = advantages.float().unsqueeze(1)
    b = torch.minimum(bonus * A.abs(), bonus * entropy) * high.float()
    token_adv = (A + b) * (1 - low.float()) * (modality != -1)
    return logp, entropy, token_adv, low, high


# ------------------------------------------------------------------------------------------------ ovf_select


def ovf_select(rewards, k: int):
    """(indices [P, k] ascending, variance [P]) float32: sort, the k + 1 candidates "j smallest + k - j largest"
    from prefix/suffix sums, the first best j (ovf_select_ref); the chosen positions by a gather (no boolean
    indexing, whose output shape the compiler cannot know)."""
    from fastgrpo.ops.ovf import ovf_scores

    r = rewards.float()
    G = r.shape[1]
    order, d, best = ovf_scores(r, k)
    i = torch.arange(k, device=r.device)
    pos = torch.where(i < best, i, G - k + i)  # the best j smallest, then the k - best largest: ascending
    indices = order.gather(1, pos).sort(dim=1).values
    picked = d.gather(1, pos)
    dev = picked - picked.mean(dim=1, keepdim=True)
    return indices, (dev * dev).mean(dim=1)


# ------------------------------------------------------------------------------- attention_with_text_entropy


def attention_with_text_entropy(q, k, v, text_start: int, text_len: int, layout: str = "bhsd"):
    """(out, text_entropy, lse, text_lse): ``out`` from SDPA (as the reference), the float32 statistics from the
    whole [B, H, S, S] logits at once (the reference loops over query chunks to bound its memory)."""
    qh, kh, vh = ((t if layout == "bhsd" else t.transpose(1, 2)) for t in (q, k, v))
    scale = qh.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    out = out if layout == "bhsd" else out.transpose(1, 2).contiguous()
    s = scale * (qh.float() @ kh.float().transpose(-1, -2))
    s_text = s[..., text_start:text_start + text_len]
    text_lse = torch.logsumexp(s_text, dim=-1)
    log_p = s_text - text_lse[..., None]
    return out, -(log_p.exp() * log_p).sum(-1), torch.logsumexp(s, dim=-1), text_lse


# ------------------------------------------------------------------------------------------ compile, warm up


def assert_close(actual, reference, *, name="output", baseline=None):
    """fastgrpo.testing.assert_close, with float32 outputs allowed `COMPILED_FP32_RTOL` (see there)."""
    if actual.dtype != torch.float32:
        return _assert_close(actual, reference, name=name, baseline=baseline)
    err, tol = rel_err(actual, reference), max(COMPILED_FP32_RTOL, tolerance(actual.dtype, reference, baseline))
    if not err <= tol:
        raise AssertionError(f"{name} (compiled): normwise relative error {err:.3e} > tolerance {tol:.3e}")


_COMPILED: dict = {}  # (function, mode) -> torch.compile wrapper
_READY: dict = {}  # (function, mode, argument signature) -> compile_s, or the reason it could not compile


def _raise_recompile_limit() -> None:
    """One static graph per benchmark shape and dtype: more than dynamo's default of 8 per function on a full GPU
    run (past it, dynamo stops compiling new shapes of the function)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


def _signature(args) -> tuple:
    """What makes dynamo compile a new graph: tensors' shapes, dtypes, devices and requires_grad, and the values of
    ints, bools and strings (floats are graph inputs, not constants: ``specialize_float=False``)."""
    return tuple((tuple(a.shape), a.dtype, a.device.type, a.requires_grad) if isinstance(a, torch.Tensor)
                 else "float" if isinstance(a, float) else a for a in args)


def _compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the compiler stack failing (skip) rather than the formula (fail): inductor's errors
    (C++/Triton codegen and builds) and dynamo's backend-compiler wrapper."""
    from torch._dynamo.exc import BackendCompilerFailed

    mod = type(exc).__module__ or ""
    return isinstance(exc, (BackendCompilerFailed, OSError)) or mod.startswith(("torch._inductor", "triton"))


def only_in_correctness_runs_at(benchmark, device: torch.device, this_case: bool, checked: str) -> None:
    """Under ``--benchmark-disable`` on CPU (CI: correctness only, 2 cores), skip the compiled case unless
    ``this_case`` (the one case, ``checked``, that stands for the others): each new shape or dtype is a new
    compilation (seconds each), and one per test checks the formula. Timed runs, and every run on CUDA, compile
    every case."""
    if not this_case and getattr(benchmark, "disabled", False) and device.type == "cpu":
        pytest.skip(f"correctness-only run on CPU (--benchmark-disable): the compiled formula is checked at "
                    f"{checked} (compile time); timed runs compile every case")


def prepare(benchmark, fn, *args, run=None):
    """``(callable, extra_info)`` for the benchmark: ``run(compiled_fn)`` (default: ``compiled_fn(*args)``) after
    compiling ``fn`` for these arguments' shapes and dtypes and two warm-up calls (none under
    ``--benchmark-disable``: nothing is timed there), or ``pytest.skip`` with the reason when this machine cannot
    compile it. Compiled once per process per (fn, shapes, dtypes, mode)."""
    run = run or (lambda f: f(*args))
    warmup = 0 if getattr(benchmark, "disabled", False) else 2
    key = (fn.__name__, MODE, _signature(args))
    if (fn, MODE) not in _COMPILED:
        _raise_recompile_limit()
        try:
            _COMPILED[fn, MODE] = torch.compile(fn, mode=MODE, fullgraph=True, dynamic=False)
        except RuntimeError as exc:  # e.g. "Dynamo is not supported on Python 3.x"
            _READY[key] = f"torch.compile is not available here: {exc}"
    compiled = _COMPILED.get((fn, MODE))
    if key not in _READY:
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        try:
            for i in range(1 + warmup):  # the first call compiles (forward, and backward when run asks for it)
                start = time.perf_counter()
                out = run(compiled)
                sync()
                del out
                if i == 0:
                    _READY[key] = time.perf_counter() - start
        except Exception as exc:
            if not _compile_failure(exc):
                _READY.pop(key, None)
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            _READY[key] = f"torch.compile(mode={MODE!r}) failed on this machine: {type(exc).__name__}: {first}"
        if not isinstance(_READY[key], str) and counters["stats"]["unique_graphs"] == graphs:
            raise AssertionError(f"torch.compile made no graph for {fn.__name__} at {key[2]}: the case would time "
                                 "eager code")
    ready = _READY[key]
    if isinstance(ready, str):
        pytest.skip(ready)
    return (lambda: run(compiled)), {"compile_mode": MODE, "compile_s": round(ready, 3),
                                     "compiled": f"torch.compile(bench/compiled.py:{fn.__name__}, mode={MODE!r}, "
                                                 "fullgraph=True, dynamic=False)"}
