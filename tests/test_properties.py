"""Property-based tests (hypothesis): every public op, under every impl it has, on random valid odd-sized inputs
with edge values, against its float64 twin (the op's ``*_ref`` on float64 copies of the inputs, or a float64
formula where the ``*_ref`` keeps float32) and against the other impls.

Each op has one test parametrised over a tier: ``fast`` (a few examples, in `make test`) and ``slow`` (more
examples, ``-m slow``). Hypothesis draws the shapes, dtypes, edge-value selectors and a seed for the
``torch.Generator`` that fills the tensors.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgrpo.ops import (eg_grpo_shaping, eg_token_advantages, eg_token_masks, eg_token_masks_ref,
                          group_advantages, group_advantages_ref, grpo_token_loss, grpo_token_loss_ref, ovf_select,
                          ovf_select_ref, sde_step, sde_step_ref, text_attention_probs, text_entropy_from_probs,
                          token_logprob_entropy, token_logprob_entropy_ref, attention_with_text_entropy,
                          attention_with_text_entropy_ref)
from fastgrpo.testing import assert_close, rel_err, tolerance

# examples per op and tier: the fast tier adds a few seconds to `make test`, the slow tier runs under -m slow
EXAMPLES = {"fast": 4, "slow": 30}
SLOW_OP_EXAMPLES = {"fast": 2, "slow": 12}  # ops whose Triton path costs ~1 s per example in the interpreter
CHEAP_EXAMPLES = {"fast": 25, "slow": 200}  # impl-less ops: a few torch ops per example
TIERS = [pytest.param("fast"), pytest.param("slow", marks=pytest.mark.slow)]
IMPLS3 = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

seeds = st.integers(0, 2**31 - 1)
odd = lambda lo, hi: st.integers(lo // 2, hi // 2).map(lambda n: 2 * n + 1)  # noqa: E731  odd sizes in [lo, hi]


def _run(tier, strategy, check, cheap=False, examples=None):
    """Run ``check(case)`` on hypothesis examples of ``strategy``, as many as the tier allows."""
    n = (examples or (CHEAP_EXAMPLES if cheap else EXAMPLES))[tier]

    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def prop(case):
        check(case)

    prop()


def _f64(t):
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t


def _impls(skip=()):
    from fastgrpo import _ext

    return [i for i in IMPLS3 if i not in skip and (i != "cpp" or _ext.available())]


def _agree(outs, name, reference):
    """The impls' outputs agree with each other: ``max|a - b| / max|reference|`` within twice the float64 rule (each
    one is within the rule of the same reference)."""
    items = list(outs.items())
    scale = reference.detach().double().abs().max().item() if reference.numel() else 0.0
    for (ia, a), (ib, b) in zip(items, items[1:]):
        if a.numel() == 0:
            continue
        tol = 2 * tolerance(a.dtype, reference.double())
        err = (a.detach().double() - b.detach().double()).abs().max().item() / (scale if scale > 0 else 1.0)
        assert err <= tol, f"{name}: {ia} and {ib} differ by {err:.3e} (> {tol:.3e})"


# --------------------------------------------------------------------------------------------------- sde_step

SIGMA_MAX = 0.97


@st.composite
def sde_cases(draw):
    kind = draw(st.sampled_from(["flow_grpo", "dance", "cps", "ode"]))
    B = draw(odd(1, 5))
    rest = tuple(draw(st.lists(odd(1, 9), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    noise_level = {"flow_grpo": draw(st.sampled_from([0.7, 0.3, 1.0])), "dance": draw(st.sampled_from([0.3, 1.0])),
                   "cps": draw(st.sampled_from([0.8, 0.5, 1.0])), "ode": 0.7}[kind]
    edge = draw(st.sampled_from(["none", "sigma1", "next0", "both"]))  # which edge samples the batch holds
    per_sample = draw(st.booleans())  # [B] tensor sigmas, else python floats
    sample = draw(st.sampled_from(["noise", "prev_sample"]))
    with_ref = kind != "ode" and draw(st.booleans())
    kl_convention = draw(st.sampled_from(["flow_grpo", "exact"]))
    return dict(kind=kind, shape=(B,) + rest, dtype=dtype, noise_level=noise_level, edge=edge,
                per_sample=per_sample, sample=sample, with_ref=with_ref, kl_convention=kl_convention,
                seed=draw(seeds))


def _sde_sigmas(c, g):
    """sigma in [0.15, 0.95], sigma_next a fraction (<= 0.95) of it; the edges sigma = 1 (with sigma_max) and
    sigma_next = 0 on the first samples (cps with a KL has none at sigma_next = 0: it raises there)."""
    B = c["shape"][0]
    s = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.15
    sn = s * torch.rand(B, generator=g, dtype=torch.float64) * 0.95
    if c["edge"] in ("sigma1", "both"):
        s[0], sn[0] = 1.0, SIGMA_MAX
    if c["edge"] in ("next0", "both") and not (c["kind"] == "cps" and c["with_ref"]):
        sn[-1] = 0.0
    if not c["per_sample"]:
        return float(s[0]), float(sn[0])
    return s, sn


def _check_sde(c):
    g = torch.Generator().manual_seed(c["seed"])
    mk = lambda scale=1.0: (torch.randn(c["shape"], generator=g) * scale).to(c["dtype"])  # noqa: E731
    x, v, eps = mk(), mk(), mk()
    v_ref = (v.float() + mk(0.5).float()).to(c["dtype"]) if c["with_ref"] else None
    s, sn = _sde_sigmas(c, g)
    kw = dict(kind=c["kind"], noise_level=c["noise_level"], sigma_max=SIGMA_MAX, kl_convention=c["kl_convention"])
    extra = {}
    if c["sample"] == "noise":
        extra["noise"] = eps
    else:  # an arbitrary stored sample (one near the mean would make log_prob a difference of rounding errors)
        extra["prev_sample"] = eps.float()
    ref = sde_step_ref(_f64(x), _f64(v), _f64(s), _f64(sn), v_ref=_f64(v_ref),
                       **{k: _f64(t) for k, t in extra.items()}, **kw)
    outs = {impl: sde_step(x, v, s, sn, v_ref=v_ref, impl=impl, **extra, **kw) for impl in _impls()}
    for name in ("prev_sample", "log_prob", "mean", "std", "kl"):
        want = getattr(ref, name)
        got = {impl: getattr(o, name) for impl, o in outs.items()}
        if want is None:
            assert all(t is None for t in got.values()), name
            continue
        for impl, t in got.items():
            assert t.dtype == torch.float32 and t.shape == want.shape, (impl, name)
            assert_close(t, want, name=f"{impl} {c['kind']} {name}")
        _agree(got, name, want)
    if c["kind"] == "ode":  # deterministic: the sample is the mean, on every impl
        for o in outs.values():
            assert torch.equal(o.prev_sample, o.mean)


@pytest.mark.parametrize("tier", TIERS)
def test_sde_step_property(tier):
    _run(tier, sde_cases(), _check_sde)


# --------------------------------------------------------------------------------------- token_logprob_entropy

IGNORE = -100


@st.composite
def token_cases(draw):
    lead = tuple(draw(st.lists(odd(1, 5), min_size=1, max_size=2)))
    V = draw(st.one_of(odd(1, 9), odd(11, 301)))
    rows = draw(st.lists(st.sampled_from(["random", "very_negative", "uniform", "peaked", "ties", "ignored"]),
                         min_size=1, max_size=4))
    temperature = draw(st.one_of(st.sampled_from([1.0, 0.7, 1.5]), st.floats(0.25, 4.0)))
    return dict(lead=lead, V=V, rows=rows, temperature=temperature, normalize=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(seeds))


def _token_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    lead, V = c["lead"], c["V"]
    x = torch.randn(*lead, V, generator=g) * 3
    t = torch.randint(0, V, lead, generator=g)
    xf, tf = x.view(-1, V), t.view(-1)
    for i, kind in enumerate(c["rows"][:xf.shape[0]]):
        if kind == "very_negative":
            xf[i] = xf[i] / 3 - 1e4
        elif kind == "uniform":
            xf[i] = 0.7
        elif kind == "peaked":
            xf[i, tf[i]] += 60.0
        elif kind == "ties":  # two equal largest logits
            xf[i, 0] = xf[i, V - 1] = xf[i].max() + 1
        elif kind == "ignored":
            tf[i] = IGNORE
    return x.to(c["dtype"]), t


def _check_token(c):
    x, t = _token_inputs(c)
    kw = dict(temperature=c["temperature"], normalize=c["normalize"])
    ref_logp, ref_ent = token_logprob_entropy_ref(_f64(x).requires_grad_(True), t, **kw)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    w_lp, w_h = torch.randn(t.shape, generator=g, dtype=torch.float64), torch.randn(t.shape, generator=g,
                                                                                     dtype=torch.float64)
    logps, ents, grads = {}, {}, {}
    for impl in _impls():
        xi = x.clone().requires_grad_(True)
        logp, ent = token_logprob_entropy(xi, t, impl=impl, **kw)
        assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == t.shape
        assert_close(logp, ref_logp, name=f"{impl} logp")
        assert_close(ent, ref_ent, name=f"{impl} entropy")
        ignored = t == IGNORE
        assert torch.count_nonzero(logp[ignored]) == 0 and torch.count_nonzero(ent[ignored]) == 0
        (grads[impl],) = torch.autograd.grad((w_lp.float() * logp + w_h.float() * ent).sum(), xi)
        logps[impl], ents[impl] = logp.detach(), ent.detach()
    x64 = _f64(x).requires_grad_(True)
    rl, rh = token_logprob_entropy_ref(x64, t, **kw)
    (grad64,) = torch.autograd.grad((w_lp * rl + w_h * rh).sum(), x64)
    for impl, grad in grads.items():
        assert grad.dtype == x.dtype
        assert_close(grad, grad64, name=f"{impl} grad logits")
    _agree(logps, "logp", ref_logp.detach())
    _agree(ents, "entropy", ref_ent.detach())


@pytest.mark.parametrize("tier", TIERS)
def test_token_logprob_entropy_property(tier):
    _run(tier, token_cases(), _check_token)


# ------------------------------------------------------------------------------------ EG-GRPO shaping and masks


def _np_style_advantages64(A, H, low, high, bonus, calibrate):
    """EG-GRPO's shaped advantages in float64 from their formula (module docstring of fastgrpo.ops.eg_grpo)."""
    A, H = _f64(A).unsqueeze(1), _f64(H)
    hf, lf = high.double(), low.double()
    cap = bonus * A.abs()
    if calibrate:
        n_high = hf.sum()
        alpha = bonus * A.abs().mean() / ((H * hf).sum() / n_high) if n_high > 0 else torch.zeros(())
        b = torch.minimum(alpha * H, cap) * hf
    else:
        b = torch.minimum(cap, bonus * H) * hf
    return (A + b) * (1 - lf)


@st.composite
def shaping_cases(draw):
    B, L = draw(odd(1, 5)), draw(odd(1, 11))
    return dict(B=B, L=L, V=draw(odd(1, 41)), dtype=draw(st.sampled_from(DTYPES)),
                temperature=draw(st.sampled_from([1.0, 0.9, 2.5])), rule=draw(st.sampled_from(["released", "quantile"])),
                calibrate=draw(st.booleans()), low_frac=draw(st.sampled_from([0.2, 0.5, 0.05, 0.9])),
                high_frac=draw(st.sampled_from([0.5, 0.2, 0.95, 0.01])), bonus=draw(st.sampled_from([0.3, 0.0, 2.0])),
                ties=draw(st.booleans()), seed=draw(seeds))


def _check_shaping(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, L, V = c["B"], c["L"], c["V"]
    logits = torch.randn(B, L, V, generator=g) * 2
    if c["ties"]:  # repeated token rows: equal entropies within a segment
        logits[:, 1::2] = logits[:, :1]
    targets = torch.randint(0, V, (B, L), generator=g)
    modality = torch.randint(-1, 2, (B, L), generator=g)
    targets[torch.rand(B, L, generator=g) < 0.15] = IGNORE
    if c["ties"]:
        targets[:, 1::2] = targets[:, :1]
    A = torch.randn(B, generator=g)
    logits = logits.to(c["dtype"])
    kw = dict(temperature=c["temperature"], low_frac=c["low_frac"], high_frac=c["high_frac"], bonus=c["bonus"],
              rule=c["rule"], calibrate=c["calibrate"])
    ignored = (modality == -1) | (targets == IGNORE)
    t_eff = torch.where(ignored, torch.full_like(targets, IGNORE), targets)
    mod_eff = torch.where(ignored, torch.full_like(modality, -1), modality)
    x64 = _f64(logits).requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t_eff, temperature=c["temperature"], normalize=True)
    (grad64,) = torch.autograd.grad(ref_logp.sum(), x64)
    logps, ents = {}, {}
    for impl in _impls():
        x = logits.clone().requires_grad_(True)
        out = eg_grpo_shaping(x, targets, modality, A, impl=impl, **kw)
        assert_close(out.logp, ref_logp, name=f"{impl} logp")
        assert_close(out.entropy, ref_ent, name=f"{impl} entropy")
        # pass 2 on the entropies this impl returned (ties make the masks sensitive to the last bit)
        low, high = eg_token_masks_ref(out.entropy, mod_eff, low_frac=c["low_frac"], high_frac=c["high_frac"],
                                       rule=c["rule"])
        assert torch.equal(out.low, low) and torch.equal(out.high, high), impl
        want = _np_style_advantages64(A, out.entropy, low, high, c["bonus"], c["calibrate"]) * (~ignored)
        assert_close(out.token_adv, want, name=f"{impl} token_adv")
        (grad,) = torch.autograd.grad(out.logp.sum(), x)
        assert_close(grad, grad64, name=f"{impl} grad logits")
        assert torch.count_nonzero(out.token_adv[ignored]) == 0 and not (out.low | out.high)[ignored].any()
        logps[impl], ents[impl] = out.logp.detach(), out.entropy
    _agree(logps, "logp", ref_logp.detach())
    _agree(ents, "entropy", ref_ent.detach())


@pytest.mark.parametrize("tier", TIERS)
def test_eg_grpo_shaping_property(tier):
    _run(tier, shaping_cases(), _check_shaping, examples=SLOW_OP_EXAMPLES)


@st.composite
def mask_cases(draw):
    B, L = draw(odd(1, 5)), draw(odd(1, 33))
    return dict(B=B, L=L, levels=draw(st.sampled_from([3, 7, 1000])),  # few levels: many ties
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
                rule=draw(st.sampled_from(["released", "quantile"])),
                low_frac=draw(st.floats(0.01, 0.99)), high_frac=draw(st.floats(0.01, 0.99)), seed=draw(seeds))


def _check_masks(c):
    g = torch.Generator().manual_seed(c["seed"])
    H = (torch.randint(0, c["levels"], (c["B"], c["L"]), generator=g) / c["levels"]).to(c["dtype"])
    modality = torch.randint(-1, 2, (c["B"], c["L"]), generator=g)
    kw = dict(low_frac=c["low_frac"], high_frac=c["high_frac"], rule=c["rule"])
    want_low, want_high = eg_token_masks_ref(H, modality, **kw)
    for impl in _impls():
        if impl == "triton" and c["dtype"] == torch.float64:
            continue
        low, high = eg_token_masks(H, modality, impl=impl, **kw)
        assert torch.equal(low, want_low) and torch.equal(high, want_high), impl


@pytest.mark.parametrize("tier", TIERS)
def test_eg_token_masks_property(tier):
    _run(tier, mask_cases(), _check_masks, examples=SLOW_OP_EXAMPLES)


@st.composite
def advantage_cases(draw):
    return dict(B=draw(odd(1, 7)), L=draw(odd(1, 15)), bonus=draw(st.sampled_from([0.3, 0.0, 1.7])),
                calibrate=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                all_high=draw(st.sampled_from([None, True, False])), seed=draw(seeds))


def _check_eg_advantages(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, L = c["B"], c["L"]
    A = torch.randn(B, generator=g).to(c["dtype"])
    H = torch.rand(B, L, generator=g).to(c["dtype"])
    low = torch.rand(B, L, generator=g) < 0.3
    high = (torch.rand(B, L, generator=g) < 0.4) & ~low if c["all_high"] is None else \
        torch.full((B, L), c["all_high"])
    got = eg_token_advantages(A, H, low, high, bonus=c["bonus"], calibrate=c["calibrate"])
    assert got.dtype == torch.float32 and not got.requires_grad
    assert_close(got, _np_style_advantages64(A, H, low, high, c["bonus"], c["calibrate"]), name="token_adv")


@pytest.mark.parametrize("tier", TIERS)
def test_eg_token_advantages_property(tier):
    _run(tier, advantage_cases(), _check_eg_advantages, cheap=True)
