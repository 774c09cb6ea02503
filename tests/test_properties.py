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
                          token_logprob_entropy, token_logprob_entropy_ref, tree_advantages, tree_advantages_ref,
                          attention_with_text_entropy, attention_with_text_entropy_ref)
from fastgrpo.testing import assert_close, rel_err, tolerance

# examples per op and tier: the fast tier adds a few seconds to `make test`, the slow tier runs under -m slow
EXAMPLES = {"fast": 4, "slow": 20}
SLOW_OP_EXAMPLES = {"fast": 2, "slow": 8}  # ops whose Triton path costs ~1 s per example in the interpreter
CHEAP_EXAMPLES = {"fast": 25, "slow": 120}  # impl-less ops: a few torch ops per example
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


def _assert_entropy_close(actual, reference, vocab: int, normalize: bool, name: str) -> None:
    """Token entropies within 1e-5 of their scale: the largest entropy a row can have (log V, or 1 normalised).
    The normwise rule of `assert_close` is relative to the largest entropy present, and a batch of peaked rows
    has entropies near 0 where float32's cancellation in ``logsumexp - sum p z`` (absolute error ~ eps * |z|)
    is all there is (found by this test: V = 3, T = 0.5, H = 2e-4, |diff| = 2e-8)."""
    import math

    scale = max(float(reference.abs().max()) if reference.numel() else 0.0, 1.0 if normalize else math.log(vocab))
    err = float((actual.detach().double() - reference).abs().max()) if reference.numel() else 0.0
    assert err <= 1e-5 * scale, f"{name}: max |diff| {err:.3e} > 1e-5 x {scale:.3g} (the entropy's scale)"


def _assert_logp_close(actual, reference, logits, temperature: float, name: str) -> None:
    """Token log-probs by the normwise rule, at least at the size of the terms they are computed from: a row
    peaked on its target has logp = z_t / T - logsumexp(z / T) ~ -1e-13, a difference of numbers of size
    max|z| / T, where float32 (or float64) rounding alone is ~1e-12 (found: V = 3, a peaked row, T = 2)."""
    size = float(logits.double().abs().max()) / temperature if logits.numel() else 0.0
    if float(reference.detach().abs().max() if reference.numel() else 0.0) >= 1e-3 * size:
        assert_close(actual, reference, name=name)
        return
    err = float((actual.detach().double() - reference.detach()).abs().max())
    assert err <= tolerance(actual.dtype, reference.detach().double()) * size, f"{name}: {err:.3e} at size {size:.3g}"


def _impls(skip=()):
    from fastgrpo import _ext

    return [i for i in IMPLS3 if i not in skip and (i != "cpp" or _ext.available())]


def _agree(outs, name, reference, scale=None):
    """The impls' outputs agree with each other: ``max|a - b| / scale`` within twice the float64 rule (each one is
    within the rule of the same reference); ``scale`` defaults to ``max|reference|`` (entropies pass theirs: a
    batch of peaked rows has entropies near 0, `_assert_entropy_close`)."""
    items = list(outs.items())
    if scale is None:
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
    # PyTorch's own float32 evaluation of the formula: a one-element log-prob is a sum of terms that can cancel to
    # ~1e-5 of their size (found: cps, shape (1, 1), |log_prob| 9e-6), where float32 itself is off by more than
    # FP32_RTOL of the result; the rule then allows twice float32's own error (`fastgrpo.testing.tolerance`).
    f32 = lambda t: t if not torch.is_tensor(t) else t.float()  # noqa: E731
    base = sde_step_ref(f32(x), f32(v), f32(s), f32(sn), v_ref=f32(v_ref), **{k: f32(t) for k, t in extra.items()},
                        **kw)
    outs = {impl: sde_step(x, v, s, sn, v_ref=v_ref, impl=impl, **extra, **kw) for impl in _impls()}
    for name in ("prev_sample", "log_prob", "mean", "std", "kl"):
        want = getattr(ref, name)
        got = {impl: getattr(o, name) for impl, o in outs.items()}
        if want is None:
            assert all(t is None for t in got.values()), name
            continue
        for impl, t in got.items():
            assert t.dtype == torch.float32 and t.shape == want.shape, (impl, name)
            assert_close(t, want, baseline=getattr(base, name), name=f"{impl} {c['kind']} {name}")
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
        _assert_logp_close(logp, ref_logp, x, c["temperature"], f"{impl} logp")
        _assert_entropy_close(ent, ref_ent, x.shape[-1], c["normalize"], f"{impl} entropy")
        ignored = t == IGNORE
        assert torch.count_nonzero(logp[ignored]) == 0 and torch.count_nonzero(ent[ignored]) == 0
        (grads[impl],) = torch.autograd.grad((w_lp.float() * logp + w_h.float() * ent).sum(), xi)
        logps[impl], ents[impl] = logp.detach(), ent.detach()
    x64 = _f64(x).requires_grad_(True)
    rl, rh = token_logprob_entropy_ref(x64, t, **kw)
    (grad64,) = torch.autograd.grad((w_lp * rl + w_h * rh).sum(), x64)
    # The gradient's natural size, |w| / T per entry (d logp / d z = (onehot - p) / T; the entropy's is as large):
    # rows that are all peaked on their targets have gradients of ~1e-46 (found: V = 3, T = 0.5), where the
    # normwise rule measures denormal noise; there the error is taken relative to the natural size.
    natural = float((w_lp.abs() + w_h.abs()).max()) / c["temperature"] if t.numel() else 0.0
    for impl, grad in grads.items():
        assert grad.dtype == x.dtype
        if float(grad64.abs().max()) >= 1e-3 * natural:
            assert_close(grad, grad64, name=f"{impl} grad logits")
        else:
            err = float((grad.double() - grad64).abs().max())
            assert err <= tolerance(grad.dtype, grad64) * natural, f"{impl} grad logits: {err:.3e}, size {natural:.3g}"
    size = float(x.double().abs().max()) / c["temperature"] if x.numel() else 0.0  # see _assert_logp_close
    _agree(logps, "logp", ref_logp.detach(),
           scale=max(float(ref_logp.abs().max()) if ref_logp.numel() else 0.0, 1e-3 * size))
    _agree(ents, "entropy", ref_ent.detach(),
           scale=max(float(ref_ent.abs().max()) if ref_ent.numel() else 0.0,
                     1.0 if c["normalize"] else math.log(x.shape[-1])))


@pytest.mark.parametrize("tier", TIERS)
def test_token_logprob_entropy_property(tier):
    _run(tier, token_cases(), _check_token)


# ------------------------------------------------------------------------------------ EG-GRPO shaping and masks


def _np_style_advantages64(A, H, low, high, bonus, calibrate, with_terms=False):
    """EG-GRPO's shaped advantages in float64 from their formula (module docstring of fastgrpo.ops.eg_grpo).
    ``with_terms``: also ``|A| + |b|`` per token (0 on low tokens), the scale of the float32 rounding of ``A + b``."""
    A, H = _f64(A).unsqueeze(1), _f64(H)
    hf, lf = high.double(), low.double()
    cap = bonus * A.abs()
    if calibrate:
        n_high = hf.sum()
        alpha = bonus * A.abs().mean() / ((H * hf).sum() / n_high) if n_high > 0 else torch.zeros(())
        b = torch.minimum(alpha * H, cap) * hf
    else:
        b = torch.minimum(cap, bonus * H) * hf
    out = (A + b) * (1 - lf)
    return (out, (A.abs() + b.abs()) * (1 - lf)) if with_terms else out


def _assert_advantages_close(got, A, H, low, high, bonus, calibrate, keep=None, name="token_adv"):
    """float32 ``A + b`` against the float64 formula, token by token, within 32 float32 ulps of ``|A| + |b|``: the
    sum cancels when ``b`` is close to ``-A`` (a negative advantage and a bonus near its cap), so an error relative
    to the output's own size is not a fair rule (found by the slow tier: B = 1, calibrated bonus 1.7, an output of
    0.0033 off by 3.5e-8). ``b`` takes a handful of roundings (the bonus in float32, two means over at most a few
    hundred tokens, a product, a ratio); 32 ulps bounds them with room, and a wrong formula is off by O(|A|).
    ``keep``: a bool mask of the tokens to compare with the formula; the others must be 0."""
    want, terms = _np_style_advantages64(A, H, low, high, bonus, calibrate, with_terms=True)
    if keep is not None:
        want, terms = want * keep, terms * keep
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got.double() - want).abs()
    bound = 32 * torch.finfo(torch.float32).eps * terms
    assert bool((diff <= bound).all()), (f"{name}: |diff| {float(diff.max()):.3e} beyond 32 ulps of |A| + |b| at "
                                         f"{tuple(int(i) for i in torch.nonzero(diff - bound == (diff - bound).max())[0])}")


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
        _assert_entropy_close(out.entropy, ref_ent, logits.shape[-1], True, f"{impl} entropy")
        # pass 2 on the entropies this impl returned (ties make the masks sensitive to the last bit)
        low, high = eg_token_masks_ref(out.entropy, mod_eff, low_frac=c["low_frac"], high_frac=c["high_frac"],
                                       rule=c["rule"])
        assert torch.equal(out.low, low) and torch.equal(out.high, high), impl
        _assert_advantages_close(out.token_adv, A, out.entropy, low, high, c["bonus"], c["calibrate"],
                                 keep=~ignored, name=f"{impl} token_adv")
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
    _assert_advantages_close(got, A, H, low, high, c["bonus"], c["calibrate"])


@pytest.mark.parametrize("tier", TIERS)
def test_eg_token_advantages_property(tier):
    _run(tier, advantage_cases(), _check_eg_advantages, cheap=True)


# --------------------------------------------------------------------------------------------------- attention


@st.composite
def attention_cases(draw):
    S = draw(odd(1, 41))
    text_start = draw(st.one_of(st.just(0), st.just(S - 1), st.integers(0, S - 1)))
    text_len = draw(st.one_of(st.just(1), st.just(S - text_start), st.integers(1, S - text_start)))
    query_start = draw(st.integers(0, S))
    query_len = draw(st.integers(0, S - query_start))
    return dict(B=draw(odd(1, 3)), H=draw(odd(1, 3)), S=S, D=draw(odd(1, 33)), text_start=text_start,
                text_len=text_len, query_start=query_start, query_len=query_len,
                layout=draw(st.sampled_from(["bhsd", "bshd"])), dtype=draw(st.sampled_from(DTYPES)),
                q_scale=draw(st.sampled_from([1.0, 0.0, 8.0])), scale=draw(st.sampled_from([None, 0.5])),
                seed=draw(seeds))


def _check_attention(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, S, D = c["B"], c["H"], c["S"], c["D"]
    shape = (B, H, S, D) if c["layout"] == "bhsd" else (B, S, H, D)
    q = (torch.randn(shape, generator=g) * c["q_scale"]).to(c["dtype"])  # q_scale 0: uniform rows; 8: peaked
    k, v = (torch.randn(shape, generator=g).to(c["dtype"]) for _ in range(2))
    kw = dict(text_start=c["text_start"], text_len=c["text_len"], scale=c["scale"], layout=c["layout"])
    ref = attention_with_text_entropy_ref(_f64(q), _f64(k), _f64(v), **kw)
    bh = (lambda t: t) if c["layout"] == "bhsd" else (lambda t: t.transpose(1, 2))
    baseline = bh(torch.nn.functional.scaled_dot_product_attention(bh(q), bh(k), bh(v), scale=c["scale"]))
    results = {}
    # Text entropies by the token entropies' rule (`_assert_entropy_close`), at the scale of the largest entropy
    # over text_len keys: peaked rows (q_scale 8) have entropies near 0 next to larger ones, where float32 carries
    # no more digits (found by this test: S = 3, D = 11, entropies from 8e-6 to 3e-2, the plain float32 formula
    # 1.5e-5 normwise from float64, as the torch path).
    ent_vocab = max(c["text_len"], 2)
    ent_scale = max(float(ref.text_entropy.abs().max()) if ref.text_entropy.numel() else 0.0, math.log(ent_vocab))
    for impl in _impls(skip=("cpp",)):
        res = attention_with_text_entropy(q, k, v, impl=impl, **kw)
        assert res.out.shape == q.shape and res.out.dtype == q.dtype
        assert_close(res.out, ref.out, baseline=baseline, name=f"{impl} out")
        _assert_entropy_close(res.text_entropy, ref.text_entropy, ent_vocab, False, f"{impl} text_entropy")
        for name in ("lse", "text_lse"):
            assert_close(getattr(res, name), getattr(ref, name), name=f"{impl} {name}")
        results[impl] = res
    for name in ("text_entropy", "lse", "text_lse"):
        _agree({i: getattr(r, name) for i, r in results.items()}, name, getattr(ref, name),
               scale=ent_scale if name == "text_entropy" else None)
    # text_attention_probs: sum over heads of the full-softmax probabilities of the text keys, in float64
    qs = slice(c["query_start"], c["query_start"] + c["query_len"])
    ts = slice(c["text_start"], c["text_start"] + c["text_len"])
    sc = c["scale"] if c["scale"] is not None else D ** -0.5
    lse = results["torch"].lse
    logits = sc * bh(_f64(q))[:, :, qs] @ bh(_f64(k))[:, :, ts].transpose(-1, -2)
    want = torch.exp(logits - _f64(lse)[:, :, qs, None]).sum(1)
    probs = {}
    for impl in _impls(skip=("cpp",)):
        out = torch.full((B, c["query_len"], c["text_len"]), 0.25)  # added into
        got = text_attention_probs(q, k, lse, query_start=c["query_start"], query_len=c["query_len"], out=out,
                                   impl=impl, **kw)
        assert got is out
        assert_close(got, want + 0.25, name=f"{impl} text probs")
        probs[impl] = got
    _agree(probs, "text probs", want + 0.25)


@pytest.mark.parametrize("tier", TIERS)
def test_attention_property(tier):
    _run(tier, attention_cases(), _check_attention)


@st.composite
def probs_cases(draw):
    return dict(B=draw(odd(1, 3)), N=draw(odd(1, 9)), T=draw(odd(1, 9)), zeros=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                scale=draw(st.sampled_from([1.0, 1e-3, 7.0])), seed=draw(seeds))


def _check_entropy_from_probs(c):
    g = torch.Generator().manual_seed(c["seed"])
    p = torch.rand(c["B"], c["N"], c["T"], generator=g) * c["scale"]
    if c["zeros"]:  # 0 log 0 = 0; every row keeps one positive entry
        p[..., 1:][torch.rand(p[..., 1:].shape, generator=g) < 0.5] = 0
        p[..., 0] += c["scale"] * 0.1
    p = p.to(c["dtype"])
    got = text_entropy_from_probs(p)
    assert got.dtype == torch.float32 and got.shape == p.shape[:2]
    want = text_entropy_from_probs(_f64(p))  # the float64 twin
    q = _f64(p) / _f64(p).sum(-1, keepdim=True)
    assert_close(want, -torch.special.xlogy(q, q).sum(-1), name="float64 twin vs formula")
    assert_close(got, want, name="entropy")


@pytest.mark.parametrize("tier", TIERS)
def test_text_entropy_from_probs_property(tier):
    _run(tier, probs_cases(), _check_entropy_from_probs, cheap=True)


# --------------------------------------------------------------------------------------------------- ovf_select


@st.composite
def ovf_cases(draw):
    G = draw(odd(1, 25))
    k = draw(st.one_of(st.just(1), st.just(G), st.just(max(1, G // 2)), st.integers(1, G)))
    return dict(P=draw(st.integers(0, 4)), G=G, k=k, one_group=draw(st.booleans()),
                values=draw(st.sampled_from(["ints", "equal", "dyadic", "random"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                seed=draw(seeds))


def _check_ovf(c):
    g = torch.Generator().manual_seed(c["seed"])
    P, G, k = (1 if c["one_group"] else c["P"]), c["G"], c["k"]
    if c["values"] == "ints":  # small integers: ties everywhere, exact sums
        r = torch.randint(-3, 4, (P, G), generator=g).float()
    elif c["values"] == "equal":
        r = torch.full((P, G), 0.75)
    elif c["values"] == "dyadic":
        r = torch.randint(-64, 64, (P, G), generator=g) / 16.0
    else:
        r = torch.randn(P, G, generator=g) * 5
    r = r.to(c["dtype"])
    if c["one_group"]:
        r = r[0]
    exact = c["values"] != "random"  # exact scores: every impl follows the tie rule to the index
    ref = ovf_select_ref(_f64(r), k)
    rows = _f64(r).reshape(-1, G)
    for impl in _impls():
        out = ovf_select(r, k, impl=impl)
        assert out.indices.shape == ref.indices.shape and out.indices.dtype == torch.int64
        assert out.variance.dtype == torch.float32 and out.variance.shape == ref.variance.shape
        idx = out.indices.reshape(-1, k)
        assert (idx[:, 1:] > idx[:, :-1]).all() and ((idx >= 0) & (idx < G)).all(), impl  # ascending, distinct
        if exact:
            assert torch.equal(out.indices, ref.indices), impl
        picked = rows.gather(1, idx).var(dim=1, unbiased=False) if rows.numel() else rows.new_zeros(0)
        # the chosen subset is optimal (its float64 variance is the best one) and its variance is returned
        assert_close(picked, ref.variance.reshape(-1), name=f"{impl} variance of the chosen subset")
        assert_close(out.variance.reshape(-1), ref.variance.reshape(-1), name=f"{impl} variance")


@pytest.mark.parametrize("tier", TIERS)
def test_ovf_select_property(tier):
    _run(tier, ovf_cases(), _check_ovf)


# ------------------------------------------------------------------------------------------ group_advantages


@st.composite
def advantage_group_cases(draw):
    ragged = draw(st.booleans())
    ddof = draw(st.sampled_from([0, 1]))
    std = draw(st.sampled_from(["group", "global"]))
    if ragged:
        sizes = draw(st.lists(st.integers(ddof + 1 if std == "group" else 1, 9), min_size=1, max_size=5))
        if std == "global" and sum(sizes) <= ddof:
            sizes[0] += 1
    else:
        sizes = [draw(odd(ddof + 1, 11))] * draw(st.integers(1, 4))
    return dict(sizes=sizes, ragged=ragged, ddof=ddof, std=std, R=draw(st.sampled_from([None, 1, 3])),
                eps=draw(st.sampled_from([1e-4, 1e-8, 0.5])), clip=draw(st.sampled_from([None, 5.0, 0.5])),
                aggregate=draw(st.sampled_from(["rewards", "advantages"])), constant=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])), seed=draw(seeds))


def _check_group_advantages(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, R = sum(c["sizes"]), c["R"]
    r = torch.randn((N,) if R is None else (N, R), generator=g) * 3
    if c["constant"]:  # one constant group: advantages 0 there, not NaN
        r[:c["sizes"][0]] = 1.5
    r = r.to(c["dtype"])
    kw = dict(std=c["std"], ddof=c["ddof"], eps=c["eps"], clip=c["clip"], aggregate=c["aggregate"])
    if R is not None:
        kw["weights"] = torch.rand(R, generator=g).tolist()
    if c["ragged"]:
        kw["group_sizes"] = c["sizes"]
        rr = r
    else:
        P, G = len(c["sizes"]), c["sizes"][0]
        rr = r.view(P, G) if R is None else r.view(P, G, R)
    got = group_advantages(rr, **kw)
    want = group_advantages_ref(_f64(rr), **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert_close(got, want, name="advantages")
    if c["clip"] is not None:
        assert got.abs().max() <= c["clip"]


@pytest.mark.parametrize("tier", TIERS)
def test_group_advantages_property(tier):
    _run(tier, advantage_group_cases(), _check_group_advantages, cheap=True)


# ------------------------------------------------------------------------------------------- tree_advantages


@st.composite
def tree_cases(draw):
    branching = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4).filter(lambda b: math.prod(b) <= 64))
    return dict(branching=branching, P=draw(st.integers(0, 4)), one_tree=draw(st.booleans()),
                ddof=draw(st.sampled_from([0, 1])), eps=draw(st.sampled_from([1e-8, 1e-4, 0.0])),
                min_std=draw(st.sampled_from([1e-6, 0.0, 0.1])),
                scale=draw(st.sampled_from([1.0, 1e-9, 1e6])), constant=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                seed=draw(seeds))


def _check_tree_advantages(c):
    g = torch.Generator().manual_seed(c["seed"])
    b, L = c["branching"], math.prod(c["branching"])
    P = 1 if c["one_tree"] else c["P"]
    eps = c["eps"] if (c["eps"] > 0 or c["min_std"] > 0) else 1e-8
    r = torch.randn(P, L, generator=g, dtype=torch.float64) * c["scale"] + 3 * c["scale"]
    if c["constant"] and P:  # one constant subtree (the first node of the first split): 0 there at every depth
        r[0, :L // b[0]] = 2 * c["scale"]
    if c["dtype"] in (torch.float16, torch.bfloat16):
        r = r / c["scale"]  # keep half-precision values finite
    r = r.to(c["dtype"])
    if c["layout"] == "transposed":
        r = r.t().contiguous().t()
    elif c["layout"] == "expanded" and P:
        r = r[:1].expand(P, L)
    rr = r[0] if c["one_tree"] else r
    kw = dict(ddof=c["ddof"], eps=eps, min_std=c["min_std"])
    got = tree_advantages(rr, b, **kw)
    want = tree_advantages_ref(_f64(rr), b, **kw)
    assert len(got) == len(want) == len(b)
    # A depth whose nodes are all equal has advantages (r - mean) / (std + eps) of rounding noise, |r| * ulp / eps
    # (found: branching [1, 3, 4], a constant tree at 1e-9: one path gives 4e-17, the other 0). Below that size the
    # two paths are compared absolutely.
    noise = 64 * torch.finfo(torch.float64 if c["dtype"] == torch.float64 else torch.float32).eps * (
        float(_f64(rr).abs().max()) if rr.numel() else 0.0) / max(eps, c["min_std"])  # std >= min_std or 0
    for a, w in zip(got, want):
        assert a.shape == w.shape and a.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
        assert torch.isfinite(a).all()
        # the two float64 paths differ by rounding only; near the min_std threshold they may pick different sides
        # (never in these draws: the spreads are far from it)
        if w.numel() and float(w.abs().max()) <= noise:
            assert float((a.double() - w).abs().max()) <= noise, "tree advantages of equal nodes: not rounding noise"
        else:
            assert_close(a, w, name="tree advantages")


@pytest.mark.parametrize("tier", TIERS)
def test_tree_advantages_property(tier):
    _run(tier, tree_cases(), _check_tree_advantages, cheap=True)


# ------------------------------------------------------------------------------------------- grpo_token_loss


@st.composite
def loss_cases(draw):
    return dict(B=draw(odd(1, 5)), L=draw(odd(1, 13)), clip_eps=draw(st.sampled_from([None, 0.2, 0.01])),
                beta=draw(st.sampled_from([0.0, 0.01, 1.0])), with_ref=draw(st.booleans()),
                mask=draw(st.sampled_from(["bool", "float", "none_in"])), poison=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), seed=draw(seeds))


def _check_loss(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["B"], c["L"])
    mk = lambda scale=1.0: (torch.randn(shape, generator=g) * scale - 2).to(c["dtype"])  # noqa: E731
    logp, ref_lp = mk(), mk()
    old = (logp.float() + 0.3 * torch.randn(shape, generator=g)).to(c["dtype"])
    adv = torch.randn(shape, generator=g).to(c["dtype"])
    keep = torch.rand(shape, generator=g) < 0.7
    if c["mask"] == "none_in":
        keep[:] = False
    mask = keep if c["mask"] == "bool" or c["mask"] == "none_in" else \
        torch.where(keep, torch.rand(shape, generator=g) * 0.9 + 0.1, torch.zeros(shape))
    if c["poison"]:  # masked-out tokens may hold NaN/inf (padding) and change nothing
        for t, val in ((logp, float("nan")), (old, float("inf")), (ref_lp, -float("inf")), (adv, float("nan"))):
            t[~keep] = val
    kw = dict(clip_eps=c["clip_eps"], beta=c["beta"])
    ref_lp = ref_lp if c["with_ref"] else None
    x = logp.clone().requires_grad_(True)
    loss, stats = grpo_token_loss(x, old, ref_lp, adv, mask, **kw)
    x64 = _f64(logp).requires_grad_(True)
    loss64, stats64 = grpo_token_loss_ref(x64, _f64(old), _f64(ref_lp), _f64(adv), _f64(mask) if mask.is_floating_point()
                                          else mask, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the loss is a mean of terms of both signs: its error is measured against the mean of their magnitudes
    m, lp64, A = _f64(mask).nan_to_num(0), torch.where(keep, x64.detach(), 0), torch.where(keep, _f64(adv), 0)
    ratio = torch.exp(lp64 - torch.where(keep, _f64(old), 0)) if c["clip_eps"] is not None else torch.ones_like(m)
    kl = 0
    if ref_lp is not None:
        d = torch.where(keep, _f64(ref_lp), 0) - lp64
        kl = torch.exp(d) - d - 1
    scale = ((ratio * A.abs() + c["beta"] * kl) * m).sum() / m.sum().clamp_min(1)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(scale.item(), abs(loss64.item())) + 1e-30, \
        (loss.item(), loss64.item(), scale.item())
    for name in ("kl", "ratio", "clip_fraction"):
        assert stats[name].dtype == torch.float32 and torch.isfinite(stats[name])
        assert abs(stats[name].item() - stats64[name].item()) <= 1e-5 * max(1.0, abs(stats64[name].item())), name
    (grad,) = torch.autograd.grad(loss, x)
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[~keep]) == 0
    assert_close(grad, grad64, name="grad logp")


@pytest.mark.parametrize("tier", TIERS)
def test_grpo_token_loss_property(tier):
    _run(tier, loss_cases(), _check_loss, cheap=True)
