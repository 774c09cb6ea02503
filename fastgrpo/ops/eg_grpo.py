"""EG-GRPO token shaping: per-row, per-modality entropy masks and entropy-shaped token advantages.

EG-GRPO (seed 001, "From Broad Exploration to Stable Synthesis: Entropy-Guided Optimization for Autoregressive Image
Generation", §5.3-5.4; released code minebetter/EG-GRPO @b0bdd65, ``eg_grpo_trainer.py``) ranks the normalised
token entropies ``H`` of each sequence, separately for the text chain-of-thought (modality 0) and the image tokens
(modality 1), and

* removes the reward-driven advantage of the lowest-entropy tokens (``low``; they keep only the KL term),
* adds a bonus to the advantage of the highest-entropy tokens (``high``).

Thresholds (DESIGN.md §3.2), per row and modality over its n valid tokens with entropies ``s`` sorted ascending:

* ``rule="released"`` (the released code's index rule, per modality as it is written there, in
  ``src/eg-grpo/src/open_r1/eg_trainer/eg_grpo_trainer.py`` @b0bdd65: text thresholds at lines 871-884, image
  thresholds at lines 886-891, masks ``H > tau_hi`` / ``H < tau_lo`` at lines 894-897)::

      text  (0):  tau_hi = s[n - max(1, floor(high_frac * n))]     tau_lo = s[min(n - 1, max(1, floor(low_frac * n)))]
      image (1):  tau_hi = s[min(n - 1, floor((1 - high_frac) * n))]     tau_lo = s[min(n - 1, floor(low_frac * n))]

  Products in float64 (python floats). The released code hard-codes the fractions: text ``0.5`` / ``0.2`` of the
  count (float32 products, which floor to the same integers for every n < 2^21; ``clamp(min=1)``; the high
  position counted from the end), image ``s[int(0.5 * n)]`` / ``s[int(0.2 * n)]`` counted from the start, with
  no ``max(1, .)``; we read the image ``0.5`` as ``1 - high_frac`` and ``0.2`` as ``low_frac``, so the defaults
  (0.2, 0.5) give its positions exactly. The two rules differ: for an odd n the image ``tau_hi`` is one position
  lower (n = 7: text s[4], image s[3]: 3 high image tokens, 2 high text tokens); a segment of fewer than 5 image
  tokens (at the defaults) has no low token (``tau_lo = s[0]``, the minimum), where 2 to 4 text tokens have the
  lowest one(s) low. The ``min(n - 1, .)`` clamps never move a position at the defaults except the text ``tau_lo``
  at n = 1 (see (c) below); they keep every position inside the segment for any fractions in (0, 1).

  The released code's padding quirk, which we do not copy (we rank exactly the n valid tokens of the modality):
  for the text it sorts each row's segment at its full, micro-batch padded length ``Lp`` (padding included) and
  takes n as the number of positions with entropy > 0: ``tau_hi = s[Lp - max(1, floor(0.5 n))]``,
  ``tau_lo = s[Lp - n + max(1, floor(0.2 n))]`` -- our text rule when every padding entropy is exactly 0 and
  every real one > 0, which does not hold there: (a) the padding positions (after EOS) get the model's entropies,
  not zeros, so padding entropies are ranked with the real tokens (and counted in n when > 0); (b) a real token
  whose entropy is exactly 0 counts as padding (it is left out of n); (c) when at most one position of the row
  has entropy > 0 -- a CoT of one token with no other position > 0, e.g. a micro-batch of one-token CoTs -- the
  ``tau_lo`` index is >= ``Lp`` and the gather raises (we give n = 1 no mask). The image segment has no padding
  there (576 tokens per image, all ranked) and no entropy > 0 count.
* ``rule="quantile"``: numpy's ``nanquantile`` with linear interpolation, ``tau_hi = q(1 - high_frac)``,
  ``tau_lo = q(low_frac)``, reproduced bit for bit (position in float64, interpolation in the entropies' dtype).

``high = H > tau_hi``, ``low = H < tau_lo`` (strict), both False where modality == -1.

Advantages (A: one advantage per sequence, broadcast over its tokens; H detached)::

    released:   b = min(bonus * |A|, bonus * H) * high          token_adv = (A + b) * (1 - low)
    calibrate:  alpha = bonus * mean_B(|A|) / mean(H[high])     b = min(alpha * H, bonus * |A|) * high

The calibrated bonus is our reconstruction of the paper's Proposition 1 (per-batch budget balance, eq. 8 and
Appendix B.1), whose equations are lost in our copy of the paper; it is batch-level (one alpha for the whole
batch). The released code (the default, ``calibrate=False``) uses the fixed ``bonus * H`` instead.

Decisions where DESIGN.md is silent (written down here, as it asks):

* Where the masks are computed: on CUDA (``impl`` "auto"/"triton") one Triton kernel per call
  (``fastgrpo.kernels.token_entropy.eg_shaping_kernel``, one program per row and modality) sorts the modality's
  entropies in registers (``tl.sort``), picks both thresholds of the chosen rule and writes ``low``, ``high`` and
  the shaped ``token_adv`` in one pass; ``calibrate=True`` adds one small kernel for the batch-level alpha. The
  quantile rule is exact there too: the fractions travel as three float32 scalars whose float64 sum is the python
  float, the position is computed in float64, the interpolation is rounded to the entropies' dtype after each
  operation (bf16 by its bits) with fused multiply-adds off; the tests compare the masks with ``np.nanquantile``
  on rows of values one ulp apart. Rows longer than ``MAX_SHAPING_L`` (8,192) and the torch/cpp impls use torch
  ops: per modality one ``torch.sort`` of the [B, L] entropies with the other tokens pushed to +inf, then a gather
  of the threshold positions. Not ``torch.quantile`` (it fails above 2^24 elements).
* Launches and syncs of `eg_grpo_shaping` on CUDA: a zeroed int32 flag pair, the pass-1 kernel (one program per
  token), the pass-2 kernel (plus the calibrate kernel), then one host read of the flag pair at the very end
  (after every kernel is queued): 3 launches (4 with calibrate) and one device-to-host read, instead of 29 kernels
  with a validation sync in the middle. With ``validate=False`` (what the AR trainer passes: its targets are its
  own samples) there is no flag to zero and no read: 2 launches (3), and the call never waits for the device; an
  out-of-range target gives NaN logp/entropy, a bad modality value a NaN token_adv (on the torch path too).
  Pass 1 also ignores modality -1 tokens itself and hands pass 2 the effective targets, so no torch op prepares
  the inputs.
* A row/modality with no valid token has no threshold and empty masks; with n = 1 both masks are empty (the one
  token is its own threshold and comparisons are strict).
* Modality values other than -1, 0, 1 raise ValueError: checked in the pass-2 kernel (flag read at the end of
  the call) on the Triton path, on the host (one sync, with the shape checks) on the torch/cpp paths. When both a
  modality value and a target are wrong, the modality error is the one raised, on every path.
* ``mean(H[high])`` of the calibrated rule is over every high token of the batch; a batch without high tokens has
  no bonus (alpha = 0 instead of 0/0).
* In `eg_grpo_shaping`, a token with modality -1 *or* target == -100 is ignored: not read, logp = entropy = 0,
  token_adv = 0, in no mask and no threshold.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import check_float, check_same_device, resolve_impl
from .token_entropy import _check_token_inputs, _fused, _raise_target_range, scratch_flags, token_logprob_entropy

RULES = ("released", "quantile")
MODALITIES = (0, 1)  # text (CoT), image; -1 = ignored
IGNORE_INDEX = -100


class EGShaping(NamedTuple):
    """Result of `eg_grpo_shaping`.

    logp:      float32 [B, L] log-prob of each target token (differentiable w.r.t. logits; 0 on ignored tokens).
    entropy:   float32 [B, L] normalised entropy H / ln V (detached; 0 on ignored tokens).
    token_adv: float32 [B, L] shaped advantage per token (0 on ignored tokens).
    low:       bool [B, L] low-entropy tokens (advantage removed, KL only).
    high:      bool [B, L] high-entropy tokens (advantage + bonus).
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    token_adv: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


# ----------------------------------------------------------------------------------------------- validation


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")


def _check_rule(low_frac, high_frac, rule):
    _check_fraction("low_frac", low_frac)
    _check_fraction("high_frac", high_frac)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _raise_modality_values():
    raise ValueError("modality must hold only -1 (ignored), 0 (text) or 1 (image)")


def _check_modality(modality, shape, check_values=True, like=None):
    """modality: integer tensor of ``shape`` holding -1, 0, 1 (the values: one host sync, unless the caller
    leaves them to the Triton kernel's flag), on the device of ``like`` = (name, tensor) (checked before the
    values are read: issue 14, a modality on another device raised torch's RuntimeError)."""
    if not isinstance(modality, torch.Tensor) or modality.dtype.is_floating_point or modality.dtype == torch.bool:
        got = modality.dtype if isinstance(modality, torch.Tensor) else type(modality).__name__
        raise ValueError(f"modality must be an integer tensor of shape {tuple(shape)} (0 text, 1 image, "
                         f"-1 ignored), got {got}")
    if modality.shape != shape:
        raise ValueError(f"modality must have shape [B, L] = {tuple(shape)}, got {tuple(modality.shape)}")
    if like is not None:
        check_same_device([like, ("modality", modality)])
    if check_values and modality.numel() and bool(((modality < -1) | (modality > 1)).any()):
        _raise_modality_values()


def _check_mask_inputs(entropy, modality, low_frac, high_frac, rule, check_values=True):
    check_float("entropy", entropy)
    if entropy.ndim != 2:
        raise ValueError(f"entropy must have shape [B, L], got {tuple(entropy.shape)}")
    _check_modality(modality, entropy.shape, check_values, like=("entropy", entropy))
    _check_rule(low_frac, high_frac, rule)


def _check_advantage_inputs(advantages, entropy, low, high, bonus):
    check_float("entropy", entropy)
    if entropy.ndim != 2:
        raise ValueError(f"entropy must have shape [B, L], got {tuple(entropy.shape)}")
    check_float("advantages", advantages)
    if advantages.shape != entropy.shape[:1]:
        raise ValueError(f"advantages must have shape [B] = [{entropy.shape[0]}] (one per sequence), "
                         f"got {tuple(advantages.shape)}")
    for name, t in (("low", low), ("high", high)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(entropy.shape)}")
        if t.shape != entropy.shape:
            raise ValueError(f"{name} must have the shape of entropy {tuple(entropy.shape)}, got {tuple(t.shape)}")
    check_same_device([("advantages", advantages), ("entropy", entropy), ("low", low), ("high", high)])
    _check_bonus(bonus)


def _check_bonus(bonus):
    if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not (bonus >= 0 and math.isfinite(bonus)):
        raise ValueError(f"bonus must be a finite float >= 0, got {bonus!r}")


# ----------------------------------------------------------------------------------------------- references


def _released_positions(n: int, low_frac: float, high_frac: float, modality: int = 0) -> tuple[int, int]:
    """Sorted positions of (tau_lo, tau_hi) among n >= 1 values of one modality, released rule (module docstring):
    text (0) ``min(n-1, max(1, floor(lf n)))``, ``n - max(1, floor(hf n))``; image (1) ``min(n-1, floor(lf n))``,
    ``min(n-1, floor((1-hf) n))``."""
    if modality == 0:
        return min(n - 1, max(1, math.floor(low_frac * n))), n - max(1, math.floor(high_frac * n))
    return min(n - 1, math.floor(low_frac * n)), min(n - 1, math.floor((1 - high_frac) * n))


def _lerp_quantile(s: torch.Tensor, n, q: float) -> torch.Tensor:
    """numpy's linear quantile of the first n sorted values of each row of ``s`` (n >= 1 where used).

    Bit-identical to ``np.nanquantile(values, q)`` for a python float q, so that strict masks agree at ties:
    the position ``(n - 1) * q`` and its fraction are float64, the interpolation runs in the values' dtype
    (numpy's NEP 50 casts the weak python weight to it), evaluated from the upper value when the fraction is
    >= 0.5 (numpy's ``_lerp``).
    """
    h = (n.to(torch.float64) - 1) * q
    lo = torch.floor(h)
    gamma = h - lo
    lo = lo.long().clamp(min=0)
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    a = s.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    b = s.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    diff = b - a
    return torch.where(gamma >= 0.5, b - diff * (1 - gamma).to(s.dtype), a + diff * gamma.to(s.dtype))


def eg_token_masks_ref(entropy, modality, *, low_frac=0.2, high_frac=0.5, rule="released", impl=None):
    """Plain-PyTorch twin of `eg_token_masks`: a python loop over rows and modalities, one sort per segment."""
    _check_mask_inputs(entropy, modality, low_frac, high_frac, rule)
    low = torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device)
    high = torch.zeros_like(low)
    for b in range(entropy.shape[0]):
        for mod in MODALITIES:
            sel = modality[b] == mod
            vals = entropy[b][sel]
            n = vals.numel()
            if n == 0:
                continue
            s = vals.sort().values
            if rule == "released":
                i_lo, i_hi = _released_positions(n, low_frac, high_frac, mod)
                tau_lo, tau_hi = s[i_lo], s[i_hi]
            else:
                nn = torch.tensor(n, device=s.device)
                tau_lo, tau_hi = _lerp_quantile(s, nn, low_frac), _lerp_quantile(s, nn, 1 - high_frac)
            low[b][sel] = vals < tau_lo
            high[b][sel] = vals > tau_hi
    return low, high


def _token_advantages(advantages, entropy, low, high, bonus, calibrate):
    """Body of `eg_token_advantages` (and its ref) on validated inputs: float32 [B, L]."""
    A = advantages.detach().float().unsqueeze(1)
    H = entropy.detach().float()
    hf = high.float()
    cap = bonus * A.abs()
    if calibrate:
        n_high = hf.sum()
        mean_h_high = (H * hf).sum() / n_high.clamp_min(1)
        alpha = bonus * A.abs().mean() / mean_h_high.clamp_min(torch.finfo(torch.float32).tiny)
        alpha = torch.where(n_high > 0, alpha, torch.zeros_like(alpha))  # no high token: no bonus, not 0/0
        b = torch.minimum(alpha * H, cap) * hf
    else:
        b = torch.minimum(cap, bonus * H) * hf
    return (A + b) * (1 - low.float())


def eg_token_advantages_ref(advantages, entropy, low, high, *, bonus=0.3, calibrate=False):
    """Plain-PyTorch twin of `eg_token_advantages`. These are a few elementwise ops with no kernel, so the op
    and its reference share one body; the tests check both against an independent numpy implementation."""
    _check_advantage_inputs(advantages, entropy, low, high, bonus)
    return _token_advantages(advantages, entropy, low, high, bonus, calibrate)


def eg_grpo_shaping_ref(logits, targets, modality, advantages, *, temperature=1.0, low_frac=0.2, high_frac=0.5,
                        bonus=0.3, rule="released", calibrate=False) -> EGShaping:
    """Plain-PyTorch twin of `eg_grpo_shaping`: the eager token statistics, then the looped masks."""
    return _shaping(logits, targets, modality, advantages, temperature, low_frac, high_frac, bonus, rule, calibrate,
                    impl="torch", masks=eg_token_masks_ref)


# ----------------------------------------------------------------------------------------------- ops


def _use_kernel(impl, entropy):
    """The Triton pass-2 kernel runs for impl "triton", and for "auto" on CUDA, when a row fits in one block."""
    if impl not in ("auto", "triton", "torch", "cpp"):
        resolve_impl(impl, entropy.device)  # raises the usual ValueError
    if impl in ("torch", "cpp") or entropy.shape[-1] > _kernel_max_l():
        return False
    return resolve_impl(impl, entropy.device) == "triton"


def _kernel_max_l():
    from fastgrpo.kernels.token_entropy import MAX_SHAPING_L

    return MAX_SHAPING_L


def _read_flags(flag, V=None):
    """The call's one host read of the kernels' error flags: [bad target, bad modality]."""
    bad_target, bad_modality = flag.tolist()
    if bad_modality:
        _raise_modality_values()
    if bad_target:
        _raise_target_range(V, IGNORE_INDEX)


def eg_token_masks(entropy, modality, *, low_frac=0.2, high_frac=0.5, rule="released", impl="auto"):
    """Low- and high-entropy token masks, per row and per modality, on device.

    Args:
        entropy: [B, L] float token entropies (normalised or not; only their order and ties matter).
        modality: [B, L] int: 0 text (CoT), 1 image, -1 ignored (padding, prompt).
        low_frac, high_frac: fractions in (0, 1) (EG-GRPO: 0.2 and 0.5).
        rule: "released" (minebetter/EG-GRPO's index rules, the default: one for text, one for image tokens;
            see the module docstring) or "quantile" (numpy nanquantile, linear, the same for both modalities).
        impl: "auto" (the Triton kernel on CUDA, else torch sorts) | "triton" | "torch" | "cpp" (= torch).

    Returns:
        (low, high): bool [B, L]; ``low = H < tau_lo``, ``high = H > tau_hi``, both False where modality == -1.
    """
    kernel = _use_kernel(impl, entropy) if isinstance(entropy, torch.Tensor) else False
    _check_mask_inputs(entropy, modality, low_frac, high_frac, rule, check_values=not kernel)
    if kernel:
        from fastgrpo.kernels.token_entropy import eg_shaping

        flag = torch.zeros(2, dtype=torch.int32, device=entropy.device)
        low, high, _ = eg_shaping(entropy, modality, low_frac=low_frac, high_frac=high_frac, rule=rule, flag=flag)
        _read_flags(flag)
        return low, high
    return _torch_masks(entropy, modality, low_frac, high_frac, rule)


def _torch_masks(entropy, modality, low_frac, high_frac, rule):
    """eg_token_masks on validated inputs with torch ops: one sort per modality, then gathers."""
    B, L = entropy.shape
    low = torch.zeros((B, L), dtype=torch.bool, device=entropy.device)
    high = torch.zeros_like(low)
    if entropy.numel() == 0:
        return low, high
    inf = torch.tensor(float("inf"), dtype=entropy.dtype, device=entropy.device)
    for mod in MODALITIES:
        sel = modality == mod
        s = torch.where(sel, entropy, inf).sort(dim=1).values  # the row's valid values first, ascending
        n = sel.sum(dim=1)
        if rule == "released":
            nf = n.to(torch.float64)
            if mod == 0:  # text
                i_hi = n - torch.floor(high_frac * nf).long().clamp(min=1)
                i_lo = torch.minimum(n - 1, torch.floor(low_frac * nf).long().clamp(min=1))
            else:  # image: positions from the start, no max(1, .)
                i_hi = torch.minimum(n - 1, torch.floor((1 - high_frac) * nf).long())
                i_lo = torch.minimum(n - 1, torch.floor(low_frac * nf).long())
            tau_hi = s.gather(1, i_hi.clamp(0, L - 1).unsqueeze(1))
            tau_lo = s.gather(1, i_lo.clamp(0, L - 1).unsqueeze(1))
        else:
            tau_hi = _lerp_quantile(s, n, 1 - high_frac).unsqueeze(1)
            tau_lo = _lerp_quantile(s, n, low_frac).unsqueeze(1)
        low |= sel & (entropy < tau_lo)
        high |= sel & (entropy > tau_hi)
    return low, high


def eg_token_advantages(advantages, entropy, low, high, *, bonus=0.3, calibrate=False):
    """EG-GRPO's shaped token advantages.

    Args:
        advantages: [B] float, one group-relative advantage per sequence (broadcast over its tokens).
        entropy: [B, L] float (normalised) token entropies; used detached.
        low, high: bool [B, L] masks from `eg_token_masks`.
        bonus: the bonus coefficient (EG-GRPO: 0.3), also the cap ``bonus * |A|``.
        calibrate: False: the released bonus ``min(bonus*|A|, bonus*H)``; True: the batch-calibrated bonus
            ``min(alpha*H, bonus*|A|)`` with ``alpha = bonus*mean(|A|)/mean(H[high])`` (our reconstruction of the
            paper's Proposition 1; see the module docstring).

    Returns:
        token_adv: float32 [B, L], ``(A + b) * (1 - low)``; no gradient.
    """
    _check_advantage_inputs(advantages, entropy, low, high, bonus)
    return _token_advantages(advantages, entropy, low, high, bonus, calibrate)


def _check_shaping_inputs(logits, targets, modality, advantages, low_frac, high_frac, rule, check_values=True):
    check_float("logits", logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, L, V], got {tuple(logits.shape)}")
    B, L, _ = logits.shape
    _check_modality(modality, logits.shape[:2], check_values, like=("logits", logits))
    check_float("advantages", advantages)
    if advantages.shape != (B,):
        raise ValueError(f"advantages must have shape [B] = ({B},) (one per sequence), got {tuple(advantages.shape)}")
    # before any op mixes them (issue 14: targets or advantages on another device raised torch's RuntimeError)
    check_same_device([("logits", logits), ("targets", targets), ("modality", modality), ("advantages", advantages)])
    _check_rule(low_frac, high_frac, rule)


def _shaping(logits, targets, modality, advantages, temperature, low_frac, high_frac, bonus, rule, calibrate, impl,
             masks, validate=True):
    kernel = (masks is eg_token_masks and isinstance(logits, torch.Tensor) and logits.ndim == 3
              and resolve_impl(impl, logits.device, has_cpp=True) == "triton" and logits.shape[1] <= _kernel_max_l())
    if kernel:
        return _shaping_triton(logits, targets, modality, advantages, temperature, low_frac, high_frac, bonus, rule,
                               calibrate, validate)
    _check_shaping_inputs(logits, targets, modality, advantages, low_frac, high_frac, rule, check_values=validate)
    bad_mod = None if validate else (modality < -1) | (modality > 1)
    if isinstance(targets, torch.Tensor) and targets.shape == modality.shape and not targets.dtype.is_floating_point:
        ignored = (modality == -1) | (targets == IGNORE_INDEX)
        targets = torch.where(ignored, torch.full_like(targets, IGNORE_INDEX), targets)
        modality = torch.where(ignored, torch.full_like(modality, -1), modality)
    # Pass 1: one pass over V per token (ignored tokens are not read).
    logp, entropy = token_logprob_entropy(logits, targets, temperature=temperature, normalize=True,
                                          ignore_index=IGNORE_INDEX, impl=impl, validate=validate)
    entropy = entropy.detach()
    # Pass 2: per row and modality thresholds, masks, shaped advantages.
    h_adv = entropy
    if validate:
        low, high = masks(entropy, modality, low_frac=low_frac, high_frac=high_frac, rule=rule, impl="torch")
    else:  # values unchecked: an out-of-range target (NaN logp and entropy) leaves the ranking and the calibrated
        # bonus's batch means, as on the Triton path; a bad modality value is in no modality (NaN token_adv below)
        oor = (targets < 0) | (targets >= logits.shape[-1])
        modality = torch.where(oor, torch.full_like(modality, -1), modality)
        h_adv = torch.where(oor, torch.zeros_like(entropy), entropy)
        low, high = _torch_masks(entropy, modality, low_frac, high_frac, rule)
    token_adv = eg_token_advantages(advantages, h_adv, low, high, bonus=bonus, calibrate=calibrate)
    token_adv = torch.where(modality != -1, token_adv, torch.zeros_like(token_adv))  # (NaN entropy * 0 is NaN)
    if bad_mod is not None:
        token_adv = torch.where(bad_mod, torch.full_like(token_adv, float("nan")), token_adv)
    return EGShaping(logp, entropy, token_adv, low, high)


def _shaping_triton(logits, targets, modality, advantages, temperature, low_frac, high_frac, bonus, rule, calibrate,
                    validate=True):
    """Triton path: every check that needs no device value first, then a zeroed flag, pass 1 (one launch), pass 2
    (one launch, two with calibrate), and the call's one host read of the flags at the end (none, and no zeroed
    flag, with ``validate=False``)."""
    from fastgrpo.kernels.token_entropy import eg_shaping

    _check_shaping_inputs(logits, targets, modality, advantages, low_frac, high_frac, rule, check_values=False)
    _check_token_inputs(logits, targets, temperature, IGNORE_INDEX, check_range=False)
    _check_bonus(bonus)
    flag = torch.zeros(2, dtype=torch.int32, device=logits.device) if validate else scratch_flags(logits.device)
    logp, entropy, eff_targets = _fused(logits, targets, temperature, True, IGNORE_INDEX, "triton",
                                        modality=modality, flag=flag)
    entropy = entropy.detach()
    low, high, token_adv = eg_shaping(entropy, modality, low_frac=low_frac, high_frac=high_frac, rule=rule,
                                      flag=flag, eff_targets=eff_targets, ignore_index=IGNORE_INDEX,
                                      advantages=advantages, bonus=bonus, calibrate=calibrate)
    if validate:
        _read_flags(flag, logits.shape[-1])
    return EGShaping(logp, entropy, token_adv, low, high)


def eg_grpo_shaping(logits, targets, modality, advantages, *, temperature=1.0, low_frac=0.2, high_frac=0.5,
                    bonus=0.3, rule="released", calibrate=False, impl="auto", validate=True) -> EGShaping:
    """EG-GRPO's fused entry point: token log-probs and entropies, masks and shaped advantages.

    Pass 1 (`token_logprob_entropy`, one pass over V) gives logp and the normalised entropy H / ln V per token;
    pass 2 gives per-row, per-modality thresholds, masks and shaped advantages. ``logp`` keeps its gradient;
    the entropy enters the shaping detached.

    Args:
        logits: [B, L, V] float32/float16/bfloat16, shifted so that ``logits[b, t]`` predicts ``targets[b, t]``.
        targets: [B, L] int64 sampled tokens (-100 = ignored).
        modality: [B, L] int: 0 text (CoT), 1 image, -1 ignored.
        advantages: [B] float group-relative advantages, one per sequence.
        temperature: sampling temperature T (> 0).
        low_frac, high_frac, rule: see `eg_token_masks`.  bonus, calibrate: see `eg_token_advantages`.
        impl: "auto" | "triton" | "torch" | "cpp" for pass 1.
        validate: True (default): an out-of-range target or a modality value other than -1/0/1 raises ValueError
            (on CUDA: one small device-to-host read at the end of the call). False: no host read at all (a
            training loop runs ahead of the GPU); such a target's ``logp``/``entropy`` and such a token's
            ``token_adv`` are NaN instead (never a finite wrong number; see `token_logprob_entropy`).

    Returns:
        EGShaping(logp, entropy, token_adv, low, high), all [B, L].
    """
    return _shaping(logits, targets, modality, advantages, temperature, low_frac, high_frac, bonus, rule, calibrate,
                    impl=impl, masks=eg_token_masks, validate=validate)
