"""Fused SDE step with Gaussian log-prob (and KL to a reference policy) for flow-matching GRPO.

One reverse step of a rectified-flow sampler, turned stochastic so that each transition has a density (DESIGN.md
§3.1). With ``dt = sigma_next - sigma < 0``, latent ``x = x_t`` and model velocity ``v``:

* ``kind="flow_grpo"`` -- Flow-GRPO (arXiv 2505.05470, eq. 9; yifan123/flow_grpo,
  ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``sde_step_with_logprob``)::

      sd   = noise_level * sqrt(sigma / (1 - s)),   s = sigma_max if sigma == 1 else sigma
      mean = x * (1 + sd^2 * dt / (2 sigma)) + v * (1 + sd^2 * (1 - sigma) / (2 sigma)) * dt
      std  = sd * sqrt(-dt)

* ``kind="dance"`` -- DanceGRPO (XueZeyue/DanceGRPO, ``flux_step`` with ``sde_solver=True``): the same mean with
  ``sd = noise_level`` (their eta) and ``std = eta * sqrt(-dt)``. Their score form
  ``mean = x + dt*v - 0.5*eta^2*score*dt`` with ``score = -(x - x0*(1 - sigma))/sigma^2``, ``x0 = x - sigma*v``
  expands to exactly the Flow-GRPO mean with ``sd = eta``.
* ``kind="cps"`` -- Flow-GRPO's coefficient-preserving sampler: ``std = sigma_next * sin(noise_level*pi/2)``,
  ``x0 = x - sigma*v``, ``x1 = x + (1 - sigma)*v``, ``mean = x0*(1 - sigma_next) + x1*sqrt(sigma_next^2 - std^2)``,
  ``log_prob = mean(-(x' - mean)^2)`` (no normalising constants, as in the reference).
* ``kind="ode"`` -- deterministic Euler: ``mean = x + dt*v``, ``prev_sample = mean``, ``std = 0``, ``log_prob = 0``.

``prev_sample = mean + std * eps`` (``eps`` = ``noise``, else ``torch.randn`` with ``generator``), unless
``prev_sample`` is given: then it is used as is, detached, and its log-prob is returned. For flow_grpo and dance::

    log_prob = mean over non-batch dims of  -(x' - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))

With ``v_ref`` (the reference policy's velocity), ``kl`` = mean over non-batch dims of ``(mean - mean_ref)^2 /
(2 d^2)`` with ``d = sd`` for ``kl_convention="flow_grpo"`` (Flow-GRPO's training term, no dt) or ``d = std`` for
``"exact"`` (the Gaussian KL between the two transitions). For cps both conventions use the transition std.

Decisions where DESIGN.md is silent (written down here, as it asks):

* ``kl`` is ``None`` when ``v_ref`` is not given, rather than a tensor of zeros that could be mistaken for a KL.
* ``sigma``/``sigma_next`` are not differentiated (they are schedule constants); ``v_ref`` does get the gradient
  of the KL when it requires grad (it is usually a frozen policy's output and does not).
* For ``kind="ode"`` a given ``noise`` is ignored (there is nothing to draw) and ``prev_sample`` is the returned
  ``mean``, detached (same storage).
* ``kind="cps"`` with ``v_ref`` at a step with ``sigma_next == 0`` raises: its transition std is 0 there, so the
  KL is undefined (Flow-GRPO never trains that last step).
* Tensor sigmas are validated on the host, which costs one device sync per call; python floats cost none.

The fused paths (Triton; on CPU the C++ extension, csrc/sde_step.cpp) compute the per-sample coefficients of
``mean = cx*x + cv*v`` once on ``[B]`` tensors in float64, then one kernel reads x, v (and eps or prev_sample, and v_ref) once, writes mean (and prev_sample),
and reduces the per-sample sums of squares from which log_prob and kl follow.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._backend import check_float, check_same_device, check_same_shape, kernel_module, resolve_impl

KINDS = ("flow_grpo", "dance", "cps", "ode")
KL_CONVENTIONS = ("flow_grpo", "exact")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEStep(NamedTuple):
    """Result of `sde_step`.

    prev_sample: float32 [B, ...] x_{t-1} (never carries gradient).
    log_prob:    float32 [B] log-density of prev_sample under the transition (0 for kind="ode").
    mean:        float32 [B, ...] transition mean.
    std:         float32 [B] transition std (0 for kind="ode").
    kl:          float32 [B] KL to the reference transition, or None without ``v_ref``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kl: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation


def _as_sigma(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """A float, 0-d, [1] or [B] sigma as a float64 [B] tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a floating tensor of shape [B], got dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}; put them on one device")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a float or a tensor of shape [{batch}] (one per sample), "
                             f"got shape {tuple(value.shape)}")
        return value.detach().to(torch.float64).reshape(-1).expand(batch)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)
    raise ValueError(f"{name} must be a float or a tensor of shape [B], got {type(value).__name__}")


def _check_inputs(x, v, sigma, sigma_next, kind, noise_level, sigma_max, noise, prev_sample, v_ref,
                  kl_convention):
    """Validate everything `sde_step` accepts; returns (sigma, sigma_next) as float64 [B] tensors (on the CPU when
    both were given as numbers, else on x's device)."""
    check_float("x", x)
    check_float("v", v)
    if x.ndim < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one non-batch dim, got {tuple(x.shape)}")
    check_same_shape("v", v, "x", x)
    for name, t in (("noise", noise), ("prev_sample", prev_sample), ("v_ref", v_ref)):
        if t is not None:
            check_float(name, t)
            check_same_shape(name, t, "x", x)
    check_same_device([("x", x), ("v", v), ("noise", noise), ("prev_sample", prev_sample), ("v_ref", v_ref)])
    if any(d == 0 for d in x.shape[1:]):
        raise ValueError(f"x must have at least one element per sample, got shape {tuple(x.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kl_convention not in KL_CONVENTIONS:
        raise ValueError(f"kl_convention must be one of {KL_CONVENTIONS}, got {kl_convention!r}")
    if kind == "ode" and v_ref is not None:
        raise ValueError("v_ref was given with kind='ode': a deterministic step has no density, hence no KL")
    if kind in ("flow_grpo", "dance") and not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for kind={kind!r} (the log-prob divides by std), "
                         f"got {noise_level}")
    if kind == "cps" and not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level must be in [0, 1] for kind='cps', got {noise_level}")
    if sigma_max is not None and not 0 < float(sigma_max) < 1:
        raise ValueError(f"sigma_max must be in (0, 1) (the schedule's first sigma below 1), got {sigma_max}")
    B = x.shape[0]
    # Float sigmas (the usual sampling loop) are checked and turned into coefficients on the CPU: no device sync
    # and no tiny float64 kernels per step; tensor sigmas stay on x's device (their check syncs once).
    scalar = not isinstance(sigma, torch.Tensor) and not isinstance(sigma_next, torch.Tensor)
    where = torch.device("cpu") if scalar else x.device
    s = _as_sigma("sigma", sigma, B, where)
    sn = _as_sigma("sigma_next", sigma_next, B, where)
    if B == 0:
        return s, sn
    bad_range = ~((s <= 1) & (sn >= 0))
    bad_order = ~(sn < s)
    needs_max = (s == 1) if (kind == "flow_grpo" and sigma_max is None) else torch.zeros_like(s, dtype=torch.bool)
    zero_std = (sn == 0) if (kind == "cps" and v_ref is not None) else torch.zeros_like(s, dtype=torch.bool)
    flags = torch.stack([bad_range.any(), bad_order.any(), needs_max.any(), zero_std.any()]).tolist()  # one sync
    if flags[0]:
        raise ValueError("sigma and sigma_next must lie in [0, 1] (0 <= sigma_next < sigma <= 1)")
    if flags[1]:
        raise ValueError("sigma_next must be smaller than sigma for every sample (0 <= sigma_next < sigma <= 1)")
    if flags[2]:
        raise ValueError("sigma == 1 with kind='flow_grpo' needs sigma_max (the schedule's sigmas[1]): "
                         "sqrt(sigma / (1 - sigma)) is infinite at sigma = 1")
    if flags[3]:
        raise ValueError("kind='cps' with v_ref at sigma_next == 0: the transition std is 0 there, so the KL is "
                         "undefined; do not train the last step")
    return s, sn


# ----------------------------------------------------------------------------------------------- reference


def sde_step_ref(x, v, sigma, sigma_next, *, kind="flow_grpo", noise_level=0.7, sigma_max=None, noise=None,
                 prev_sample=None, generator=None, v_ref=None, kl_convention="flow_grpo") -> SDEStep:
    """Plain-PyTorch twin of `sde_step` (the test oracle and benchmark baseline).

    Written formula for formula after Flow-GRPO's ``sde_step_with_logprob`` and DanceGRPO's ``flux_step`` (see the
    module docstring). Math runs in float32 like theirs, or in float64 when given float64 inputs (the oracle).
    Materialises every intermediate; differentiable through torch autograd.
    """
    s, sn = _check_inputs(x, v, sigma, sigma_next, kind, noise_level, sigma_max, noise, prev_sample, v_ref,
                          kl_convention)
    return _sde_step_torch(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                           kl_convention)


def standard_normal(shape, generator, device) -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` on ``device``, drawn on the generator's own device.

    A CPU generator with CUDA latents draws on the CPU and copies (torch.randn refuses a generator of another
    device): the noise then depends only on the generator's seed, not on where the model runs, which is what the
    trainer's per-step CPU generators rely on. Without a generator the draw is on ``device`` from torch's global RNG.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _sde_step_torch(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                    kl_convention) -> SDEStep:
    """Body of `sde_step_ref` on validated inputs (s, sn: float64 [B])."""
    s, sn = s.to(x.device), sn.to(x.device)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    v = v.to(dtype)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    sigma = s.to(dtype).view(bshape)
    sigma_prev = sn.to(dtype).view(bshape)
    dt = sigma_prev - sigma
    dims = tuple(range(1, x.ndim))

    def transition_mean(vel):
        if kind == "cps":
            pred_original_sample = x - sigma * vel
            noise_estimate = x + vel * (1 - sigma)
            return pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(sigma_prev**2 - std**2)
        if kind == "ode":
            return x + dt * vel
        return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + vel * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    if kind == "flow_grpo":
        guard = torch.where(sigma == 1, torch.as_tensor(sigma_max if sigma_max is not None else 0.5, dtype=dtype,
                                                        device=x.device), sigma)
        std_dev_t = torch.sqrt(sigma / (1 - guard)) * noise_level
        std = std_dev_t * torch.sqrt(-dt)
    elif kind == "dance":
        std_dev_t = torch.full_like(sigma, noise_level)
        std = std_dev_t * torch.sqrt(-dt)
    elif kind == "cps":
        std = sigma_prev * math.sin(noise_level * math.pi / 2)
        std_dev_t = std
    else:
        std = torch.zeros_like(sigma)
    mean = transition_mean(v)

    if prev_sample is not None:
        prev = prev_sample.detach().to(dtype)
    elif kind == "ode":
        prev = mean.detach()
    else:
        eps = noise.to(dtype) if noise is not None else standard_normal(x.shape, generator, x.device).to(dtype)
        prev = (mean + std * eps).detach()

    if kind in ("flow_grpo", "dance"):
        log_prob = (-((prev - mean) ** 2) / (2 * std**2) - torch.log(std)
                    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=dtype))))
        log_prob = log_prob.mean(dim=dims)
    elif kind == "cps":
        log_prob = (-((prev - mean) ** 2)).mean(dim=dims)
    else:
        log_prob = torch.zeros(x.shape[0], dtype=dtype, device=x.device)

    kl = None
    if v_ref is not None:
        mean_ref = transition_mean(v_ref.to(dtype))
        d = std_dev_t if (kl_convention == "flow_grpo" and kind != "cps") else std
        kl = ((mean - mean_ref) ** 2).mean(dim=dims) / (2 * d.reshape(-1) ** 2)
    return SDEStep(prev, log_prob, mean, std.reshape(-1), kl)


# ----------------------------------------------------------------------------------------------- fused path


def _coefficients(kind, s, sn, noise_level, sigma_max, kl_convention):
    """Per-sample float64 [B] (cx, cv, std, kl_d): mean = cx*x + cv*v; kl divides by 2*kl_d^2."""
    dt = sn - s
    if kind in ("flow_grpo", "dance"):
        if kind == "flow_grpo":
            guard = torch.where(s == 1, torch.full_like(s, sigma_max if sigma_max is not None else 0.5), s)
            sd = noise_level * torch.sqrt(s / (1 - guard))
        else:
            sd = torch.full_like(s, float(noise_level))
        cx = 1 + sd**2 * dt / (2 * s)
        cv = (1 + sd**2 * (1 - s) / (2 * s)) * dt
        std = sd * torch.sqrt(-dt)
        kl_d = sd if kl_convention == "flow_grpo" else std
    elif kind == "cps":
        std = sn * math.sin(noise_level * math.pi / 2)
        c = torch.sqrt(torch.clamp(sn**2 - std**2, min=0))
        cx = (1 - sn) + c  # x0*(1-sn) + x1*c with x0 = x - s*v, x1 = x + (1-s)*v
        cv = -s * (1 - sn) + (1 - s) * c
        kl_d = std
    else:
        cx, cv, std, kl_d = torch.ones_like(s), dt, torch.zeros_like(s), None
    return cx, cv, std, kl_d


class _SDEStepFn(torch.autograd.Function):
    """Elementwise mean (and sample) plus per-sample sums of squares; autograd finishes log_prob/kl on [B]."""

    @staticmethod
    def forward(ctx, x, v, v_ref, eps, prev, cx, cv, std, backend):
        launch = kernel_module(backend, "fastgrpo.kernels.sde_step")
        new_prev, mean, ssq, klssq = launch.sde_step_fwd(x, v, cx, cv, std, eps=eps, prev=prev, v_ref=v_ref)
        ctx.backend = backend
        used_prev = new_prev if new_prev is not None else prev
        ctx.save_for_backward(x, v, v_ref, used_prev, cx, cv)
        ctx.set_materialize_grads(False)
        outs = (mean, ssq if ssq is not None else mean.new_empty(0),
                klssq if klssq is not None else mean.new_empty(0),
                new_prev if new_prev is not None else mean.new_empty(0))
        ctx.mark_non_differentiable(outs[3])
        return outs

    @staticmethod
    def backward(ctx, g_mean, g_ssq, g_klssq, _g_prev):
        sde_step_bwd = kernel_module(ctx.backend, "fastgrpo.kernels.sde_step").sde_step_bwd
        x, v, v_ref, prev, cx, cv = ctx.saved_tensors
        need_gx, need_gv, need_gvref = ctx.needs_input_grad[:3]
        gx, gv, gvref = sde_step_bwd(
            x, v, cx, cv, prev=prev, v_ref=v_ref,
            g_mean=g_mean.contiguous() if g_mean is not None else None,
            g_ssq=g_ssq.float().contiguous() if (g_ssq is not None and g_ssq.numel()) else None,
            g_klssq=g_klssq.float().contiguous() if (g_klssq is not None and g_klssq.numel()) else None,
            need_gx=need_gx, need_gv=need_gv, need_gvref=need_gvref,
        )
        return gx, gv, gvref, None, None, None, None, None, None


def _sde_step_fused(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                    kl_convention, backend) -> SDEStep:
    B = x.shape[0]
    shape = x.shape
    cx, cv, std, kl_d = _coefficients(kind, s, sn, noise_level, sigma_max, kl_convention)
    # One float32 [4, B] block on x's device (one copy when computed on the CPU); its rows are contiguous [B].
    cx, cv, std, kl_d = torch.stack([cx, cv, std, kl_d if kl_d is not None else std]).to(
        device=x.device, dtype=torch.float32).unbind(0)
    n = math.prod(shape[1:])
    flat = lambda t: t.detach().reshape(B, n).contiguous() if t is not None else None  # noqa: E731
    x2 = x.reshape(B, n).contiguous()
    v2 = v.reshape(B, n).contiguous()
    vref2 = v_ref.reshape(B, n).contiguous() if v_ref is not None else None
    eps = prev = None
    if kind != "ode":
        if prev_sample is not None:
            prev = flat(prev_sample)
        elif noise is not None:
            eps = flat(noise)
        else:
            eps = standard_normal(shape, generator, x.device).reshape(B, n)
    mean, ssq, klssq, new_prev = _SDEStepFn.apply(x2, v2, vref2, eps, prev, cx, cv, std, backend)
    if kind in ("flow_grpo", "dance"):
        log_prob = -ssq / (2 * n * std ** 2) - torch.log(std) - _LOG_SQRT_2PI
    elif kind == "cps":
        log_prob = -ssq / n
    else:
        log_prob = torch.zeros(B, dtype=torch.float32, device=x.device)
    kl = klssq / (2 * n * kl_d ** 2) if v_ref is not None else None
    mean = mean.view(shape)
    if kind == "ode":
        out_prev = mean.detach()
    elif prev_sample is not None:
        out_prev = prev_sample.detach().to(torch.float32)
    else:
        out_prev = new_prev.view(shape)
    return SDEStep(out_prev, log_prob, mean, std, kl)


def sde_step(x, v, sigma, sigma_next, *, kind="flow_grpo", noise_level=0.7, sigma_max=None, noise=None,
             prev_sample=None, generator=None, v_ref=None, kl_convention="flow_grpo", impl="auto") -> SDEStep:
    """One stochastic reverse step x_t -> x_{t-1} with its log-prob (and KL), fused.

    Args:
        x: latent x_t, [B, ...] float32/float16/bfloat16.
        v: model velocity at (x_t, sigma), same shape as ``x``. Differentiable.
        sigma, sigma_next: current and next noise level: floats, or float tensors of shape [B] (per-sample steps,
            as branching and pruning need). ``0 <= sigma_next < sigma <= 1``.
        kind: "flow_grpo" (Flow-GRPO SDE), "dance" (DanceGRPO), "cps" (coefficient-preserving), "ode" (Euler).
        noise_level: Flow-GRPO's ``a`` (0.7), DanceGRPO's ``eta`` (0.3), or the cps angle fraction.
        sigma_max: the schedule's ``sigmas[1]``; required by kind="flow_grpo" when any ``sigma == 1``.
        noise: explicit standard-normal ``eps`` [B, ...]; else drawn with ``torch.randn(generator=generator)`` on the
            generator's device and moved to x's (a CPU generator gives the same noise on any device).
        prev_sample: a given x_{t-1} [B, ...]: no noise is drawn and its log-prob is returned (training).
        generator: torch.Generator for the internal draw.
        v_ref: the reference policy's velocity [B, ...]; gives ``kl``.
        kl_convention: "flow_grpo" (``/(2 sd^2)``, Flow-GRPO's term) or "exact" (``/(2 std^2)``).
        impl: "auto" | "triton" | "torch" | "cpp" (see ``fastgrpo.ops._backend``).

    Returns:
        SDEStep(prev_sample [B, ...] f32, log_prob [B] f32, mean [B, ...] f32, std [B] f32, kl [B] f32 or None).

    Example:
        >>> out = sde_step(x, v, 0.8, 0.7, noise_level=0.7)            # sample, as in rollouts
        >>> again = sde_step(x, v_new, 0.8, 0.7, prev_sample=out.prev_sample, v_ref=v_ref)  # training
    """
    s, sn = _check_inputs(x, v, sigma, sigma_next, kind, noise_level, sigma_max, noise, prev_sample, v_ref,
                          kl_convention)
    backend = resolve_impl(impl, x.device, has_cpp=True)
    if backend == "torch":
        out = _sde_step_torch(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                              kl_convention)
        if out.mean.dtype != torch.float32:  # float64 inputs to the torch path: keep the contract's dtypes
            out = SDEStep(*(t.float() if t is not None else None for t in out))
        return out
    return _sde_step_fused(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                           kl_convention, backend)
