"""Per-token log-prob of the target and entropy of the next-token distribution, from autoregressive logits.

For one token row of V logits and temperature T (DESIGN.md §3.2), with ``z = logits / T`` and ``p = softmax(z)``::

    logp    = log_softmax(z)[target] = z[target] - logsumexp(z)
    entropy = -sum_j p_j log p_j = logsumexp(z) - E_p[z]            (nats; / ln V when normalize=True)

``normalize=True`` gives EG-GRPO's normalised entropy ``H / log V`` (EG-GRPO, "From Broad Exploration to Stable
Synthesis", §5.3; minebetter/EG-GRPO). Both outputs are differentiable::

    d logp / d logits    = (onehot(target) - p) / T
    d entropy / d logits = -p * (z - E_p[z]) / T          (times 1/ln V when normalized)

The reference (`token_logprob_entropy_ref`) is the usual eager computation that TRL's and EG-GRPO's trainers run
(log_softmax, softmax * log_softmax, gather), which materialises [rows, V] intermediates in float32. The fused
paths (Triton, ``fastgrpo.kernels.token_entropy``; on CPU the C++ extension, ``csrc/token_entropy.cpp``) read the
logits once with an online max / sum / sum(p*z) in float32 starting from -inf, save three float32 numbers per
row, and recompute p in the backward pass.

Decisions where DESIGN.md is silent (written down here, as it asks):

* ``logp`` and ``entropy`` are float32 whatever the logits' dtype (the statistics are accumulated in float32;
  returning bf16 would throw that away). The gradient w.r.t. ``logits`` has the logits' dtype.
* Rows whose target equals ``ignore_index`` give ``logp = 0`` *and* ``entropy = 0`` and no gradient to their
  logits; the fused path does not read their logits at all (padding and prompt rows cost no bandwidth). This
  follows ``torch.nn.functional.cross_entropy(ignore_index=...)``.
* Logits equal to -inf (a masked vocabulary) are allowed: they get p = 0 and add nothing to the entropy. A row
  whose logits are all -inf has no distribution and gives NaN, like ``torch.log_softmax``.
* ``targets`` must lie in [0, V) or equal ``ignore_index``. The Triton path checks this in its kernel (an
  out-of-range target is never read) and the host reads the flag once, after the kernel is queued: one launch and
  one small device-to-host read per call, no sync before the work. The C++ and torch paths check on the host
  before the call (CPU tensors: no device to wait for). All raise the same ValueError. ``validate=False`` (for
  training loops, whose targets are their own samples) drops that read: the call then never waits for the device,
  and an out-of-range target's row gets NaN logp and entropy and no gradient (Triton, torch; C++ still raises).
  A silent clamp or a 0 would train on a wrong number; a NaN stops the trainers at their loss check.
* ``temperature`` must lie in [1e-4, 1e4] (``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``) on every impl, else
  ValueError naming it (issue 14: 1e-39 gave NaN on cpp/triton, 1e300 on triton, where torch returned numbers).
  The same range holds for `eg_grpo_shaping`'s temperature.
* A NaN logit makes its row's ``logp`` and ``entropy`` NaN on every impl (as ``torch.log_softmax``); the C++
  path used to skip it in its max and return logp = +inf.
* The Triton forward is one launch (one program per row, looping over V); the earlier chunk-merge kernel is gone.
"""
from __future__ import annotations

import math

import torch

from ._backend import check_float, check_same_device, kernel_module, resolve_impl

# The temperatures every impl accepts: outside, 1/T in float32 overflows (T = 1e-39: inf) or underflows
# (T = 1e300: 0) and the fused kernels return NaN; sampling temperatures in use are within [0.1, 10].
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4


def _check_token_inputs(logits, targets, temperature, ignore_index, check_range=True):
    """Validate `token_logprob_entropy`'s inputs. ``check_range``: also the target range on the host (one
    device sync); the Triton path leaves it to an in-kernel flag read after the call's kernels are queued."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating tensor [..., V] (float32, float16 or bfloat16), got {got}")
    check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool \
            or targets.is_complex():
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer (int64) tensor of shape {tuple(logits.shape[:-1])}, got {got}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary dim), "
                         f"got {tuple(targets.shape)}")
    check_same_device([("logits", logits), ("targets", targets)])
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a float in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (the fused "
                         f"kernels scale by 1/T in float32), got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    V = logits.shape[-1]
    if check_range and targets.numel() and bool((((targets < 0) | (targets >= V)) & (targets != ignore_index)).any()):
        _raise_target_range(V, ignore_index)


def _raise_target_range(V, ignore_index):
    raise ValueError(f"targets must lie in [0, {V}) (the vocabulary of logits) or equal ignore_index={ignore_index}")


# ----------------------------------------------------------------------------------------------- reference


def token_logprob_entropy_ref(logits, targets, *, temperature=1.0, normalize=False, ignore_index=-100):
    """Plain-PyTorch twin of `token_logprob_entropy` (test oracle and benchmark baseline).

    The eager computation of TRL / EG-GRPO trainers: ``log_softmax``, ``softmax * log_softmax`` summed over V,
    ``gather`` of the target. Runs in float32 (float64 for float64 logits, the oracle) and materialises [..., V]
    intermediates; differentiable through torch autograd.
    """
    _check_token_inputs(logits, targets, temperature, ignore_index)
    return _token_ref(logits, targets, temperature, normalize, ignore_index)


def _token_ref(logits, targets, temperature, normalize, ignore_index):
    """Body of `token_logprob_entropy_ref` on validated inputs (targets in range or ignored)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(dtype)
    # Shift by the (detached) row max before dividing by T: softmax is shift-invariant, and x - max is exact in
    # float32 where x / T would round at the scale of the logits (rows of -1e4 with T != 1).
    logp_all = torch.log_softmax((x - x.amax(-1, keepdim=True).detach()) / temperature, dim=-1)
    # p log p is 0 where p = 0 (logits of -inf); keep that out of autograd's 0 * inf.
    finite = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))
    entropy = -(logp_all.exp() * finite).sum(-1)
    if normalize:
        entropy = entropy / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else entropy * 0
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy)


# ----------------------------------------------------------------------------------------------- fused path


class _TokenLogprobEntropyFn(torch.autograd.Function):
    """Forward statistics in one pass over V; backward recomputes p from the saved per-row statistics."""

    @staticmethod
    def forward(ctx, logits3, targets, inv_t, ignore_index, ent_scale, backend, modality, flag):
        launch = kernel_module(backend, "fastgrpo.kernels.token_entropy")
        if backend == "triton":  # one launch; out-of-range targets set flag[0]; modality -1 rows are ignored
            logp, ent, rowmax, logs, mean_rel, targets = launch.token_stats_fwd(
                logits3, targets, inv_t, ignore_index, ent_scale, modality=modality, flag=flag)
        else:
            logp, ent, rowmax, logs, mean_rel = launch.token_stats_fwd(logits3, targets, inv_t, ignore_index,
                                                                       ent_scale)
        ctx.save_for_backward(logits3, targets, rowmax, logs, mean_rel)
        ctx.consts = (inv_t, ignore_index, ent_scale)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(targets)
        return logp, ent, targets

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_targets=None):
        token_stats_bwd = kernel_module(ctx.backend, "fastgrpo.kernels.token_entropy").token_stats_bwd
        logits3, targets, rowmax, logs, mean_rel = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None, None, None, None
        prep = lambda g: g.float().contiguous() if g is not None else None  # noqa: E731
        dlogits = token_stats_bwd(logits3, targets, rowmax, logs, mean_rel, prep(g_logp), prep(g_ent), *ctx.consts)
        return dlogits, None, None, None, None, None, None, None


def _as_rows(logits):
    """View logits [..., V] as [P, L, V] without copying when possible (unit stride along V is required)."""
    if logits.ndim == 3 and logits.stride(-1) == 1:
        return logits
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    L = lead[-1] if len(lead) else 1
    P = math.prod(lead[:-1]) if len(lead) > 1 else 1
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    try:
        return logits.view(P, L, V)
    except RuntimeError:  # leading dims not collapsible into one: one copy
        return logits.reshape(P, L, V)


def token_logprob_entropy(logits, targets, *, temperature=1.0, normalize=False, ignore_index=-100, impl="auto",
                          validate=True):
    """Log-prob of each target token and entropy of each next-token distribution, fused over the vocabulary.

    Args:
        logits: [..., V] float32/float16/bfloat16 (e.g. [B, L, V] from a causal LM, already shifted so that
            ``logits[b, t]`` predicts ``targets[b, t]``). Differentiable. Any strides along the leading dims
            (a slice ``out.logits[:, p-1:-1]`` is read in place); unit stride along V is needed, else one copy.
        targets: [...] int64, the sampled tokens, in [0, V) or equal to ``ignore_index``.
        temperature: the sampling temperature T (> 0); logits are divided by it.
        normalize: divide the entropy by ln V (EG-GRPO's normalised entropy, in [0, 1]).
        ignore_index: target value marking rows to skip (logp = entropy = 0, zero gradient, logits not read).
        impl: "auto" | "triton" | "torch" | "cpp" (see ``fastgrpo.ops._backend``).
        validate: True (default): a target outside [0, V) that is not ``ignore_index`` raises ValueError, which
            on CUDA costs one small device-to-host read at the end of the call (the host waits for the kernel).
            False: the call never reads a device value, so a training loop runs ahead of the GPU; such a target's
            ``logp`` and ``entropy`` are NaN and its logits get no gradient (never a finite wrong number: a loss
            over them is NaN, which the trainers' finiteness check stops on). The C++ path (CPU tensors, where
            the check costs no wait) raises either way.

    Returns:
        (logp, entropy): float32 tensors of shape [...]; both differentiable w.r.t. ``logits``.

    Example:
        >>> logits = model(input_ids).logits[:, prompt_len - 1:-1]      # [B, L, V]
        >>> logp, ent = token_logprob_entropy(logits, completion_ids, temperature=1.0)
    """
    _check_token_inputs(logits, targets, temperature, ignore_index, check_range=False)
    backend = resolve_impl(impl, logits.device, has_cpp=True)
    # The target range: the C++ binding checks it (same ValueError) before its kernel reads anything; Triton sets a
    # flag read below; the torch path checks it here.
    if backend == "torch":
        return _token_torch(logits, targets, temperature, normalize, ignore_index, validate)
    flag = None
    if backend == "triton":
        flag = torch.zeros(1, dtype=torch.int32, device=logits.device) if validate else scratch_flags(logits.device)
    logp, ent, _ = _fused(logits, targets, temperature, normalize, ignore_index, backend, flag=flag)
    if validate and flag is not None and flag.item():  # the one host read, after the kernel is queued
        _raise_target_range(logits.shape[-1], ignore_index)
    return logp, ent


def _token_torch(logits, targets, temperature, normalize, ignore_index, validate):
    """The torch path of `token_logprob_entropy`: the reference, after the range check (one device sync on CUDA)
    or, with ``validate=False``, with NaN on the out-of-range rows (no host read)."""
    V = logits.shape[-1]
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if validate:
        if targets.numel() and bool(bad.any()):
            _raise_target_range(V, ignore_index)
        logp, ent = _token_ref(logits, targets, temperature, normalize, ignore_index)
        return logp.float(), ent.float()
    safe = torch.where(bad, torch.full_like(targets, ignore_index), targets)
    logp, ent = _token_ref(logits, safe, temperature, normalize, ignore_index)
    nan = torch.full((), float("nan"), dtype=logp.dtype, device=logp.device)
    return torch.where(bad, nan, logp).float(), torch.where(bad, nan, ent).float()


_SCRATCH: dict = {}


def scratch_flags(device) -> torch.Tensor:
    """A per-device int32 [2] buffer that kernels may set error flags in when nobody reads them (``validate=False``):
    no allocation and no zero-fill launch per call. Its contents are meaningless."""
    flags = _SCRATCH.get(device)
    if flags is None:
        flags = _SCRATCH[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return flags


def _fused(logits, targets, temperature, normalize, ignore_index, backend, *, modality=None, flag=None):
    """The fused (triton / cpp) forward on validated inputs: (logp, entropy, effective flat targets).

    Triton: out-of-range targets set ``flag[0]`` (the caller reads it); rows whose ``modality`` ([P, L], Triton
    only) is -1 are ignored like ``ignore_index``."""
    V = logits.shape[-1]
    ent_scale = 1.0 / math.log(V) if (normalize and V > 1) else (0.0 if normalize else 1.0)
    logits3 = _as_rows(logits)
    if backend == "cpp":  # the C++ launcher takes targets in their shape and returns logp/entropy in it
        flat_targets = targets.to(torch.int64).contiguous()
        if not (torch.is_grad_enabled() and logits.requires_grad):  # no autograd.Function without gradients
            launch = kernel_module("cpp", "fastgrpo.kernels.token_entropy")
            logp, ent = launch.token_stats_fwd(logits3, flat_targets, 1.0 / float(temperature), int(ignore_index),
                                               ent_scale)[:2]
            return logp, ent, flat_targets
    else:
        flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
        if not (torch.is_grad_enabled() and logits.requires_grad):  # no autograd.Function without gradients
            launch = kernel_module("triton", "fastgrpo.kernels.token_entropy")
            logp, ent, _, _, _, eff = launch.token_stats_fwd(logits3, flat_targets, 1.0 / float(temperature),
                                                             int(ignore_index), ent_scale, modality=modality,
                                                             flag=flag)
            if logp.shape != targets.shape:
                logp, ent = logp.view(targets.shape), ent.view(targets.shape)
            return logp, ent, eff
    logp, ent, eff = _TokenLogprobEntropyFn.apply(logits3, flat_targets, 1.0 / float(temperature), int(ignore_index),
                                                  ent_scale, backend, modality, flag)
    if logp.shape != targets.shape:
        logp, ent = logp.view(targets.shape), ent.view(targets.shape)
    return logp, ent, eff
