"""attention_with_text_entropy, text_attention_probs and text_entropy_from_probs against an independent float64
eager attention that materialises the softmax map: both layouts, both impls, three input dtypes, ragged lengths
(S and text_len multiples of no block), text ranges at the end (SD3), the start (FLUX) and in the middle, peaked
rows, and every bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastgrpo import (attention_with_text_entropy, attention_with_text_entropy_ref, text_attention_probs,
                      text_entropy_from_probs)
from fastgrpo.testing import assert_close, poisoned_allocations

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, H, S, D, text_start, text_len): SD3 order (text last), FLUX order (text first), text in the middle with a
# padded head dim; none of S, text_start, text_len is a multiple of a block.
CASES = {
    "text-last": (2, 3, 77, 64, 50, 27),
    "text-first": (1, 2, 101, 128, 0, 21),
    "text-mid-d40": (2, 2, 53, 40, 10, 19),
}


def _make(shape_bhsd, layout, dtype, device, seed, q_scale=1.0):
    B, H, S, D = shape_bhsd
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    return (q * q_scale).to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def _bhsd64(t, layout):
    t = t.detach().to(torch.float64)
    return t if layout == "bhsd" else t.transpose(1, 2)


def eager_attention64(q, k, v, text_start, text_len, layout, scale=None):
    """The oracle: float64 softmax map P [B, H, S, S], and everything read off it."""
    qh, kh, vh = (_bhsd64(t, layout) for t in (q, k, v))
    scale = scale if scale is not None else qh.shape[-1] ** -0.5
    logits = scale * qh @ kh.transpose(-1, -2)
    P = torch.softmax(logits, dim=-1)
    out = P @ vh
    text = slice(text_start, text_start + text_len)
    p_text = P[..., text] / P[..., text].sum(-1, keepdim=True)
    return dict(
        out=out if layout == "bhsd" else out.transpose(1, 2),
        text_entropy=-torch.special.xlogy(p_text, p_text).sum(-1),
        lse=torch.logsumexp(logits, -1),
        text_lse=torch.logsumexp(logits[..., text], -1),
        P=P,
    )


def _check_against_eager(res, q, k, v, text_start, text_len, layout):
    ref = eager_attention64(q, k, v, text_start, text_len, layout)
    assert res.out.shape == q.shape and res.out.dtype == q.dtype
    # PyTorch's own attention at this dtype on the same inputs (for float32 it only matters on ill-conditioned
    # rows: on a GPU, SDPA's float32 error on logits ~240 is ~2e-5)
    qh, kh, vh = (t if layout == "bhsd" else t.transpose(1, 2) for t in (q, k, v))
    baseline = F.scaled_dot_product_attention(qh, kh, vh)
    baseline = baseline if layout == "bhsd" else baseline.transpose(1, 2)
    assert_close(res.out, ref["out"], baseline=baseline, name="out")
    for name in ("text_entropy", "lse", "text_lse"):
        got = getattr(res, name)
        assert got.dtype == torch.float32 and got.shape == ref[name].shape, name
        assert_close(got, ref[name], name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_eager_attention(impl, dtype, layout, case, device):
    B, H, S, D, ts, tl = CASES[case]
    q, k, v = _make((B, H, S, D), layout, dtype, device, seed=list(CASES).index(case) + 10 * (layout == "bshd"))
    with poisoned_allocations():  # every output element must be written
        res = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl, layout=layout, impl=impl)
    _check_against_eager(res, q, k, v, ts, tl, layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_peaked_rows(impl, dtype, layout, device):
    """Logits in the hundreds: near one-hot rows, text entropies near 0 next to ordinary rows, and rows whose
    text keys get a vanishing share of the full softmax (the text statistics must not underflow)."""
    B, H, S, D, ts, tl = 2, 2, 70, 64, 41, 29
    q, k, v = _make((B, H, S, D), layout, torch.float32, "cpu", seed=5)
    qh = q if layout == "bhsd" else q.transpose(1, 2)
    qh[:, :, ::3] *= 30.0  # every third query: logits ~ +-240
    kh = k if layout == "bhsd" else k.transpose(1, 2)
    kh[:, :, :ts] *= 4.0  # image keys dominate the full softmax of the peaked rows
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    res = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl, layout=layout, impl=impl)
    _check_against_eager(res, q, k, v, ts, tl, layout)
    assert torch.isfinite(res.text_entropy).all() and torch.isfinite(res.text_lse).all()
    assert (res.lse - res.text_lse).max() > 50  # the text share of some rows is below e^-50


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_identity_with_values_equal_keys(impl, device):
    """DESIGN.md's identity: text_entropy = text_lse - scale * <q, softmax_text(q K_T^T) K_T> (attention over the
    text keys with V = K), evaluated in float64 from the op's own text_lse."""
    B, H, S, D, ts, tl = 2, 2, 45, 64, 0, 17
    q, k, v = _make((B, H, S, D), "bshd", torch.float32, device, seed=7)
    res = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl, layout="bshd", impl=impl)
    qh, kh = _bhsd64(q, "bshd"), _bhsd64(k, "bshd")
    kt = kh[:, :, ts:ts + tl]
    mean_key = F.scaled_dot_product_attention(qh, kt, kt)
    identity = res.text_lse.double() - D ** -0.5 * (qh * mean_key).sum(-1)
    assert_close(res.text_entropy, identity, name="text_entropy vs identity")


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_scale_and_non_contiguous_views(impl, device):
    """SD3's processor hands over transposed views of [B, S, H, D] projections; an explicit scale."""
    B, H, S, D, ts, tl = 2, 2, 39, 64, 30, 9
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(device).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    res = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl, scale=0.3, impl=impl)
    ref = eager_attention64(q, k, v, ts, tl, "bhsd", scale=0.3)
    for name in ("out", "text_entropy", "lse", "text_lse"):
        assert_close(getattr(res, name), ref[name], name=name)


def test_impls_agree_and_auto_on_cpu_is_torch():
    B, H, S, D, ts, tl = 1, 2, 33, 64, 20, 13
    q, k, v = _make((B, H, S, D), "bhsd", torch.float32, "cpu", seed=9)
    auto = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl)
    ref = attention_with_text_entropy_ref(q, k, v, text_start=ts, text_len=tl)
    for a, b in zip(auto, ref):
        assert torch.equal(a, b)


def _mixture_reference_bits(layers, text_start, text_len, query_start, query_len, layout):
    """AEGPO eq. 1-4 on float64 maps: average over layers and heads, keep queries x text keys, renormalise,
    entropy in bits per query."""
    maps = [eager_attention64(q, k, k, text_start, text_len, layout)["P"] for q, k in layers]
    avg = torch.stack(maps).mean(dim=(0, 2))  # [B, S, S]
    block = avg[:, query_start:query_start + query_len, text_start:text_start + text_len]
    prob = block / block.sum(-1, keepdim=True)
    return -(torch.special.xlogy(prob, prob) / math.log(2)).sum(-1), block * len(layers) * maps[0].shape[1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixture_over_layers_matches_eager(impl, layout, dtype, device):
    """Three layers add their head-summed text probabilities into one buffer; the buffer and the entropy of its
    renormalised rows equal the float64 eager computation from the averaged maps."""
    B, H, S, D = 2, 3, 61, 64
    ts, tl, qs, ql = (0, 19, 19, 42) if layout == "bshd" else (42, 19, 0, 42)
    layers = []
    for seed in range(3):
        q, k, _ = _make((B, H, S, D), layout, dtype, device, seed=20 + seed, q_scale=1.0 + seed)
        layers.append((q, k))
    buf = torch.zeros(B, ql, tl, device=device)
    for q, k in layers:
        lse = attention_with_text_entropy(q, k, k, text_start=ts, text_len=tl, layout=layout, impl=impl).lse
        out = text_attention_probs(q, k, lse, text_start=ts, text_len=tl, query_start=qs, query_len=ql,
                                   layout=layout, out=buf, impl=impl)
        assert out is buf
    want_bits, want_sum = _mixture_reference_bits(layers, ts, tl, qs, ql, layout)
    assert_close(buf, want_sum, name="probs_sum")
    got_bits = text_entropy_from_probs(buf) / math.log(2)
    assert got_bits.dtype == torch.float32 and got_bits.shape == (B, ql)
    assert_close(got_bits, want_bits, name="entropy bits")


@pytest.mark.parametrize("impl", IMPLS)
def test_text_probs_fresh_buffer_and_ragged_query_range(impl, device):
    B, H, S, D, ts, tl = 1, 2, 57, 40, 3, 23
    q, k, _ = _make((B, H, S, D), "bhsd", torch.float32, device, seed=31)
    lse = attention_with_text_entropy(q, k, k, text_start=ts, text_len=tl, impl=impl).lse
    got = text_attention_probs(q, k, lse, text_start=ts, text_len=tl, query_start=5, query_len=37, impl=impl)
    P = eager_attention64(q, k, k, ts, tl, "bhsd")["P"]
    assert_close(got, P[:, :, 5:42, ts:ts + tl].sum(1), name="probs")


def test_text_entropy_from_probs_is_scale_invariant_with_zeros():
    g = torch.Generator().manual_seed(4)
    p = torch.rand(3, 5, 11, generator=g, dtype=torch.float64)
    p[0, 0, :6] = 0.0  # 0 log 0 = 0
    q = p / p.sum(-1, keepdim=True)
    want = -(torch.where(q > 0, q * q.log(), 0)).sum(-1)
    assert_close(text_entropy_from_probs(p.float() * 7.0), want)
    assert text_entropy_from_probs(p).dtype == torch.float64


def test_empty_batch(device):
    q = torch.zeros(0, 2, 9, 64, device=device)
    res = attention_with_text_entropy(q, q, q, text_start=4, text_len=5, impl="triton")
    assert res.out.shape == q.shape and res.lse.shape == (0, 2, 9)


_DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where impl='triton' runs


def _bad_attention(**kw):
    args = dict(q=torch.zeros(1, 2, 10, 64), k=torch.zeros(1, 2, 10, 64), v=torch.zeros(1, 2, 10, 64),
                text_start=6, text_len=4)
    args.update(kw)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return attention_with_text_entropy(q, k, v, **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layout="bsd"), "layout must be one of"),
    (dict(q=torch.zeros(2, 10, 64)), "q must have 4 dims"),
    (dict(k=torch.zeros(1, 2, 11, 64)), "k must have the shape of q"),
    (dict(v=torch.zeros(1, 2, 10, 32)), "v must have the shape of q"),
    (dict(v=torch.zeros(1, 2, 10, 64, dtype=torch.bfloat16)), "v must have the dtype of q"),
    (dict(q=torch.zeros(1, 2, 10, 64, dtype=torch.int32)), "q must be a floating tensor"),
    (dict(text_start=10), "text_start must be in"),
    (dict(text_start=-1), "text_start must be in"),
    (dict(text_start=2.0), "text_start must be an int"),
    (dict(text_len=0), "text_len must be in"),
    (dict(text_len=5), "text_len must be in"),  # 6 + 5 > S = 10
    (dict(scale=-1.0), "scale must be a positive float"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(q=torch.zeros(1, 2, 10, 256, device=_DEV), k=torch.zeros(1, 2, 10, 256, device=_DEV),
          v=torch.zeros(1, 2, 10, 256, device=_DEV), impl="triton"), "head dim 256 is not supported by the Triton kernel"),
    (dict(q=torch.zeros(1, 2, 10, 64, requires_grad=True)), "forward-only"),
    (dict(v=torch.zeros(1, 2, 10, 64, device="meta")), "v is on meta"),
])
def test_attention_bad_input_raises_value_error_naming_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _bad_attention(**kwargs)


def test_layout_mismatch_is_caught_by_the_text_range():
    """A [B, H, S, D] tensor passed as layout='bshd' reads H as the sequence: the text range no longer fits."""
    q = torch.zeros(1, 2, 10, 64)
    with pytest.raises(ValueError, match="text_start must be in"):
        attention_with_text_entropy(q, q, q, text_start=6, text_len=4, layout="bshd")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lse=torch.zeros(1, 2, 9)), "lse must be a float32 tensor"),
    (dict(lse=torch.zeros(1, 2, 10, dtype=torch.float64)), "lse must be a float32 tensor"),
    (dict(query_start=11), "query_start must be in"),
    (dict(query_len=7), "query_len must be in"),  # 4 + 7 > 10
    (dict(text_len=0), "text_len must be in"),
    (dict(text_start=12), "text_start must be in"),
    (dict(out=torch.zeros(1, 6, 3)), "out must be a float32 tensor"),
    (dict(out=torch.zeros(1, 6, 4, dtype=torch.bfloat16)), "out must be a float32 tensor"),
    (dict(k=torch.zeros(1, 2, 10, 32)), "k must have the shape of q"),
    (dict(layout="hsd"), "layout must be one of"),
])
def test_text_probs_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = dict(q=torch.zeros(1, 2, 10, 64), k=torch.zeros(1, 2, 10, 64), lse=torch.zeros(1, 2, 10),
                text_start=0, text_len=4, query_start=4, query_len=6)
    args.update(kwargs)
    q, k, lse = args.pop("q"), args.pop("k"), args.pop("lse")
    with pytest.raises(ValueError, match=match):
        text_attention_probs(q, k, lse, **args)


def test_text_entropy_from_probs_bad_input():
    with pytest.raises(ValueError, match="probs_sum must be a floating tensor"):
        text_entropy_from_probs(torch.zeros(3, 4))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(1, 2, 10, 64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention_with_text_entropy(q, q, q, text_start=6, text_len=4, impl="triton")


def _strided_views(kind, B, H, S, D, seed):
    """q, k, v as the views issue 14 found: expanded (stride-0 dims), sliced (storage offset) and transposed."""
    g = torch.Generator().manual_seed(seed)
    if kind == "expanded":
        return tuple(torch.randn(1, 1, S, D, generator=g).expand(B, H, S, D) for _ in range(3))
    if kind == "expanded-head":
        return tuple(torch.randn(B, 1, S, D, generator=g).expand(B, H, S, D) for _ in range(3))
    if kind == "sliced":
        return tuple(torch.randn(B + 1, H, S + 3, D + 5, generator=g)[1:, :, 2:S + 2, 3:D + 3] for _ in range(3))
    if kind == "transposed-d":  # no unit stride along D: copied
        return tuple(torch.randn(B, H, D, S, generator=g).transpose(-1, -2) for _ in range(3))
    return tuple(torch.randn(S, D, B, H, generator=g).permute(2, 3, 0, 1) for _ in range(3))  # "permuted"


STRIDED = ["expanded", "expanded-head", "sliced", "transposed-d", "permuted"]


def _strided_case(kind, seed):
    """Strided q, k, v of one kind, the text block (start, length) and the float64 oracle (outputs, text probs)."""
    B, H, S, D, ts, tl = 2, 3, 9, 8, 5, 4
    q, k, v = _strided_views(kind, B, H, S, D, seed=seed)
    want = eager_attention64(q, k, v, ts, tl, "bhsd")
    return q, k, v, ts, tl, want, want["P"][:, :, :ts, ts:ts + tl].sum(1)


@pytest.mark.parametrize("kind", STRIDED)
def test_strided_views_match_the_oracle(kind):
    """Issue 14: an expanded q made impl='triton' write ``out`` with unit stride along a dim that was not D."""
    q, k, v, ts, tl, want, want_p = _strided_case(kind, seed=14)
    for impl in IMPLS:
        got = attention_with_text_entropy(q, k, v, text_start=ts, text_len=tl, impl=impl)
        assert got.out.stride(-1) == 1, impl
        for name in ("out", "text_entropy", "lse", "text_lse"):
            assert_close(getattr(got, name), want[name], name=f"{impl} {name}")
        probs = text_attention_probs(q, k, got.lse, text_start=ts, text_len=tl, query_start=0, query_len=ts,
                                     impl=impl)
        assert_close(probs, want_p, name=f"{impl} probs")


@pytest.mark.parametrize("kind", STRIDED)
def test_plan_handles_strided_views(kind):
    """The collector's planned path: expanded / sliced / transposed inputs give the public op's numbers."""
    from fastgrpo.ops.attention import TextEntropyPlan

    q, k, v, ts, tl, want, want_p = _strided_case(kind, seed=15)
    for impl in IMPLS:
        plan = TextEntropyPlan(q, k, v, layout="bhsd", text_start=ts, text_len=tl, query_start=0, query_len=ts,
                               impl=impl)
        stats = plan.new_stats()
        out, lse, text_ent = plan.attention(q, k, v, stats[:3])
        assert_close(out, want["out"], name=f"{impl} out")
        assert_close(lse, want["lse"], name=f"{impl} lse")
        assert_close(text_ent, want["text_entropy"], name=f"{impl} text_entropy")
        probs = plan.new_probs()
        plan.probs(q, k, lse, probs, accumulate=False)
        assert_close(probs, want_p, name=f"{impl} probs")


@pytest.mark.parametrize("impl", IMPLS)
def test_text_probs_refuses_overlapping_out(impl):
    q = torch.randn(2, 2, 10, 64)
    lse = attention_with_text_entropy(q, q, q, text_start=0, text_len=4, impl="torch").lse
    for out in (torch.zeros(1, 6, 4).expand(2, 6, 4), torch.zeros(2, 1, 4).expand(2, 6, 4),
                torch.zeros(2, 6, 1).expand(2, 6, 4)):
        with pytest.raises(ValueError, match="out must"):
            text_attention_probs(q, q, lse, text_start=0, text_len=4, query_start=4, query_len=6, out=out, impl=impl)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_text_entropy_from_probs_refuses_negative_nan_inf(bad):
    """Issue 14: negative entries became NaN entropies silently."""
    p = torch.rand(2, 3, 5)
    p[1, 2, 0] = bad
    with pytest.raises(ValueError, match="probs_sum must hold finite probabilities >= 0"):
        text_entropy_from_probs(p)
    assert torch.isfinite(text_entropy_from_probs(p, check=False)[0]).all()  # the collector's sync-free path
