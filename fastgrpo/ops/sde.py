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
* For ``kind="ode"`` a given ``noise`` is ignored (there is nothing to draw), and so is a given
  ``prev_sample`` (the step is deterministic: its log-prob is 0 whatever the sample, so there is nothing to
  score); the returned ``prev_sample`` is always the ``mean``, detached (same storage), on every impl. (Issue 14:
  the torch path used to return the given ``prev_sample`` while cpp/triton returned the mean.) Ignoring rather
  than refusing lets a trainer replay every step of a trajectory, SDE and ODE alike, with its stored samples.
* ``kind="cps"`` with ``v_ref`` at a step with ``sigma_next == 0`` raises: its transition std is 0 there, so the
  KL is undefined (Flow-GRPO never trains that last step). So does ``noise_level=0`` with cps and ``v_ref``
  (ValueError naming noise_level: std = sigma_next * sin(0) = 0).
* Argument types (issue 14): ``noise_level`` must be a finite real number (``inf``, NaN, strings, None, bools
  raise ValueError naming it); ``sigma_max`` a real number or None; ``generator`` a ``torch.Generator`` or None.
* Smallest std: where something divides by the transition std (log_prob of flow_grpo/dance, the KL), a sample
  whose float64 std is below ``MIN_STD = 1e-18`` raises ValueError (std^2 would underflow float32 and give
  inf/NaN): e.g. ``sigma = 1e-30`` with flow_grpo. Like the other value checks this runs where the host can read
  the sigmas (floats, CPU tensors, and impl="torch"); sigmas that are tensors on x's device reach the fused kernels
  unchecked for it.
* Every impl decides ``sigma == 1`` (the flow_grpo guard) on the float64 sigma, so ``sigma = 1 - 1e-8`` is a
  sigma below 1 everywhere (std ~4950 at noise_level 0.7), not the guard's value.
* Sigmas and device syncs. ``sde_step`` never syncs the device and never copies host->device synchronously, so
  a sampling or training loop runs ahead of the GPU and a call can be captured in a CUDA graph:

  - python floats (the sampling loop) are checked with plain python math and reach the kernels as float64 scalar
    arguments; the kernels compute the coefficients from them in float64;
  - CPU tensors are accepted with latents on any device (a change: they used to raise with CUDA latents). They
    are checked on the host (reading a CPU tensor needs no sync); one with a single value is passed as a scalar,
    [B] ones go to x's device as one float64 [2, B] tensor copied from pinned memory with ``non_blocking=True``
    (with CPU latents a float64 one is read in place, any stride);
  - tensors on x's device (CUDA) are trusted by the host, which cannot read them without a sync: the kernels
    check them, and a sample whose sigmas are invalid gets NaN ``prev_sample``/``mean``/``log_prob``/``std``/
    ``kl`` -- never a finite wrong number. Pass the schedule as floats or CPU tensors to get the ValueError.

  ``impl="torch"`` (the eager reference, the benchmarks' baseline) keeps its behaviour: device tensor sigmas are
  checked with one sync per call.

The Triton path (fastgrpo/kernels/sde_step.py) computes the per-sample coefficients of ``mean = cx*x + cv*v``
inside the kernels, in float64, from the sigmas (so a sigma in (1 - 3e-8, 1) is not rounded to 1). Per call: one
elementwise kernel reads x, v (and eps or prev_sample, and v_ref) once, writes mean (and prev_sample) and
per-chunk partial sums of squares; a second one (one program per sample) adds them in a fixed order and writes
log_prob, std and kl -- 2 launches (plus ``torch.randn`` when it draws the noise), no torch op on [B] tensors.
Under ``torch.no_grad`` (or when nothing requires grad) no autograd.Function is involved; with gradients, the
backward is one kernel that takes the gradients of log_prob and kl directly. The C++ path (CPU,
csrc/sde_step.cpp) has the same launchers (``sde_step_fwd(x, v, sched, ...)``, ``sde_step_bwd``) and does the same
work in one call each way: float64 coefficients from the sigmas, the elementwise pass, and the [B] epilogue
(log_prob, std, kl) from per-chunk partial sums, with no torch op on [B] tensors in Python (issue 20: the host
work around the kernel used to cost 0.2-0.6 ms a call, 14x the kernel at the tiny presets' size).

Host path of the fused paths (on a GPU the calls are host-bound at the benchmark shapes; bench/test_bench_host.py
times it with the Triton kernels stubbed): the inputs go to the launchers in x's own shape (contiguous; the
tensors themselves when they already are) and the outputs come back in it, so nothing is reshaped; the Triton
launchers plan each launch (grid, blocking, constexprs) once per (B, N, variant); the autograd.Function returns
only the outputs that exist (no placeholder for an absent kl or sample). A sampling call is 5 allocations and 2
launches, a training step's forward the same and its backward 1 allocation and 1 launch.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ._backend import check_float, check_same_shape, kernel_module, resolve_impl

KINDS = ("flow_grpo", "dance", "cps", "ode")
KL_CONVENTIONS = ("flow_grpo", "exact")


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
    """A float, 0-d, [1] or [B] sigma as a float64 [B] tensor on ``device`` (a CPU tensor is moved there)."""
    _check_sigma_type(name, value, batch, device)
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(-1).expand(batch)
    return torch.full((batch,), float(value), dtype=torch.float64, device=device)


def _check_sigma_type(name: str, value, batch: int, device: torch.device) -> None:
    """Type, shape and device of one sigma: a number, or a floating 0-d/[1]/[B] tensor on x's device or the CPU."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a floating tensor of shape [B], got dtype {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but x is on {device}; put them on one device "
                             "(or on the CPU)")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a float or a tensor of shape [{batch}] (one per sample), "
                             f"got shape {tuple(value.shape)}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    raise ValueError(f"{name} must be a float or a tensor of shape [B], got {type(value).__name__}")


def _check_args(x, v, kind, noise_level, sigma_max, noise, prev_sample, v_ref, kl_convention):
    """Validate everything `sde_step` accepts except the sigmas' values."""
    check_float("x", x)
    check_float("v", v)
    if x.ndim < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one non-batch dim, got {tuple(x.shape)}")
    check_same_shape("v", v, "x", x)
    for name, t in (("noise", noise), ("prev_sample", prev_sample), ("v_ref", v_ref)):
        if t is not None:
            check_float(name, t)
            check_same_shape(name, t, "x", x)
    device = x.device  # what check_same_device says, without building its list (issue 20: O(1) and lean)
    for name, t in (("v", v), ("noise", noise), ("prev_sample", prev_sample), ("v_ref", v_ref)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; put them on one device")
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have at least one element per sample, got shape {tuple(x.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kl_convention not in KL_CONVENTIONS:
        raise ValueError(f"kl_convention must be one of {KL_CONVENTIONS}, got {kl_convention!r}")
    if kind == "ode" and v_ref is not None:
        raise ValueError("v_ref was given with kind='ode': a deterministic step has no density, hence no KL")
    if type(noise_level) is not float and (isinstance(noise_level, bool)
                                           or not isinstance(noise_level, numbers.Real)) \
            or not math.isfinite(noise_level):
        raise ValueError(f"noise_level must be a finite float, got {noise_level!r}")
    if sigma_max is not None and (isinstance(sigma_max, bool) or not isinstance(sigma_max, numbers.Real)):
        raise ValueError(f"sigma_max must be a float in (0, 1) or None, got {sigma_max!r}")
    if kind == "cps" and v_ref is not None and noise_level == 0:
        raise ValueError("noise_level=0 with kind='cps' and v_ref: the transition std is 0 (std = sigma_next * "
                         "sin(noise_level * pi / 2)), so the KL is undefined; use noise_level > 0")
    if kind in ("flow_grpo", "dance") and not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for kind={kind!r} (the log-prob divides by std), "
                         f"got {noise_level}")
    if kind == "cps" and not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level must be in [0, 1] for kind='cps', got {noise_level}")
    if sigma_max is not None and not 0 < float(sigma_max) < 1:
        raise ValueError(f"sigma_max must be in (0, 1) (the schedule's first sigma below 1), got {sigma_max}")


_MSG_RANGE = "sigma and sigma_next must lie in [0, 1] (0 <= sigma_next < sigma <= 1)"
_MSG_ORDER = "sigma_next must be smaller than sigma for every sample (0 <= sigma_next < sigma <= 1)"
_MSG_MAX = ("sigma == 1 with kind='flow_grpo' needs sigma_max (the schedule's sigmas[1]): "
            "sqrt(sigma / (1 - sigma)) is infinite at sigma = 1")
_MSG_CPS = ("kind='cps' with v_ref at sigma_next == 0: the transition std is 0 there, so the KL is "
            "undefined; do not train the last step")
# log_prob (flow_grpo, dance) and kl divide by std^2 in float32: below this std, std^2 is no longer a normal float32
# (1.2e-38), and the quotient is inf/NaN. Only reached by sigmas within ~1e-18..1e-30 of 0 or of each other.
MIN_STD = 1e-18
_MSG_STD = (f"sigma and sigma_next give a transition std below {MIN_STD:g} for some sample (sigma, or the gap "
            "sigma - sigma_next, too close to 0 for noise_level): log_prob/kl divide by std^2, which underflows "
            "float32 there; skip such steps or take them with kind='ode'")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _std_is_scored(kind, v_ref) -> bool:
    """Whether something divides by the transition std: log_prob of flow_grpo/dance, and the KL (cps with v_ref)."""
    return kind in ("flow_grpo", "dance") or (kind == "cps" and v_ref is not None)


def _host_std(kind, a, b, noise_level, sigma_max) -> float:
    """The transition std of one sample in float64 python math (the fused paths' coefficients)."""
    if kind == "flow_grpo":
        guard = (sigma_max if sigma_max is not None else 0.5) if a == 1 else a
        return noise_level * math.sqrt(a / (1 - guard)) * math.sqrt(a - b)
    if kind == "dance":
        return noise_level * math.sqrt(a - b)
    return b * math.sin(noise_level * math.pi / 2)


def _check_inputs(x, v, sigma, sigma_next, kind, noise_level, sigma_max, noise, prev_sample, v_ref,
                  kl_convention):
    """Validate everything (the reference path, impl="torch"); returns (sigma, sigma_next) as float64 [B] tensors
    (on the CPU when both were given as numbers or CPU tensors, else on x's device; tensor sigmas on x's device
    cost one device sync here)."""
    _check_args(x, v, kind, noise_level, sigma_max, noise, prev_sample, v_ref, kl_convention)
    return _reference_sigmas(x, sigma, sigma_next, kind, sigma_max, v_ref, noise_level)


def _reference_sigmas(x, sigma, sigma_next, kind, sigma_max, v_ref, noise_level=0.7):
    B = x.shape[0]
    on_host = all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in (sigma, sigma_next))
    where = torch.device("cpu") if on_host else x.device
    _check_sigma_type("sigma", sigma, B, x.device)
    _check_sigma_type("sigma_next", sigma_next, B, x.device)
    s = _as_sigma("sigma", sigma, B, where)
    sn = _as_sigma("sigma_next", sigma_next, B, where)
    if B == 0:
        return s, sn
    bad_range = ~((s <= 1) & (sn >= 0))
    bad_order = ~(sn < s)
    needs_max = (s == 1) if (kind == "flow_grpo" and sigma_max is None) else torch.zeros_like(s, dtype=torch.bool)
    zero_std = (sn == 0) if (kind == "cps" and v_ref is not None) else torch.zeros_like(s, dtype=torch.bool)
    if _std_is_scored(kind, v_ref):
        std = _coefficients(kind, s, sn, noise_level, sigma_max, "exact")[2]
        tiny_std = std < MIN_STD
    else:
        tiny_std = torch.zeros_like(s, dtype=torch.bool)
    flags = torch.stack([bad_range.any(), bad_order.any(), needs_max.any(), zero_std.any(),
                         tiny_std.any()]).tolist()  # one sync
    for flag, msg in zip(flags, (_MSG_RANGE, _MSG_ORDER, _MSG_MAX, _MSG_CPS, _MSG_STD)):
        if flag:
            raise ValueError(msg)
    return s, sn


class _Schedule(NamedTuple):
    """The sigmas and constants of one step as the fused kernels take them.

    A sigma is a python float (``s``/``sn``, its tensor field None) or a [B] (stride 1 or more) or [1] (stride 0)
    tensor on x's device. ``sigma_max`` is 0.5 when not given (then ``has_sigma_max`` is False: sigma == 1 is an
    error); ``sin_a = sin(noise_level * pi / 2)`` is cps's std factor.
    """

    kind: str
    s: float
    sn: float
    s_tensor: Optional[torch.Tensor]
    sn_tensor: Optional[torch.Tensor]
    s_stride: int
    sn_stride: int
    noise_level: float
    sigma_max: float
    sin_a: float
    has_sigma_max: bool
    kl_exact: bool


def _host_sigma(value) -> Optional[list]:
    """The values of a sigma the host can read without a device sync (a number or a CPU tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return None
        return (value if value.dtype == torch.float64 else value.to(torch.float64)).reshape(-1).tolist()
    return [float(value)]


_NUMBER = (float, int)  # exact types: bool (an int subclass) takes the general path, which refuses it


def _schedule(x, sigma, sigma_next, kind, noise_level, sigma_max, v_ref, kl_convention) -> _Schedule:
    """Check the sigmas (type, shape, device; values wherever the host sees them: python floats and CPU tensors,
    plain python math, no torch op) and pack them for the kernels. No device sync, no synchronous copy: CPU
    tensors of B > 1 values go to x's device in one copy from pinned memory (non_blocking)."""
    B, device = x.shape[0], x.device
    if type(sigma) in _NUMBER and type(sigma_next) in _NUMBER:  # the sampling loop's floats: the lean path
        a, b = float(sigma), float(sigma_next)
        if B > 0:
            if not (a <= 1 and b >= 0):
                raise ValueError(_MSG_RANGE)
            if not b < a:
                raise ValueError(_MSG_ORDER)
            if kind == "flow_grpo" and sigma_max is None and a == 1:
                raise ValueError(_MSG_MAX)
            if kind == "cps" and v_ref is not None and b == 0:
                raise ValueError(_MSG_CPS)
            if _std_is_scored(kind, v_ref) and _host_std(kind, a, b, noise_level, sigma_max) < MIN_STD:
                raise ValueError(_MSG_STD)
        return _Schedule(kind, a, b, None, None, 0, 0, float(noise_level),
                         float(sigma_max) if sigma_max is not None else 0.5,
                         math.sin(noise_level * math.pi / 2) if kind == "cps" else 0.0,
                         sigma_max is not None, kl_convention == "exact")
    _check_sigma_type("sigma", sigma, B, device)
    _check_sigma_type("sigma_next", sigma_next, B, device)
    hs, hn = _host_sigma(sigma), _host_sigma(sigma_next)
    if B > 0:
        if (hs is not None and any(not a <= 1 for a in hs)) or (hn is not None and any(not b >= 0 for b in hn)):
            raise ValueError(_MSG_RANGE)
        if hs is not None and hn is not None:
            k = max(len(hs), len(hn))  # a one-value side broadcasts
            pairs = zip(hs * (k // len(hs)), hn * (k // len(hn)))
            if any(not b < a for a, b in pairs):
                raise ValueError(_MSG_ORDER)
        if kind == "flow_grpo" and sigma_max is None and hs is not None and any(a == 1 for a in hs):
            raise ValueError(_MSG_MAX)
        if kind == "cps" and v_ref is not None and hn is not None and any(b == 0 for b in hn):
            raise ValueError(_MSG_CPS)
        if _std_is_scored(kind, v_ref) and hs is not None and hn is not None:
            k = max(len(hs), len(hn))
            pairs = zip(hs * (k // len(hs)), hn * (k // len(hn)))
            if any(_host_std(kind, a, b, noise_level, sigma_max) < MIN_STD for a, b in pairs):
                raise ValueError(_MSG_STD)
    vals, tensors, strides = [0.0, 0.0], [None, None], [0, 0]
    to_copy = []
    for i, (value, host) in enumerate(((sigma, hs), (sigma_next, hn))):
        if host is not None and len(host) == 1:
            vals[i] = host[0]  # a number, or a one-element CPU tensor: a scalar argument
        elif host is not None and device.type == "cpu" and value.dtype == torch.float64:
            t = value.detach().reshape(-1)  # read in place by the kernels (any stride): no copy for CPU latents
            tensors[i], strides[i] = t, t.stride(0)
        elif host is not None:
            to_copy.append((i, host))
        else:  # on x's device: read by the kernel, which checks it (NaN outputs for invalid values)
            t = value.detach().reshape(-1)
            tensors[i], strides[i] = t, (0 if t.numel() == 1 else t.stride(0))
    if to_copy:
        rows = torch.tensor([h for _, h in to_copy], dtype=torch.float64, pin_memory=device.type == "cuda")
        if device.type != "cpu":
            rows = rows.to(device, non_blocking=True)
        for (i, _), row in zip(to_copy, rows):
            tensors[i], strides[i] = row, 1
    return _Schedule(kind, vals[0], vals[1], tensors[0], tensors[1], strides[0], strides[1], float(noise_level),
                     float(sigma_max) if sigma_max is not None else 0.5,
                     math.sin(noise_level * math.pi / 2) if kind == "cps" else 0.0,
                     sigma_max is not None, kl_convention == "exact")


# ----------------------------------------------------------------------------------------------- reference


def sde_step_ref(x, v, sigma, sigma_next, *, kind="flow_grpo", noise_level=0.7, sigma_max=None, noise=None,
                 prev_sample=None, generator=None, v_ref=None, kl_convention="flow_grpo") -> SDEStep:
    """Plain-PyTorch twin of `sde_step` (the test oracle and benchmark baseline).

    Written formula for formula after Flow-GRPO's ``sde_step_with_logprob`` and DanceGRPO's ``flux_step`` (see the
    module docstring). Math runs in float32 like theirs, or in float64 when given float64 inputs (the oracle);
    the per-sample [B] coefficients of flow_grpo/dance are computed in float64 from the float64 sigmas and then
    cast (a float32 sigma in (1 - 3e-8, 1) would round to 1 and fire the sigma == 1 guard), and their KL takes
    ``mean - mean_ref = coef_v * (v - v_ref)`` (the difference of two float32 means cancels near sigma = 1).
    Materialises every intermediate; differentiable through torch autograd.
    """
    _check_generator(generator)
    s, sn = _check_inputs(x, v, sigma, sigma_next, kind, noise_level, sigma_max, noise, prev_sample, v_ref,
                          kl_convention)
    return _sde_step_torch(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                           kl_convention)


def standard_normal(shape, generator, device) -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` on ``device``, drawn on the generator's own device.

    A CPU generator with CUDA latents draws on the CPU and copies (torch.randn refuses a generator of another
    device): the noise then depends only on the generator's seed, not on where the model runs, which is what the
    trainer's per-step CPU generators rely on; the copy does not wait for the device. Without a generator the draw
    is on ``device`` from torch's global RNG.
    """
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    # CPU -> CUDA from pinned memory without blocking the host (a pageable copy synchronises the stream first)
    pinned = gen_device.type == "cpu" and device.type == "cuda"
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32, pin_memory=pinned)
    return noise.to(device, non_blocking=pinned)


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
        return x * coef_x + vel * coef_v

    if kind in ("flow_grpo", "dance"):
        # The [B] coefficients in float64 from the float64 sigmas, then cast (as the fused paths do): in float32 a
        # sigma in (1 - 3e-8, 1) rounds to 1, which would fire the sigma == 1 guard and zero 1 - sigma.
        s64, sn64 = s.view(bshape), sn.view(bshape)
        dt64 = sn64 - s64
        if kind == "flow_grpo":
            guard = torch.where(s64 == 1, torch.full_like(s64, sigma_max if sigma_max is not None else 0.5), s64)
            sd64 = torch.sqrt(s64 / (1 - guard)) * noise_level
        else:
            sd64 = torch.full_like(s64, float(noise_level))
        coef_x = (1 + sd64**2 / (2 * s64) * dt64).to(dtype)
        coef_v = ((1 + sd64**2 * (1 - s64) / (2 * s64)) * dt64).to(dtype)
        std_dev_t = sd64.to(dtype)
        std = (sd64 * torch.sqrt(-dt64)).to(dtype)
    elif kind == "cps":
        std = sigma_prev * math.sin(noise_level * math.pi / 2)
        std_dev_t = std
    else:
        std = torch.zeros_like(sigma)
    mean = transition_mean(v)

    if kind == "ode":  # deterministic: a given prev_sample (or noise) is ignored, like on the fused paths
        prev = mean.detach()
    elif prev_sample is not None:
        prev = prev_sample.detach().to(dtype)
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
        if kind == "cps":
            diff = mean - transition_mean(v_ref.to(dtype))
        else:  # mean - mean_ref = coef_v * (v - v_ref) exactly; near sigma = 1 both means are ~1e6 and cancel
            diff = coef_v * (v - v_ref.to(dtype))
        d = std_dev_t if (kl_convention == "flow_grpo" and kind != "cps") else std
        kl = (diff ** 2).mean(dim=dims) / (2 * d.reshape(-1) ** 2)
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


class _SDEStepFusedFn(torch.autograd.Function):
    """The fused paths with gradients (``launch``: the Triton module or the C++ extension, same launchers): the
    forward writes mean, log_prob, std and kl; the backward kernel takes g_log_prob and g_kl.

    Outputs: (mean, log_prob, std), then kl when there is a v_ref and the new sample when one was drawn -- only
    what exists, so the graph holds no placeholder tensors."""

    @staticmethod
    def forward(ctx, x, v, v_ref, eps, prev, sched, launch):
        new_prev, mean, log_prob, std, kl = launch.sde_step_fwd(x, v, sched, eps=eps, prev=prev, v_ref=v_ref)
        ctx.sched, ctx.launch, ctx.has_kl = sched, launch, kl is not None
        ctx.save_for_backward(x, v, v_ref, new_prev if new_prev is not None else prev)
        ctx.set_materialize_grads(False)
        outs = (mean, log_prob, std)
        if kl is not None:
            outs += (kl,)
        if new_prev is not None:
            outs += (new_prev,)
            ctx.mark_non_differentiable(std, new_prev)
        else:
            ctx.mark_non_differentiable(std)
        return outs

    @staticmethod
    def backward(ctx, g_mean, g_log_prob, _g_std, *rest):
        x, v, v_ref, prev = ctx.saved_tensors
        g_kl = rest[0] if ctx.has_kl else None
        need_gx, need_gv, need_gvref = ctx.needs_input_grad[:3]
        # .float()/.contiguous() return the tensor itself when it already is one (the usual case: no copy)
        gx, gv, gvref = ctx.launch.sde_step_bwd(
            x, v, ctx.sched, prev=prev, v_ref=v_ref,
            g_mean=g_mean.contiguous() if g_mean is not None else None,
            g_log_prob=g_log_prob.float() if g_log_prob is not None else None,
            g_kl=g_kl.float() if g_kl is not None else None,
            need_gx=need_gx, need_gv=need_gv, need_gvref=need_gvref,
        )
        return gx, gv, gvref, None, None, None, None


def _detached(t):
    """``t`` detached; the tensor itself when it does not require grad (a detach is an op: skipped when idle)."""
    return t.detach() if t.requires_grad else t


def _kernel_inputs(x, v, kind, noise, prev_sample, generator, v_ref):
    """x, v, v_ref, eps, prev in x's shape, contiguous (the tensors themselves when they already are): the
    launchers of both fused paths take [B, ...] and allocate their outputs in that shape, so nothing is reshaped
    on the way in or out."""
    x2, v2 = x.contiguous(), v.contiguous()
    vref2 = v_ref.contiguous() if v_ref is not None else None
    eps = prev = None
    if kind != "ode":
        if prev_sample is not None:
            prev = _detached(prev_sample).contiguous()
        elif noise is not None:
            eps = _detached(noise).contiguous()
        else:
            eps = standard_normal(x.shape, generator, x.device)
    return x2, v2, vref2, eps, prev


def _sde_step_fused(x, v, sched, noise, prev_sample, generator, v_ref, launch) -> SDEStep:
    """The fused kernels of ``launch`` (the Triton module or the C++ extension, same launchers): Triton, two
    launches (forward, finish) and one more in backward, no torch op on [B] tensors, no sync; C++, one call each
    way, the float64 coefficients and the [B] epilogue computed inside it."""
    kind = sched.kind
    x2, v2, vref2, eps, prev = _kernel_inputs(x, v, kind, noise, prev_sample, generator, v_ref)
    if torch.is_grad_enabled() and (v.requires_grad or x.requires_grad or (v_ref is not None and v_ref.requires_grad)):
        outs = _SDEStepFusedFn.apply(x2, v2, vref2, eps, prev, sched, launch)
        mean, log_prob, std = outs[:3]
        kl = outs[3] if v_ref is not None else None
        new_prev = outs[-1] if eps is not None else None
    else:  # sampling (no_grad): no autograd.Function at all
        new_prev, mean, log_prob, std, kl = launch.sde_step_fwd(x2, v2, sched, eps=eps, prev=prev, v_ref=vref2)
    if kind == "ode":  # the sample that was taken: the mean for ODE steps
        out_prev = mean.detach()
    elif prev is not None:
        out_prev = prev if prev.dtype == torch.float32 else prev.to(torch.float32)
    else:
        out_prev = new_prev
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
    _check_args(x, v, kind, noise_level, sigma_max, noise, prev_sample, v_ref, kl_convention)
    _check_generator(generator)
    backend = resolve_impl(impl, x.device, has_cpp=True)
    if backend == "torch":
        s, sn = _reference_sigmas(x, sigma, sigma_next, kind, sigma_max, v_ref, noise_level)
        out = _sde_step_torch(x, v, s, sn, kind, noise_level, sigma_max, noise, prev_sample, generator, v_ref,
                              kl_convention)
        if out.mean.dtype != torch.float32:  # float64 inputs to the torch path: keep the contract's dtypes
            out = SDEStep(*(t.float() if t is not None else None for t in out))
        return out
    sched = _schedule(x, sigma, sigma_next, kind, noise_level, sigma_max, v_ref, kl_convention)
    launch = kernel_module(backend, "fastgrpo.kernels.sde_step")
    return _sde_step_fused(x, v, sched, noise, prev_sample, generator, v_ref, launch)
