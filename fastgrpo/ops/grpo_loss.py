"""GRPO token loss: policy-gradient surrogate with optional PPO clipping and a k3 KL to the reference policy.

Per token (DESIGN.md §3.2; GRPO, DeepSeekMath arXiv 2402.03300 eq. 3-4; T2I-R1 / EG-GRPO trainers)::

    ratio      = exp(logp - old_logp)                      (clip_eps given: PPO-style off-policy ratio)
               = exp(logp - logp.detach())                 (clip_eps None: value 1, gradient of logp; T2I-R1/EG-GRPO)
    surrogate  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)     (-ratio * A without clipping)
    kl         = exp(ref - logp) - (ref - logp) - 1         (k3 estimator, Schulman 2020; >= 0)
    loss       = sum(mask * (surrogate + beta * kl)) / sum(mask)

``A`` is the token advantage (e.g. `eg_token_advantages`, 0 on EG-GRPO's low-entropy tokens): the KL applies to
every masked-in token, low-entropy ones included ("KL only"). The mean is over all masked-in tokens of the
micro-batch (token mean, as the released EG-GRPO trainer does), not a per-sequence mean.

Decisions where DESIGN.md is silent (written down here, as it asks):

* ``stats`` holds detached 0-d float32 tensors (no host sync): ``clip_fraction`` -- the fraction of masked-in
  tokens whose clipped term is the active one, i.e. ``ratio < 1 - eps`` with ``A < 0`` or ``ratio > 1 + eps`` with
  ``A > 0`` (TRL's definition; 0 without clipping); ``kl`` -- the masked mean k3 KL (0 without ``ref_logp``);
  ``ratio`` -- the masked mean ratio.
* ``old_logp`` may be None only when ``clip_eps`` is None (it is not used then); ``ref_logp`` may be None (no KL
  term, like ``beta = 0``). A mask without any token gives loss 0 (the sum is divided by max(1, sum(mask))).
* ``mask`` is bool, or float weights in [0, 1] (a NaN, negative or > 1 weight, or an integer mask, raises
  ValueError naming ``mask``; the float range check is one host sync). Masked-out tokens (mask False / 0) are
  *selected* out (``torch.where``), not multiplied by 0: they may hold NaN or +-inf in any input (padding) and
  still contribute exactly 0 to the loss, the stats and logp's gradient (issue 14: 0 * inf made the loss NaN).
* These are a few elementwise ops with no kernel: `grpo_token_loss` and `grpo_token_loss_ref` share one body, and
  the tests check them against an independent float64 implementation.
"""
from __future__ import annotations

import math

import torch

from ._backend import check_float, check_same_device


def _check_loss_inputs(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta):
    check_float("logp", logp)
    named = [("old_logp", old_logp), ("ref_logp", ref_logp), ("token_adv", token_adv)]
    for name, t in named:
        if t is None and name != "token_adv":
            continue
        check_float(name, t)
        if t.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(t.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool or float tensor of the shape of logp {tuple(logp.shape)}, got {got}")
    check_same_device([("logp", logp), *named, ("mask", mask)])
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise ValueError(f"mask must be a bool or float tensor (weights in [0, 1]), got {mask.dtype}; "
                             "convert a 0/1 integer mask with mask.bool()")
        if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails both comparisons
            raise ValueError("mask must hold weights in [0, 1] (no NaN, no negative weight)")
    if clip_eps is not None:
        if isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)) or not 0 < clip_eps < 1:
            raise ValueError(f"clip_eps must be None or a float in (0, 1), got {clip_eps!r}")
        if old_logp is None:
            raise ValueError("old_logp is required when clip_eps is given (the ratio is exp(logp - old_logp))")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")


def _loss(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta):
    dtype = torch.promote_types(logp.dtype, torch.float32)
    # Select, never multiply: masked-out tokens may hold NaN/inf (padding), and 0 * inf is NaN. Their inputs are
    # replaced by 0 before any arithmetic, so neither the loss nor logp's gradient (0 there) sees them.
    keep = mask if mask.dtype == torch.bool else mask > 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    sel = lambda t: torch.where(keep, t.to(dtype), zero)  # noqa: E731
    lp = sel(logp)
    A = sel(token_adv.detach())
    m = mask.to(dtype)
    denom = m.sum().clamp_min(1)
    if clip_eps is None:
        ratio = torch.exp(lp - lp.detach())
        surrogate = -ratio * A
        clipped = torch.zeros_like(m)
    else:
        ratio = torch.exp(lp - sel(old_logp.detach()))
        surrogate = -torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
        clipped = (((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))).to(dtype)
    per_token = surrogate
    if ref_logp is not None:
        delta = sel(ref_logp.detach()) - lp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        mean_kl = (kl.detach() * m).sum() / denom
    else:
        mean_kl = torch.zeros((), dtype=dtype, device=lp.device)
    loss = (per_token * m).sum() / denom
    stats = {
        "clip_fraction": ((clipped * m).sum() / denom).float(),
        "kl": mean_kl.float(),
        "ratio": ((ratio.detach() * m).sum() / denom).float(),
    }
    return loss, stats


def grpo_token_loss_ref(logp, old_logp, ref_logp, token_adv, mask, *, clip_eps=None, beta=0.01):
    """Plain-PyTorch twin of `grpo_token_loss` (the same body; see the module docstring)."""
    _check_loss_inputs(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta)
    return _loss(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta)


def grpo_token_loss(logp, old_logp, ref_logp, token_adv, mask, *, clip_eps=None, beta=0.01):
    """GRPO token-mean loss with optional clipping and k3 KL ("KL only" on zero-advantage tokens).

    Args:
        logp: [B, L] float log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: [B, L] float log-probs at sampling time, or None when ``clip_eps`` is None.
        ref_logp: [B, L] float log-probs under the reference policy, or None (no KL term).
        token_adv: [B, L] float token advantages (e.g. `eg_token_advantages`); used detached.
        mask: [B, L] bool/float, 1 on tokens that count (completion tokens).
        clip_eps: PPO clip range (e.g. 0.2), or None: no clipping, ratio = exp(logp - logp.detach()).
        beta: KL coefficient (EG-GRPO / T2I-R1: 0.01).

    Returns:
        (loss, stats): loss 0-d (float32, float64 for float64 logp) with gradient to ``logp``; stats: dict of
        detached 0-d float32 tensors ``clip_fraction``, ``kl``, ``ratio``.
    """
    _check_loss_inputs(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta)
    return _loss(logp, old_logp, ref_logp, token_adv, mask, clip_eps, beta)
