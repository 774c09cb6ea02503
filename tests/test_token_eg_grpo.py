"""EG-GRPO masks, advantages and the fused shaping, against an independent numpy implementation of the rules."""
import math

import numpy as np
import pytest
import torch

from fastgrpo import (eg_grpo_shaping, eg_grpo_shaping_ref, eg_token_advantages, eg_token_advantages_ref,
                      eg_token_masks, eg_token_masks_ref, token_logprob_entropy_ref)
from fastgrpo.testing import assert_close

IMPLS = ["torch", "triton"]
IMAGE_TOKENS = 576  # Janus-Pro: 24 x 24 image tokens


# ------------------------------------------------------------------------------------------ numpy oracle


# The released rule, per modality, from minebetter/EG-GRPO @b0bdd65, src/eg-grpo/src/open_r1/eg_trainer/
# eg_grpo_trainer.py: text (modality 0) lines 876-884: tau_hi at n - max(1, floor(0.5 n)) (counted from the end),
# tau_lo at max(1, floor(0.2 n)); image (modality 1) lines 888-891: tau_hi at floor(0.5 n), tau_lo at floor(0.2 n)
# (counted from the start, no max(1, .)); lines 894-897: high = H > tau_hi, low = H < tau_lo (strict). Generalised
# with 0.5 -> high_frac (text) / 1 - high_frac (image) and 0.2 -> low_frac, positions clamped into [0, n - 1]
# (the released text tau_lo index overflows at n = 1; we give that token no mask). Fractions in float64.


def released_positions(n, m, low_frac, high_frac):
    """(i_lo, i_hi) among n >= 1 sorted values of modality m, from the formulas above (not the library's)."""
    if m == 0:
        i_hi = n - max(1, int(np.floor(np.float64(high_frac) * n)))
        i_lo = max(1, int(np.floor(np.float64(low_frac) * n)))
    else:
        i_hi = int(np.floor((1.0 - np.float64(high_frac)) * n))
        i_lo = int(np.floor(np.float64(low_frac) * n))
    return min(n - 1, i_lo), min(n - 1, i_hi)


def np_masks(entropy, modality, low_frac, high_frac, rule):
    """The released index rule (per modality) / numpy nanquantile rule, row by row and modality by modality."""
    H = entropy.cpu().numpy()
    mod = modality.cpu().numpy()
    low = np.zeros(H.shape, dtype=bool)
    high = np.zeros(H.shape, dtype=bool)
    for b in range(H.shape[0]):
        for m in (0, 1):
            idx = np.nonzero(mod[b] == m)[0]
            n = len(idx)
            if n == 0:
                continue
            vals = H[b, idx]
            if rule == "released":
                s = np.sort(vals.astype(np.float64))  # exact for every float dtype: thresholds are values
                i_lo, i_hi = released_positions(n, m, low_frac, high_frac)
                tau_lo, tau_hi = s[i_lo], s[i_hi]
                vals = vals.astype(np.float64)
            else:
                tau_hi = np.nanquantile(vals, 1 - high_frac)
                tau_lo = np.nanquantile(vals, low_frac)
            high[b, idx] = vals > tau_hi
            low[b, idx] = vals < tau_lo
    return torch.from_numpy(low), torch.from_numpy(high)


def np_advantages(A, H, low, high, bonus, calibrate):
    A = A.double().cpu().numpy()[:, None]
    H = H.double().cpu().numpy()
    low = low.cpu().numpy()
    high = high.cpu().numpy()
    if calibrate:
        alpha = bonus * np.abs(A).mean() / H[high].mean() if high.any() else 0.0
        b = np.where(high, np.minimum(alpha * H, bonus * np.abs(A)), 0.0)
    else:
        b = np.where(high, np.minimum(bonus * np.abs(A), bonus * H), 0.0)
    return torch.from_numpy(np.where(low, 0.0, A + b))


def ragged_batch(seed, text_lens=(0, 1, 2, 5, 17, 40, 33), prompt=3, text_max=40, image=IMAGE_TOKENS):
    """[prompt -1][text n_b][pad -1 ... up to text_max][image tokens]; one row without image tokens; ties."""
    g = torch.Generator().manual_seed(seed)
    B = len(text_lens)
    L = prompt + text_max + image
    modality = torch.full((B, L), -1, dtype=torch.long)
    for b, n in enumerate(text_lens):
        modality[b, prompt:prompt + n] = 0
        if b != 3:
            modality[b, prompt + text_max:] = 1
    entropy = torch.rand(B, L, generator=g)
    entropy[2] = torch.round(entropy[2] * 8) / 8  # many ties
    entropy[-1, prompt:prompt + text_lens[-1]] = 0.25  # a constant text segment
    entropy[modality == -1] = torch.rand(int((modality == -1).sum()), generator=g) * 5  # garbage, must be ignored
    return entropy, modality


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("masks", [eg_token_masks, eg_token_masks_ref], ids=["ondevice", "ref"])
@pytest.mark.parametrize("rule", ["released", "quantile"])
@pytest.mark.parametrize("fracs", [(0.2, 0.5), (0.1, 0.3), (0.35, 0.8)])
def test_masks_match_numpy_rules(masks, rule, fracs, device):
    low_frac, high_frac = fracs
    for seed in range(3):
        entropy, modality = ragged_batch(seed)
        low, high = masks(entropy.to(device), modality.to(device), low_frac=low_frac, high_frac=high_frac, rule=rule)
        want_low, want_high = np_masks(entropy, modality, low_frac, high_frac, rule)
        assert low.dtype == high.dtype == torch.bool
        assert torch.equal(low.cpu(), want_low), f"low differs (seed {seed})"
        assert torch.equal(high.cpu(), want_high), f"high differs (seed {seed})"
        assert not (low | high)[modality == -1].any()


def test_released_rule_counts_at_the_image_segment(device):
    """576 distinct image entropies: exactly 287 tokens above tau_hi (s[288]) and 115 below tau_lo (s[115])."""
    entropy, modality = ragged_batch(5)
    low, high = eg_token_masks(entropy.to(device), modality.to(device))
    img = modality == 1
    distinct = [b for b in range(len(img)) if img[b].any() and entropy[b][img[b]].unique().numel() == IMAGE_TOKENS]
    assert len(distinct) >= 4  # row 2 has ties, row 3 no image
    assert (high & img.to(device)).sum(1)[distinct].tolist() == [287] * len(distinct)
    assert (low & img.to(device)).sum(1)[distinct].tolist() == [115] * len(distinct)
    assert (high | low)[3].cpu()[img[3]].sum() == 0


def test_masks_bf16_and_float64_entropies(device):
    entropy, modality = ragged_batch(7)
    for dtype in (torch.bfloat16, torch.float64):
        e = entropy.to(dtype)
        low, high = eg_token_masks(e.to(device), modality.to(device), rule="released")
        want_low, want_high = np_masks(e.double(), modality, 0.2, 0.5, "released")
        assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)


# ------------------------------------------------------------------------------------------ released rule, per modality

SMALL_SIZES = tuple(range(1, 13)) + (13, 15, 17, 21, 25, 33)
KINDS = ("random", "ties", "uniform", "peaked", "extreme", "zeros")


def _segment_values(kind, n, g):
    if kind == "random":
        return torch.rand(n, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.round(torch.rand(n, generator=g, dtype=torch.float64) * 3) / 3
    if kind == "uniform":
        return torch.full((n,), 0.5, dtype=torch.float64)
    if kind == "peaked":
        v = torch.full((n,), 1e-4, dtype=torch.float64)
        v[torch.randint(0, n, (1,), generator=g)] = 0.99
        return v
    if kind == "extreme":  # zero, subnormal, tiny, huge (inf in float16): thresholds are picked values
        pool = torch.tensor([0.0, 1e-40, 1e-30, 1e-3, 1.0, 1e4, 1e30, 3e38], dtype=torch.float64)
        return pool[torch.randint(0, len(pool), (n,), generator=g)]
    v = torch.rand(n, generator=g, dtype=torch.float64)  # real tokens with entropy exactly 0 (not padding)
    v[torch.rand(n, generator=g) < 0.5] = 0.0
    return v


def small_segment_rows(seed, compact=False):
    """One row per (size, kind) (compact: one row per size, the kinds in turn; the Triton interpreter sorts slowly):
    n text and n' image tokens (n' another size of SMALL_SIZES) at random positions, the rest modality -1 with
    garbage entropies."""
    g = torch.Generator().manual_seed(seed)
    L = 2 * max(SMALL_SIZES) + 3
    if compact:
        rows = [(n, KINDS[i % len(KINDS)]) for i, n in enumerate(SMALL_SIZES)]
    else:
        rows = [(n, kind) for n in SMALL_SIZES for kind in KINDS]
    entropy = torch.rand(len(rows), L, generator=g, dtype=torch.float64) * 7
    modality = torch.full((len(rows), L), -1, dtype=torch.long)
    image_sizes = [SMALL_SIZES[int(i)] for i in torch.randint(0, len(SMALL_SIZES), (len(rows),), generator=g)]
    for b, ((n, kind), n_img) in enumerate(zip(rows, image_sizes)):
        if b % 3 == 0:
            n_img = n  # same size in both modalities: the two rules side by side
        pos = torch.randperm(L, generator=g)
        text, image = pos[:n], pos[n:n + n_img]
        modality[b, text], modality[b, image] = 0, 1
        entropy[b, text] = _segment_values(kind, n, g)
        entropy[b, image] = _segment_values(kind, n_img, g)
    return entropy, modality


def test_released_positions_per_modality():
    """The positions at the defaults, n = 1..12 and odd sizes, from the released formulas (see the oracle)."""
    from fastgrpo.ops.eg_grpo import _released_positions

    for n in SMALL_SIZES + (576, 577, 1001):
        for m in (0, 1):
            assert _released_positions(n, 0.2, 0.5, m) == released_positions(n, m, 0.2, 0.5), (n, m)
        assert _released_positions(n, 0.2, 0.5, 1) == (min(n - 1, n // 5), n // 2)  # int(0.2 n), int(0.5 n)
        assert _released_positions(n, 0.2, 0.5, 0) == (min(n - 1, max(1, n // 5)), n - max(1, n // 2))
    for lf, hf in ((0.1, 0.3), (0.35, 0.8), (0.01, 0.99), (0.99, 0.01), (0.5, 0.5), (1 - 2**-53, 2**-53)):
        for n in SMALL_SIZES + (576,):
            for m in (0, 1):
                i_lo, i_hi = _released_positions(n, lf, hf, m)
                assert (i_lo, i_hi) == released_positions(n, m, lf, hf) and 0 <= i_lo < n and 0 <= i_hi < n


# The Triton twins interpret tl.sort on CPU (~15 s a call): the slow tier (make test-slow, CI) runs them; the
# kernel's released per-modality rule stays in the fast tier through test_kernel_released_rule_small_segments.
@pytest.mark.parametrize("impl", ["ref", "torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_released_counts_distinct_values(impl, device):
    """Distinct entropies: image segments of fewer than 5 tokens have no low token; n = 5, 6, 7: one; the image
    high count is n - 1 - floor(n / 2), the text one max(1, floor(n / 2)) - 1, the text low count
    min(n - 1, max(1, floor(n / 5))) (n >= 2)."""
    sizes = SMALL_SIZES
    L = max(sizes)
    g = torch.Generator().manual_seed(12)
    entropy = torch.rand(2 * len(sizes), L, generator=g)
    modality = torch.full(entropy.shape, -1, dtype=torch.long)
    for i, n in enumerate(sizes):
        modality[2 * i, :n] = 0
        modality[2 * i + 1, L - n:] = 1
    fn = eg_token_masks_ref if impl == "ref" else eg_token_masks
    kw = {} if impl == "ref" else {"impl": impl}
    low, high = fn(entropy.to(device), modality.to(device), **kw)
    low, high = low.cpu().sum(1).tolist(), high.cpu().sum(1).tolist()
    for i, n in enumerate(sizes):
        assert low[2 * i] == (0 if n == 1 else min(n - 1, max(1, n // 5))), ("text low", n)
        assert high[2 * i] == max(1, n // 2) - 1, ("text high", n)
        assert low[2 * i + 1] == n // 5, ("image low", n)  # 0 for n < 5, 1 for n = 5..9
        assert high[2 * i + 1] == n - 1 - n // 2, ("image high", n)


def literal_released_masks(segment):
    """The released thresholds transcribed step by step (hard-coded 0.5 / 0.2, float32 products for the text,
    python floats for the image; eg_grpo_trainer.py lines 867-897), on one padding-free segment [B, n] per
    modality with every entropy > 0 (where its padding quirk has no effect): (text_low, text_high, img_low,
    img_high)."""
    s = np.sort(segment, axis=1)
    B, n = segment.shape
    nz = (segment > 0).sum(1)  # = n here
    k_hi = np.maximum(np.floor(nz.astype(np.float32) * np.float32(0.5)), 1).astype(np.int64)
    k_lo = np.maximum(np.floor(nz.astype(np.float32) * np.float32(0.2)), 1).astype(np.int64)
    t_hi = s[np.arange(B), n - k_hi][:, None]
    t_lo = s[np.arange(B), n - nz + k_lo][:, None]
    i_hi, i_lo = int(n * 0.5), int(n * 0.2)
    return segment < t_lo, segment > t_hi, segment < s[:, i_lo:i_lo + 1], segment > s[:, i_hi:i_hi + 1]


def test_rules_equal_the_literal_released_thresholds_without_padding():
    """At the defaults, on segments with no padding and every entropy > 0 (n >= 2, where the released text rule
    does not crash), both rules give exactly the released masks: text on text, image on image."""
    g = np.random.default_rng(5)
    for n in tuple(range(2, 13)) + (13, 15, 17, 31, 64, 576):
        seg = g.random((6, n)) + 1e-3
        seg[1] = np.round(seg[1] * 4) / 4 + 1e-3  # ties
        seg[2] = 0.5  # uniform
        t_low, t_high, i_low, i_high = literal_released_masks(seg)
        both = torch.from_numpy(np.concatenate([seg, seg], 1))
        modality = torch.tensor([0] * n + [1] * n).expand(6, -1)
        for fn in (eg_token_masks_ref, eg_token_masks):
            low, high = fn(both, modality)
            assert np.array_equal(low[:, :n].numpy(), t_low) and np.array_equal(high[:, :n].numpy(), t_high), n
            assert np.array_equal(low[:, n:].numpy(), i_low) and np.array_equal(high[:, n:].numpy(), i_high), n


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _small_segment_check(impl, dtype, device, compact, fracs_list):
    entropy, modality = small_segment_rows(seed={torch.float32: 1, torch.float64: 2}.get(dtype, 3), compact=compact)
    e = entropy.to(dtype)
    if impl == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        # Triton's interpreter flushes bf16 subnormals to 0 when it converts them to float32 (a GPU does not):
        # the extreme rows' 1e-40 becomes the smallest normal there.
        tiny = torch.finfo(torch.bfloat16).tiny
        e = torch.where((e != 0) & (e.abs() < tiny), torch.full_like(e, tiny), e)
    fn = eg_token_masks_ref if impl == "ref" else eg_token_masks
    kw = {} if impl == "ref" else {"impl": impl}
    for fracs in fracs_list:
        low, high = fn(e.to(device), modality.to(device), low_frac=fracs[0], high_frac=fracs[1], rule="released",
                       **kw)
        want_low, want_high = np_masks(e.double(), modality, *fracs, "released")
        assert torch.equal(low.cpu(), want_low), (dtype, fracs)
        assert torch.equal(high.cpu(), want_high), (dtype, fracs)


@pytest.mark.parametrize("impl", ["ref", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_released_rule_small_segments_match_oracle(impl, dtype, device):
    """Fresh random rows, n = 1..12 and odd sizes per modality, ties, uniform/peaked rows, extreme values, real
    zero entropies; every dtype: the float64 oracle of the per-modality released rule decides."""
    _small_segment_check(impl, dtype, device, False, ((0.2, 0.5), (0.3, 0.45), (0.05, 0.9)))


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_kernel_released_rule_small_segments(dtype, device):
    """The same on one row per size (the kinds in turn): the Triton kernel (interpreted tl.sort: ~15 s a call
    on CPU, so bfloat16 only in `make test-slow`; the kernel's other entropy dtypes:
    test_kernel_masks_other_entropy_dtypes)."""
    _small_segment_check("triton", dtype, device, True, ((0.2, 0.5),))


@pytest.mark.parametrize("impl", ["ref", "torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_released_rule_strided_entropies(impl, device):
    entropy, modality = small_segment_rows(seed=4, compact=True)
    entropy = entropy.float()
    wide = torch.rand(2 * entropy.shape[0], 2 * entropy.shape[1])
    wide[::2, 1::2] = entropy
    strided = wide[::2, 1::2]
    assert not strided.is_contiguous()
    mod_t = modality.t().contiguous().t()  # column-major modality
    fn = eg_token_masks_ref if impl == "ref" else eg_token_masks
    kw = {} if impl == "ref" else {"impl": impl}
    low, high = fn(strided.to(device), mod_t.to(device), **kw)
    want_low, want_high = np_masks(entropy.double(), modality, 0.2, 0.5, "released")
    assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)


@pytest.mark.parametrize("impl", IMPLS)
def test_shaping_applies_the_image_rule_to_image_tokens(impl, device):
    """eg_grpo_shaping (and the AR trainer's EGGRPO.token_terms, which passes modality 1 for the image logits) on
    short image segments: the image rule (no low token below 5 tokens, tau_hi at floor(n / 2)) applies."""
    from fastgrpo.algos.eg_grpo import EGGRPO

    g = torch.Generator().manual_seed(77)
    B, L, V = 5, 7, 33
    logits = (torch.randn(B, L, V, generator=g) * 2).to(device)
    targets = torch.randint(0, V, (B, L), generator=g)
    for b, n in enumerate((3, 4, 5, 7, 6)):
        targets[b, n:] = -100  # padding: n valid tokens per row
    targets = targets.to(device)
    A = torch.randn(B, generator=g).to(device)
    strat = EGGRPO()
    for m in (0, 1):
        terms = strat.token_terms(logits, targets, m, A, impl=impl)
        valid = (targets != -100).cpu()
        mod = torch.where(valid, torch.full_like(valid, m, dtype=torch.long), torch.full_like(valid, -1,
                                                                                             dtype=torch.long))
        want_low, want_high = np_masks(terms.entropy.double(), mod, 0.2, 0.5, "released")
        assert torch.equal(terms.low.cpu(), want_low) and torch.equal(terms.high.cpu(), want_high), m
        if m == 1:
            assert not terms.low[:2].any()  # 3 and 4 image tokens: no low token
            assert terms.high.cpu().sum(1).tolist() == [1, 1, 2, 3, 2]  # n - 1 - floor(n / 2), distinct entropies
        else:
            assert terms.high.cpu().sum(1).tolist() == [0, 1, 1, 2, 2]  # max(1, floor(n / 2)) - 1


# ------------------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("op", [eg_token_advantages, eg_token_advantages_ref], ids=["op", "ref"])
@pytest.mark.parametrize("calibrate", [False, True])
def test_advantages_match_numpy(op, calibrate, device):
    entropy, modality = ragged_batch(11)
    low, high = eg_token_masks(entropy, modality)
    A = torch.randn(entropy.shape[0], generator=torch.Generator().manual_seed(2))
    A[1] = 0.0  # GRPO equilibrium row: no bonus
    got = op(A.to(device), entropy.to(device), low.to(device), high.to(device), bonus=0.3, calibrate=calibrate)
    want = np_advantages(A, entropy, low, high, 0.3, calibrate)
    assert got.dtype == torch.float32 and got.shape == entropy.shape
    assert_close(got, want, name="token_adv")
    assert torch.count_nonzero(got[1]) == 0  # A = 0 -> bonus 0 (fixed-point neutrality)
    assert torch.count_nonzero(got[low.to(device)]) == 0  # low-entropy tokens: no reward-driven advantage


def test_calibrated_bonus_without_high_tokens_is_zero(device):
    H = torch.rand(2, 9).to(device)
    A = torch.tensor([0.5, -1.0], device=device)
    none = torch.zeros(2, 9, dtype=torch.bool, device=device)
    got = eg_token_advantages(A, H, none, none, calibrate=True)
    assert torch.equal(got, A.unsqueeze(1).expand(2, 9))


def test_advantages_ignore_entropy_gradient(device):
    H = torch.rand(2, 5, device=device, requires_grad=True)
    m = torch.ones(2, 5, dtype=torch.bool, device=device)
    out = eg_token_advantages(torch.ones(2, device=device), H, ~m, m)
    assert not out.requires_grad


# ------------------------------------------------------------------------------------------ shaping


def _shaping_inputs(device, dtype, V=257):
    entropy_layout, modality = ragged_batch(3, text_lens=(0, 3, 9, 14), text_max=14, image=24)
    B, L = modality.shape
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[modality == -1] = 0  # pad token ids on ignored positions: allowed, not read
    targets[2, 3] = -100  # an ignored target inside the text segment
    A = torch.randn(B, generator=g)
    return logits.to(device), targets.to(device), modality.to(device), A.to(device)


def _check_shaping(out, x, logits, targets, modality, A, *, temperature, low_frac, high_frac, bonus, rule,
                   calibrate):
    """``out = eg_grpo_shaping(x, ...)`` against the float64 reference (logp, normalised entropy, gradient of logp)
    and numpy (masks and shaped advantages on the entropies the op returned: ties make masks sensitive to the last
    bit). Returns the ignored tokens."""
    ignored = (modality == -1) | (targets == -100)
    t_ref = torch.where(ignored, torch.full_like(targets, -100), targets)
    x64 = logits.double().requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t_ref, temperature=temperature, normalize=True)
    assert_close(out.logp, ref_logp, name="logp")
    assert_close(out.entropy, ref_ent, name="entropy")
    assert not out.entropy.requires_grad and out.logp.requires_grad
    mod_eff = torch.where(ignored, torch.full_like(modality, -1), modality)
    want_low, want_high = np_masks(out.entropy, mod_eff, low_frac, high_frac, rule)
    assert torch.equal(out.low.cpu(), want_low) and torch.equal(out.high.cpu(), want_high)
    want_adv = np_advantages(A, out.entropy, want_low, want_high, bonus, calibrate) * (~ignored).cpu()
    assert_close(out.token_adv, want_adv, name="token_adv")
    (grad,) = torch.autograd.grad(out.logp.sum(), x)
    (grad64,) = torch.autograd.grad(ref_logp.sum(), x64)
    assert_close(grad, grad64, name="grad logits")
    assert torch.count_nonzero(grad[ignored]) == 0 and grad.dtype == x.dtype
    return ignored, ref_logp.detach()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule, calibrate", [("released", False), ("quantile", True)])
def test_shaping_matches_references(impl, dtype, rule, calibrate, device):
    logits, targets, modality, A = _shaping_inputs(device, dtype)
    V = logits.shape[-1]
    x = logits.clone().requires_grad_(True)
    out = eg_grpo_shaping(x, targets, modality, A, temperature=0.9, rule=rule, calibrate=calibrate, impl=impl)
    _, ref_logp = _check_shaping(out, x, logits, targets, modality, A, temperature=0.9, low_frac=0.2,
                                 high_frac=0.5, bonus=0.3, rule=rule, calibrate=calibrate)
    # The reference entry point agrees (same pass-2 decisions on the same entropies).
    ref = eg_grpo_shaping_ref(logits, targets, modality, A, temperature=0.9, rule=rule, calibrate=calibrate)
    assert_close(ref.logp, ref_logp, name="ref logp")
    assert V == 257


# ------------------------------------------------------------------------------------------ bad inputs


def _mask_args():
    return dict(entropy=torch.rand(2, 6), modality=torch.zeros(2, 6, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_frac=0.0), "low_frac must be a float in"),
        (dict(low_frac=1.0), "low_frac must be a float in"),
        (dict(high_frac=1.5), "high_frac must be a float in"),
        (dict(high_frac=-0.1), "high_frac must be a float in"),
        (dict(rule="median"), "rule must be one of"),
        (dict(modality=torch.zeros(2, 5, dtype=torch.long)), "modality must have shape"),
        (dict(modality=torch.zeros(2, 6)), "modality must be an integer tensor"),
        (dict(modality=torch.full((2, 6), 2)), "modality must hold only"),
        (dict(entropy=torch.rand(2, 6, 1)), r"entropy must have shape \[B, L\]"),
        (dict(entropy=torch.zeros(2, 6, dtype=torch.long)), "entropy must be a floating tensor"),
    ],
)
def test_masks_bad_input(kwargs, match):
    args = _mask_args()
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        eg_token_masks(args.pop("entropy"), args.pop("modality"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(advantages=torch.zeros(2, 1)), r"advantages must have shape \[B\]"),
        (dict(advantages=torch.zeros(2, dtype=torch.long)), "advantages must be a floating tensor"),
        (dict(low=torch.zeros(2, 6)), "low must be a bool tensor"),
        (dict(high=torch.zeros(2, 5, dtype=torch.bool)), "high must have the shape of entropy"),
        (dict(bonus=-0.1), "bonus must be"),
        (dict(entropy=torch.rand(2, 6, 1)), r"entropy must have shape \[B, L\]"),
    ],
)
def test_advantages_bad_input(kwargs, match):
    args = dict(advantages=torch.zeros(2), entropy=torch.rand(2, 6), low=torch.zeros(2, 6, dtype=torch.bool),
                high=torch.zeros(2, 6, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        eg_token_advantages(args.pop("advantages"), args.pop("entropy"), args.pop("low"), args.pop("high"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=torch.zeros(2, 6, 5, dtype=torch.int32)), "logits must be a floating tensor"),
        (dict(logits=torch.zeros(12, 5)), r"logits must have shape \[B, L, V\]"),
        (dict(targets=torch.full((2, 6), 7)), r"targets must lie in \[0, 5\)"),
        (dict(targets=torch.zeros(2, 5, dtype=torch.long)), "targets must have shape"),
        (dict(modality=torch.zeros(3, 6, dtype=torch.long)), "modality must have shape"),
        (dict(modality=torch.full((2, 6), 3)), "modality must hold only"),
        (dict(advantages=torch.zeros(3)), r"advantages must have shape \[B\]"),
        (dict(low_frac=0.0), "low_frac must be a float in"),
        (dict(high_frac=1.0), "high_frac must be a float in"),
        (dict(rule="x"), "rule must be one of"),
        (dict(bonus=float("inf")), "bonus must be"),
        (dict(temperature=-1.0), "temperature must be"),
    ],
)
def test_shaping_bad_input(kwargs, match):
    args = dict(logits=torch.zeros(2, 6, 5), targets=torch.zeros(2, 6, dtype=torch.long),
                modality=torch.zeros(2, 6, dtype=torch.long), advantages=torch.zeros(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        eg_grpo_shaping(args.pop("logits"), args.pop("targets"), args.pop("modality"), args.pop("advantages"),
                        **args)


def test_quantile_rule_never_calls_torch_quantile(monkeypatch, device):
    """torch.quantile fails above 2^24 elements; the op must not depend on it."""
    def boom(*a, **k):
        raise AssertionError("torch.quantile called")

    monkeypatch.setattr(torch, "quantile", boom)
    monkeypatch.setattr(torch, "nanquantile", boom)
    entropy, modality = ragged_batch(1)
    eg_token_masks(entropy.to(device), modality.to(device), rule="quantile")
    assert math.isfinite(float(entropy.sum()))


# ------------------------------------------------------------------------------------------ fused pass-2 kernel


def _kernel_masks(entropy, modality, **kw):
    return eg_token_masks(entropy, modality, impl="triton", **kw)


def hard_rows(seed, L=37):
    """Fresh random rows (odd L) with the cases a selection gets wrong: a row without text, a row without any
    valid token, n = 1 per modality, many ties, a uniform row, a peaked row, near-ties of adjacent floats."""
    g = torch.Generator().manual_seed(seed)
    B = 9
    modality = torch.randint(-1, 2, (B, L), generator=g)
    entropy = torch.rand(B, L, generator=g)
    modality[0][modality[0] == 0] = 1  # no text
    modality[1] = -1  # nothing valid
    modality[2] = -1
    modality[2, 5], modality[2, L - 2] = 0, 1  # n = 1 in each modality
    entropy[3] = torch.round(entropy[3] * 4) / 4  # ties
    entropy[4] = 0.5  # uniform
    entropy[5] = 1e-4
    entropy[5, 7] = 0.99  # peaked
    base = torch.tensor(0.3)
    ulp = torch.nextafter(base, torch.tensor(1.0)) - base
    entropy[6] = base + torch.randint(0, 4, (L,), generator=g).float() * ulp  # values one float32 ulp apart
    return entropy, modality


@pytest.mark.slow  # interpreted tl.sort, seconds per call: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("rule", ["released", "quantile"])
@pytest.mark.parametrize("fracs", [(0.2, 0.5), (0.1, 0.3), (0.35, 0.8), (0.5, 0.5), (0.01, 0.99)])
def test_kernel_masks_match_numpy_fresh_rows(rule, fracs, device):
    low_frac, high_frac = fracs
    for seed in range(2):  # fresh rows per seed, two lengths (each interpreted kernel call costs seconds)
        entropy, modality = hard_rows(100 + seed, L=37 + 2 * seed)
        low, high = _kernel_masks(entropy.to(device), modality.to(device), low_frac=low_frac, high_frac=high_frac,
                                  rule=rule)
        want_low, want_high = np_masks(entropy, modality, low_frac, high_frac, rule)
        assert torch.equal(low.cpu(), want_low), f"low differs (seed {seed})"
        assert torch.equal(high.cpu(), want_high), f"high differs (seed {seed})"


@pytest.mark.slow  # interpreted tl.sort, seconds per call: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("rule, image", [("released", 150), ("quantile", IMAGE_TOKENS)])
def test_kernel_masks_ragged_image_rows(rule, image, device):
    """Ragged text segments before image tokens; the full image row (576 tokens, a 1024-wide sort) once, a shorter
    one for the other rule (the interpreter sorts slowly)."""
    entropy, modality = ragged_batch(21, image=image)
    low, high = _kernel_masks(entropy.to(device), modality.to(device), rule=rule)
    want_low, want_high = np_masks(entropy, modality, 0.2, 0.5, rule)
    assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)


@pytest.mark.slow  # interpreted tl.sort, seconds per call: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("rule", ["released", "quantile"])
def test_kernel_quantile_at_interpolation_rounding(rule, device):
    """Rows of values a few float32 ulps apart: the interpolated threshold rounds onto a neighbour, so a float64
    interpolation (or a fused multiply-add) would change the strict masks; numpy's nanquantile decides."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for b in range(24):
        n = 5 + b
        base = torch.tensor(0.25 + 0.01 * b, dtype=torch.float32)
        ulp = float(torch.nextafter(base, torch.tensor(1.0)) - base)
        rows.append(base + torch.randint(0, 3, (n,), generator=g).float() * ulp)
    L = max(len(r) for r in rows)
    entropy = torch.zeros(len(rows), L)
    modality = torch.full((len(rows), L), -1)
    for b, r in enumerate(rows):
        entropy[b, :len(r)] = r
        modality[b, :len(r)] = b % 2
    for fracs in ((0.2, 0.5), (0.3, 0.3), (0.15, 0.65)):
        low, high = _kernel_masks(entropy.to(device), modality.to(device), low_frac=fracs[0], high_frac=fracs[1],
                                  rule=rule)
        want_low, want_high = np_masks(entropy, modality, *fracs, rule)
        assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rule", ["released", "quantile"])
def test_kernel_masks_other_entropy_dtypes(dtype, rule, device):
    """bf16/fp16: thresholds interpolated in that dtype (torch's rounding per op), float64 sorted in float64."""
    entropy, modality = hard_rows(7, L=41)
    e = entropy.to(dtype)
    low, high = _kernel_masks(e.to(device), modality.to(device), rule=rule, low_frac=0.3, high_frac=0.45)
    want_low, want_high = eg_token_masks_ref(e, modality, rule=rule, low_frac=0.3, high_frac=0.45)
    assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)
    if dtype == torch.float64:
        np_low, np_high = np_masks(e, modality, 0.3, 0.45, rule)
        assert torch.equal(low.cpu(), np_low) and torch.equal(high.cpu(), np_high)


def test_kernel_masks_strided_and_expanded(device):
    entropy, modality = hard_rows(8, L=33)
    wide = torch.rand(entropy.shape[0], 2 * entropy.shape[1] + 1)
    wide[:, 1::2][:, :33] = entropy
    strided = wide[:, 1::2][:, :33]
    assert not strided.is_contiguous()
    expanded = modality[7:8].expand_as(modality)  # one modality row broadcast over the batch (stride 0)
    for rule in ("released", "quantile"):
        low, high = _kernel_masks(strided.to(device), expanded.to(device), rule=rule)
        want_low, want_high = np_masks(entropy, expanded.contiguous(), 0.2, 0.5, rule)
        assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)


def test_kernel_masks_single_row_and_empty(device):
    entropy, modality = hard_rows(9, L=17)
    low, high = _kernel_masks(entropy[:1].to(device), modality[:1].to(device))
    want_low, want_high = np_masks(entropy[:1], modality[:1], 0.2, 0.5, "released")
    assert torch.equal(low.cpu(), want_low) and torch.equal(high.cpu(), want_high)
    low, high = _kernel_masks(torch.zeros(0, 5, device=device), torch.zeros(0, 5, dtype=torch.long, device=device))
    assert low.shape == high.shape == (0, 5)


def test_kernel_masks_bad_modality_raises(device):
    modality = torch.zeros(2, 6, dtype=torch.long)
    modality[1, 4] = 2
    with pytest.raises(ValueError, match="modality must hold only"):
        _kernel_masks(torch.rand(2, 6).to(device), modality.to(device))


def test_split3_recovers_every_float64_fraction():
    from fastgrpo.kernels.token_entropy import _split3

    g = np.random.default_rng(0)
    for q in list(g.random(2000)) + [0.2, 0.5, 0.8, 1 - 0.5, 1 - 0.3, 0.1, 1e-9, 1 - 1e-12]:
        a, b, c = _split3(float(q))
        for part in (a, b, c):
            assert np.float32(part) == part  # each a float32 kernel scalar
        assert a + b + c == float(q)


# ------------------------------------------------------------------------------------------ fused shaping


def _hard_shaping_inputs(device, dtype, seed, V=131, L=29):
    g = torch.Generator().manual_seed(seed)
    B = 6
    logits = torch.randn(B, L, V, generator=g) * 3
    logits[0, 2] = logits[0, 2] / 3 - 1e4  # very negative row
    logits[1, 4] = 0.25  # uniform rows: equal entropies (ties)
    logits[1, 5] = 0.25
    logits[2, 1, 7] += 60.0  # peaked row
    targets = torch.randint(0, V, (B, L), generator=g)
    modality = torch.randint(-1, 2, (B, L), generator=g)
    modality[3] = -1  # no valid token
    modality[4] = -1
    modality[4, 3], modality[4, 11] = 0, 1  # n = 1
    targets[torch.rand(B, L, generator=g) < 0.15] = -100
    targets[modality == -1] = torch.where(torch.rand(int((modality == -1).sum()), generator=g) < 0.5, -100, 0)
    A = torch.randn(B, generator=g)
    A[5] = 0.0
    return logits.to(dtype).to(device), targets.to(device), modality.to(device), A.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["released", "quantile"])
@pytest.mark.parametrize("calibrate", [False, True])
def test_triton_shaping_on_hard_rows(dtype, rule, calibrate, device):
    logits, targets, modality, A = _hard_shaping_inputs(device, dtype, seed=30 + int(calibrate))
    x = logits.clone().requires_grad_(True)
    out = eg_grpo_shaping(x, targets, modality, A, temperature=0.8, low_frac=0.25, high_frac=0.4, rule=rule,
                          calibrate=calibrate, bonus=0.4, impl="triton")
    _check_shaping(out, x, logits, targets, modality, A, temperature=0.8, low_frac=0.25, high_frac=0.4, bonus=0.4,
                   rule=rule, calibrate=calibrate)
    # The torch impl agrees (its masks on the same entropies are the same decisions).
    ref = eg_grpo_shaping(logits, targets, modality, A, temperature=0.8, low_frac=0.25, high_frac=0.4, rule=rule,
                          calibrate=calibrate, bonus=0.4, impl="torch")
    assert_close(out.entropy, ref.entropy.double(), name="entropy vs torch impl")


def test_triton_shaping_strided_logits_and_expanded_modality(device):
    logits, targets, _, A = _hard_shaping_inputs(device, torch.float32, seed=40, L=31)
    full = torch.randn(logits.shape[0], logits.shape[1] + 3, logits.shape[2], device=device)
    full[:, 2:-1] = logits
    x = full[:, 2:-1]
    assert not x.is_contiguous()
    modality = torch.randint(0, 2, (1, logits.shape[1])).expand(logits.shape[0], -1).to(device)
    out = eg_grpo_shaping(x, targets, modality, A, rule="quantile", impl="triton")
    want = eg_grpo_shaping(x.contiguous(), targets, modality.contiguous(), A, rule="quantile", impl="triton")
    for name in ("logp", "entropy", "token_adv", "low", "high"):
        assert torch.equal(getattr(out, name), getattr(want, name)), name


def _count_launches(monkeypatch, *names) -> list:
    """Wrap the named kernels of fastgrpo.kernels.token_entropy so that each launch appends its name to the returned
    list (the kernels still run)."""
    import fastgrpo.kernels.token_entropy as k

    events = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*a, **kw):
                events.append(self.name)
                return self.kernel[grid](*a, **kw)
            return launch

    for name in names:
        monkeypatch.setattr(k, name, Counted(name, getattr(k, name)))
    return events


@pytest.mark.parametrize("calibrate", [False, True])
def test_triton_shaping_launches_and_host_reads(calibrate, monkeypatch, device):
    """2 kernels per call (3 with calibrate), and the only device value read by the host is the flag pair, once,
    after every kernel is queued."""
    events = _count_launches(monkeypatch, "token_stats_fwd_kernel", "eg_shaping_kernel", "eg_calibrate_kernel",
                             "token_stats_bwd_kernel")
    logits, targets, modality, A = _hard_shaping_inputs(device, torch.bfloat16, seed=50)
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        events.append("host read")
        return real_tolist(self)

    def forbidden(self, *a):
        raise AssertionError("host read of a device value in the middle of the call")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", tolist)
        m.setattr(torch.Tensor, "__bool__", forbidden)
        m.setattr(torch.Tensor, "item", forbidden)
        eg_grpo_shaping(logits, targets, modality, A, calibrate=calibrate, impl="triton")
    kernels = ["token_stats_fwd_kernel", "eg_shaping_kernel"] + (["eg_calibrate_kernel"] if calibrate else [])
    assert events == kernels + ["host read"]


@pytest.mark.parametrize("impl", ["triton", "torch", "cpp"])
def test_shaping_errors_are_the_same_for_every_impl(impl, device):
    logits, targets, modality, A = _hard_shaping_inputs(device, torch.float32, seed=60)
    bad_t = targets.clone()
    bad_t[2, 3], modality[2, 3] = logits.shape[-1], 1  # a read target outside the vocabulary
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 131\)"):
        eg_grpo_shaping(logits, bad_t, modality, A, impl=impl)
    bad_t[2, 3] = -7
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 131\)"):
        eg_grpo_shaping(logits, bad_t, modality, A, impl=impl)
    bad_m = modality.clone()
    bad_m[5, 0] = 2
    with pytest.raises(ValueError, match="modality must hold only"):
        eg_grpo_shaping(logits, targets, bad_m, A, impl=impl)
    with pytest.raises(ValueError, match="modality must hold only"):  # both wrong: modality is named first
        eg_grpo_shaping(logits, bad_t, bad_m, A, impl=impl)
    ok_t = targets.clone()
    ok_t[modality == -1] = 10**6  # targets under modality -1 are not read, whatever they hold
    eg_grpo_shaping(logits, ok_t, modality, A, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("temperature", [1e-39, 1e300, 0.0])
def test_shaping_temperature_range(impl, temperature):
    """Issue 14: eg_grpo_shaping takes token_logprob_entropy's temperature range [1e-4, 1e4] on every impl."""
    args = (torch.zeros(2, 6, 5), torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long),
            torch.zeros(2))
    with pytest.raises(ValueError, match="temperature must be a float in"):
        eg_grpo_shaping(*args, temperature=temperature, impl=impl)


# ------------------------------------------------------------------------------------- validate=False


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("calibrate", [False, True])
def test_shaping_validate_false_marks_bad_tokens_nan(impl, calibrate, device):
    """No host read: an out-of-range target gives NaN logp/entropy there, a modality value outside -1/0/1 a NaN
    token_adv there; both are left out of the ranking, so every other output is the validated call's on the same
    inputs with those two tokens ignored (modality -1)."""
    logits, targets, modality, A = _hard_shaping_inputs(device, torch.float32, seed=80 + int(calibrate))
    bt, bm = (2, 3), (5, 0)
    t, m = targets.clone(), modality.clone()
    t[bt], m[bt] = logits.shape[-1] + 4, 1  # a read target outside the vocabulary
    m[bm], t[bm] = 3, 5  # a modality value that is no modality (its target is in range)
    out = eg_grpo_shaping(logits, t, m, A, calibrate=calibrate, impl=impl, validate=False)
    m_ok = m.clone()
    m_ok[bt] = m_ok[bm] = -1
    ref = eg_grpo_shaping(logits, targets, m_ok, A, calibrate=calibrate, impl=impl)
    assert torch.isnan(out.logp[bt]) and torch.isnan(out.entropy[bt]) and out.token_adv[bt] == 0
    assert torch.isnan(out.token_adv[bm]) and not out.low[bm] and not out.high[bm]
    assert torch.isfinite(out.logp[bm]) and torch.isfinite(out.entropy[bm])  # pass 1 read that token
    keep = torch.ones_like(m, dtype=torch.bool)
    keep[bt] = keep[bm] = False
    assert torch.equal(out.low, ref.low) and torch.equal(out.high, ref.high)
    assert torch.equal(out.token_adv[keep], ref.token_adv[keep])
    assert torch.equal(out.logp[keep], ref.logp[keep]) and torch.equal(out.entropy[keep], ref.entropy[keep])
    lp, ent = token_logprob_entropy_ref(logits[5:6, :1].double(), t[5:6, :1], normalize=True)
    assert_close(out.logp[bm].reshape(1, 1), lp, name="logp of the bad-modality token")
    assert_close(out.entropy[bm].reshape(1, 1), ent, name="entropy of the bad-modality token")


def test_shaping_validate_false_makes_no_host_read(monkeypatch, device):
    logits, targets, modality, A = _hard_shaping_inputs(device, torch.bfloat16, seed=51)
    ref = eg_grpo_shaping(logits, targets, modality, A, impl="triton")
    eg_grpo_shaping(logits, targets, modality, A, impl="triton", validate=False)  # scratch flags allocated
    events = _count_launches(monkeypatch, "token_stats_fwd_kernel", "eg_shaping_kernel")

    def forbidden(*a, **kw):
        raise AssertionError("host read of a device value")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        out = eg_grpo_shaping(logits, targets, modality, A, impl="triton", validate=False)
    assert events == ["token_stats_fwd_kernel", "eg_shaping_kernel"]
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
