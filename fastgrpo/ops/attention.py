"""Joint attention that also returns the entropy of each query's attention over the text keys (AEGPO).

AEGPO (Wang et al., "AEGPO: Adaptive Entropy-Guided Policy Optimization for Diffusion Models", eq. 1-4) measures,
at each denoising step t, how the image queries of an MMDiT's joint attention spread over the T text keys::

    A_t = softmax(Q K^T / sqrt(d))                                                     (1)
    Abar_t = A_t averaged over the selected layers and heads
    Prob_t[i, tau] = Abar_t[i, tau] / sum_tau' Abar_t[i, tau']      (image query i, text key tau)   (2)
    Entropy_t[q_i] = - sum_tau Prob_t[i, tau] log2 Prob_t[i, tau]                      (3)
    Entropy(t) = mean over the N image queries of Entropy_t[q_i]                       (4)

Materialising A_t ([B, H, L, L] per layer) is what made this cost AEGPO 11% of a step and 1 GB; here it is computed
inside a flash-attention forward (DESIGN.md §3.3):

``attention_with_text_entropy(q, k, v, text_start=, text_len=)`` returns, besides ``out = softmax(s) v`` with
``s = scale * q k^T``, three float32 [B, H, S] statistics in natural log: ``lse = logsumexp_j s_j`` over all keys,
``text_lse = logsumexp_{t in text} s_t``, and ``text_entropy = -sum_t p_t log p_t`` with ``p = softmax`` over the
text keys only (the row restricted to the text keys and renormalised). Since ``log p_t = s_t - text_lse``::

    text_entropy = text_lse - E_p[s_t] = text_lse - scale * <q, softmax_text(q K_T^T) K_T>

i.e. attention over the text keys with V = K (an identity the tests check).

``text_attention_probs`` adds the full-softmax probabilities of the text keys, ``exp(s_t - lse)``, summed over
heads, into a float32 [B, N, T] buffer; several layers add into one buffer, and ``text_entropy_from_probs``
renormalises each row (the average over layers and heads is a constant factor that the renormalisation removes)
and returns its entropy: eq. 2-3 exactly ("mixture"). Averaging ``text_entropy`` over heads and layers instead
gives the cheaper "head_mean" variant (a mean of per-head entropies, not the paper's entropy of the mean).

Decisions where DESIGN.md is silent (written down here, as it asks):

* Forward only: the ops serve no-grad sampling passes (training passes keep SDPA). Inputs that require grad with
  grad mode on raise ValueError instead of silently returning outputs without gradient.
* ``text_len >= 1`` (an entropy over no keys is undefined); ``text_start + text_len <= S``.
* q, k, v share one shape and dtype (joint self-attention; no GQA). The public ops and the Triton kernels take only
  that. Cross-attention (image queries over text keys alone, Wan's ``attn2``: q [B, H, N, D], k and v [B, H, T, D])
  goes through `TextEntropyPlan` with ``cross=True``, on the torch path only: the output from SDPA (what the stock
  processor computes), the statistics from logits materialised in query chunks ([B, H, 1024, T] at a time, as for
  joint attention). The kernels are untouched (their grids and masks assume one sequence for queries and keys);
  with every key a text key, ``lse == text_lse`` and the text entropy is the row's whole entropy.
* The Triton kernel takes any head dim up to 128 (64 and 128 are the targets; others are padded to a power of
  two >= 16 with masked loads); larger head dims raise ValueError under impl="triton" (the torch path has no limit).
* The torch path computes ``out`` with ``torch.nn.functional.scaled_dot_product_attention`` (so on CPU the model
  output is exactly what diffusers computes) and the statistics from float32 logits in query chunks (memory
  O(B*H*chunk*S), never [B, H, S, S] at once; lse needs every logit anyway). With float64 inputs it runs in
  float64. Its entropy is ``-sum_t p_t (s_t - text_lse)``, a sum of terms of one sign: the identity's
  ``text_lse - E_p[s]`` subtracts two numbers of the size of the largest logit and loses ~|s_max| * 2^-24 in
  float32 on peaked rows (the kernel avoids that with its max-centred sum). The tests check the identity.
* ``text_attention_probs`` takes ``impl`` like every op (DESIGN.md's signature omits it); its ``out`` must be a
  float32 [B, query_len, text_len] tensor with unit stride along the text dim whose elements do not share memory
  (an expanded / stride-0 ``out`` raises ValueError on every impl); without ``out`` a zero buffer is returned.
* q, k, v may be any strided views: expanded (stride-0) dims, storage offsets (slices), transposes. Views without
  unit stride along D are copied; everything else is read in place. ``out`` is always a fresh non-overlapping
  tensor with unit stride along D (in q's memory order where q has one; stride-0 dims of q outermost).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._backend import check_float, check_same_device, has_internal_overlap, resolve_impl

LAYOUTS = ("bhsd", "bshd")
MAX_TRITON_HEAD_DIM = 128
_QUERY_CHUNK = 1024  # torch path: queries per chunk of materialised logits


class AttnTextEntropy(NamedTuple):
    """Result of `attention_with_text_entropy`.

    out:          softmax(scale q k^T) v, same shape, layout and dtype as q.
    text_entropy: float32 [B, H, S], nats: entropy of each row over the text keys, renormalised over them.
    lse:          float32 [B, H, S], logsumexp of each row's logits over all keys.
    text_lse:     float32 [B, H, S], logsumexp over the text keys only.
    """

    out: torch.Tensor
    text_entropy: torch.Tensor
    lse: torch.Tensor
    text_lse: torch.Tensor


# ----------------------------------------------------------------------------------------------- validation


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The logical [B, H, S, D] view of a tensor in ``layout``."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def _check_int(name: str, value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] ({what}), got {value}")
    return value


def _check_qk(q, k, layout, named_v=None):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_float("q", q)
    check_float("k", k)
    if q.ndim != 4:
        expected = "[B, H, S, D]" if layout == "bhsd" else "[B, S, H, D]"
        raise ValueError(f"q must have 4 dims {expected} for layout={layout!r}, got shape {tuple(q.shape)}")
    for name, t in (("k", k),) + ((("v", named_v),) if named_v is not None else ()):
        if name == "v":
            check_float("v", t)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} (joint self-attention), "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device([("q", q), ("k", k), ("v", named_v)])
    B, H, S, D = _bhsd(q, layout).shape
    if D == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    return B, H, S, D


def _check_scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive float (default 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _check_forward_only(*tensors):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError("q, k, v require grad: attention_with_text_entropy and text_attention_probs are "
                         "forward-only (sampling passes); run them under torch.no_grad() or on detached tensors "
                         "and keep scaled_dot_product_attention for training passes")


def _check_triton_head_dim(D):
    if D > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported by the Triton kernel (head dims 1..{MAX_TRITON_HEAD_DIM}; "
                         "64 and 128 are the tuned ones); use impl='torch'")


def _check_attention(q, k, v, text_start, text_len, scale, layout):
    B, H, S, D = _check_qk(q, k, layout, v)
    _check_forward_only(q, k, v)
    _check_int("text_start", text_start, 0, max(S - 1, 0), f"a position in the sequence of S={S} tokens")
    _check_int("text_len", text_len, 1, S - text_start,
               f"at least one text key, and text_start + text_len <= S={S}")
    return _check_scale(scale, D)


def _check_cross_attention(q, k, v, text_start, text_len, layout, impl):
    """Cross-attention for `TextEntropyPlan` (``cross=True``): q [B, H, N, D] (in ``layout``), k and v
    [B, H, T, D] of q's batch, heads, head dim, dtype and device; the text keys ``[text_start, text_start +
    text_len)`` of T. Only the torch path (the kernels take joint self-attention): ``impl="triton"`` is refused."""
    if impl == "triton":
        raise ValueError("impl='triton': the Triton kernels take joint self-attention (one sequence for q and k); "
                         "cross-attention runs the torch path (impl='auto' or 'torch')")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims ({layout}), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device([("q", q), ("k", k), ("v", v)])
    B, H, N, D = _bhsd(q, layout).shape
    kb, vb = _bhsd(k, layout).shape, _bhsd(v, layout).shape
    if kb != vb or kb[0] != B or kb[1] != H or kb[3] != D:
        raise ValueError(f"k and v must be [B, H, T, D] with q's B={B}, H={H}, D={D} (layout {layout!r}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if D == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    _check_forward_only(q, k, v)
    T = kb[2]
    _check_int("text_start", text_start, 0, max(T - 1, 0), f"a position among the T={T} keys")
    _check_int("text_len", text_len, 1, T - text_start, f"at least one text key, and text_start + text_len <= T={T}")
    return 1.0 / math.sqrt(D)


# ----------------------------------------------------------------------------------------------- reference


def _attention_torch(q, k, v, text_start, text_len, scale, layout) -> AttnTextEntropy:
    """Plain-PyTorch path on validated inputs (see the module docstring)."""
    qh, kh, vh = (_bhsd(t, layout) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    out = out if layout == "bhsd" else out.transpose(1, 2).contiguous()
    acc = torch.promote_types(q.dtype, torch.float32)
    B, H, S, _ = qh.shape
    lse = torch.empty((B, H, S), dtype=acc, device=q.device)
    text_lse, text_ent = torch.empty_like(lse), torch.empty_like(lse)
    kf = kh.to(acc)
    for c in range(0, S, _QUERY_CHUNK):
        qc = qh[:, :, c:c + _QUERY_CHUNK].to(acc)
        s = scale * (qc @ kf.transpose(-1, -2))  # [B, H, chunk, S]
        lse[:, :, c:c + _QUERY_CHUNK] = torch.logsumexp(s, dim=-1)
        s_text = s[..., text_start:text_start + text_len]
        t_lse = torch.logsumexp(s_text, dim=-1)
        log_p = s_text - t_lse[..., None]  # <= 0: the sum below has no cancellation, unlike lse - E_p[s]
        text_lse[:, :, c:c + _QUERY_CHUNK] = t_lse
        text_ent[:, :, c:c + _QUERY_CHUNK] = -(log_p.exp() * log_p).sum(-1)
    if acc != torch.float64:
        lse, text_lse, text_ent = lse.float(), text_lse.float(), text_ent.float()
    return AttnTextEntropy(out, text_ent, lse, text_lse)


def attention_with_text_entropy_ref(q, k, v, *, text_start, text_len, scale=None, layout="bhsd") -> AttnTextEntropy:
    """Plain-PyTorch twin of `attention_with_text_entropy` (benchmark baseline; float64 inputs give float64).

    ``out`` from ``scaled_dot_product_attention``; ``lse``, ``text_lse`` and ``text_entropy`` from logits
    materialised in chunks of queries, the entropy through the identity of the module docstring.
    """
    scale = _check_attention(q, k, v, text_start, text_len, scale, layout)
    return _attention_torch(q, k, v, text_start, text_len, scale, layout)


# ----------------------------------------------------------------------------------------------- public ops


def attention_with_text_entropy(q, k, v, *, text_start, text_len, scale=None, layout="bhsd",
                                impl="auto") -> AttnTextEntropy:
    """softmax(scale q k^T) v, plus each row's logsumexp and its entropy over the text keys, in one pass.

    Args:
        q, k, v: one shape and dtype (float32/float16/bfloat16), ``[B, H, S, D]`` for ``layout="bhsd"`` (SD3's
            ``JointAttnProcessor2_0``: image tokens, then text) or ``[B, S, H, D]`` for ``layout="bshd"`` (FLUX's
            ``FluxAttnProcessor``: text tokens, then image). Any strides with unit stride along D are read in
            place (others are copied).
        text_start, text_len: the text keys are positions ``[text_start, text_start + text_len)`` of S;
            ``text_len >= 1``.
        scale: logit scale, default ``1 / sqrt(D)``.
        layout: "bhsd" or "bshd".
        impl: "auto" | "triton" | "torch" (see ``fastgrpo.ops._backend``).

    Returns:
        AttnTextEntropy(out (like q), text_entropy, lse, text_lse (float32 [B, H, S], natural log)).
        Forward only: inputs that require grad raise ValueError.

    Example:
        >>> r = attention_with_text_entropy(q, k, v, text_start=1024, text_len=333)   # SD3-512, [B, H, S, D]
        >>> per_head_bits = r.text_entropy[:, :, :1024] / math.log(2)                  # image queries
    """
    scale = _check_attention(q, k, v, text_start, text_len, scale, layout)
    backend = resolve_impl(impl, q.device)
    if backend == "torch":
        return _attention_torch(q, k, v, text_start, text_len, scale, layout)
    _check_triton_head_dim(q.shape[-1])
    if q.dtype == torch.float64:
        raise ValueError("q is float64: the Triton kernel takes float32/float16/bfloat16; use impl='torch'")
    from fastgrpo.kernels.attention_entropy import attention_text_entropy_fwd

    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    qh, kh, vh = (_bhsd(unit(t), layout) for t in (q, k, v))
    out, lse, text_lse, text_ent = attention_text_entropy_fwd(qh, kh, vh, text_start, text_len, scale)
    return AttnTextEntropy(_bhsd(out, layout), text_ent, lse, text_lse)


def _check_probs(q, k, lse, text_start, text_len, query_start, query_len, scale, layout, out):
    B, H, S, D = _check_qk(q, k, layout)
    _check_forward_only(q, k)
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, S) or lse.dtype != torch.float32:
        got = f"{tuple(lse.shape)} {lse.dtype}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a float32 tensor [B, H, S] = {(B, H, S)} (attention_with_text_entropy's "
                         f"lse), got {got}")
    _check_int("text_start", text_start, 0, max(S - 1, 0), f"a position in the sequence of S={S} tokens")
    _check_int("text_len", text_len, 1, S - text_start, f"at least one text key, and text_start + text_len <= S={S}")
    _check_int("query_start", query_start, 0, S, f"a position in the sequence of S={S} tokens")
    _check_int("query_len", query_len, 0, S - query_start, f"query_start + query_len <= S={S}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != (B, query_len, text_len) \
                or out.dtype != torch.float32 or (out.numel() and out.stride(-1) != 1):
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a float32 tensor [B, query_len, text_len] = {(B, query_len, text_len)} "
                             f"with unit stride on the last dim, got {got}")
        if has_internal_overlap(out):
            raise ValueError(f"out must not overlap itself (an expanded / stride-0 view would sum every write "
                             f"into one element), got strides {tuple(out.stride())}; pass a fresh buffer")
    check_same_device([("q", q), ("lse", lse), ("out", out)])
    return _check_scale(scale, D)


def _text_probs_torch(q, k, lse, text_start, text_len, query_start, query_len, scale, layout, out):
    qh, kh = _bhsd(q, layout), _bhsd(k, layout)
    acc = torch.promote_types(q.dtype, torch.float32)
    total = torch.zeros(out.shape, dtype=acc, device=q.device)
    qs = slice(query_start, query_start + query_len)
    ks = slice(text_start, text_start + text_len)
    for h in range(qh.shape[1]):  # one head at a time: [B, N, T] of memory, never [B, H, N, T]
        s = scale * (qh[:, h, qs].to(acc) @ kh[:, h, ks].to(acc).transpose(-1, -2))
        total += torch.exp(s - lse[:, h, qs, None].to(acc))
    out += total.to(out.dtype)
    return out


def text_attention_probs_ref(q, k, lse, *, text_start, text_len, query_start, query_len, scale=None, layout="bhsd",
                             out=None) -> torch.Tensor:
    """Plain-PyTorch twin of `text_attention_probs` (one head at a time)."""
    return text_attention_probs(q, k, lse, text_start=text_start, text_len=text_len, query_start=query_start,
                                query_len=query_len, scale=scale, layout=layout, out=out, impl="torch")


def text_attention_probs(q, k, lse, *, text_start, text_len, query_start, query_len, scale=None, layout="bhsd",
                         out=None, impl="auto") -> torch.Tensor:
    """Add ``sum_h exp(scale q_i . k_t - lse[h, i])`` (full-softmax probabilities of the text keys, summed over
    heads) into ``out[b, i - query_start, t - text_start]``.

    Args:
        q, k: as in `attention_with_text_entropy` (``layout``), one shape and dtype.
        lse: float32 [B, H, S], the ``lse`` that `attention_with_text_entropy` returned for these q, k.
        text_start, text_len: the text keys ``[text_start, text_start + text_len)``.
        query_start, query_len: the queries (e.g. the image tokens) ``[query_start, query_start + query_len)``.
        scale: logit scale, default ``1 / sqrt(D)``; must be the one used for ``lse``.
        out: float32 [B, query_len, text_len] to add into (several layers share one buffer); None -> zeros.
        impl: "auto" | "triton" | "torch".

    Returns:
        ``out`` (float32 [B, query_len, text_len]). Forward only.
    """
    scale = _check_probs(q, k, lse, text_start, text_len, query_start, query_len, scale, layout, out)
    B = q.shape[0]
    if out is None:
        out = torch.zeros((B, query_len, text_len), dtype=torch.float32, device=q.device)
    backend = resolve_impl(impl, q.device)
    if backend == "torch":
        return _text_probs_torch(q, k, lse, text_start, text_len, query_start, query_len, scale, layout, out)
    _check_triton_head_dim(q.shape[-1])
    if q.dtype == torch.float64:
        raise ValueError("q is float64: the Triton kernel takes float32/float16/bfloat16; use impl='torch'")
    from fastgrpo.kernels.attention_entropy import text_probs_accumulate

    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return text_probs_accumulate(_bhsd(unit(q), layout), _bhsd(unit(k), layout), lse.contiguous(), out,
                                 query_start, query_len, text_start, text_len, scale)


def text_entropy_from_probs(probs_sum: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Entropy (nats) of each row of ``probs_sum`` [B, N, T] after renormalising it over T: float32 [B, N].

    Rows are the head- (and layer-) summed text probabilities of `text_attention_probs` (AEGPO eq. 2-3 up to
    the log base). ``0 log 0 = 0``. An all-zero row (no probability mass on the text at all) gives NaN.
    Negative, NaN or infinite entries raise ValueError naming ``probs_sum`` (they used to become NaN silently);
    the check reads the values (one host sync). ``check=False`` skips it, for callers whose buffer comes from
    `text_attention_probs` (sums of exponentials, >= 0 by construction), such as the sync-free collector.
    """
    if not isinstance(probs_sum, torch.Tensor) or probs_sum.ndim != 3 or not probs_sum.is_floating_point():
        got = tuple(probs_sum.shape) if isinstance(probs_sum, torch.Tensor) else type(probs_sum).__name__
        raise ValueError(f"probs_sum must be a floating tensor [B, N, T], got {got}")
    if check and probs_sum.numel() and not bool(((probs_sum >= 0) & (probs_sum < math.inf)).all()):
        raise ValueError("probs_sum must hold finite probabilities >= 0 (sums of text_attention_probs); "
                         "got a negative, NaN or infinite entry")
    acc = torch.promote_types(probs_sum.dtype, torch.float32)
    p = probs_sum.to(acc)
    p = p / p.sum(-1, keepdim=True)
    ent = -torch.special.xlogy(p, p).sum(-1)
    return ent if acc == torch.float64 else ent.float()


# ----------------------------------------------------------------------------------------------- repeated calls


class TextEntropyPlan:
    """`attention_with_text_entropy` + `text_attention_probs` for one fixed geometry, validated once.

    For callers that run the same q/k/v geometry many times, such as `AttentionEntropyCollector` (every selected
    layer of every forward). The constructor runs every check of the two ops on the first tensors (shapes,
    dtypes, device, text and query ranges, head dim, backend) and, on the Triton backend, precomputes the kernels'
    grids, strides and constants; the calls then pass the tensors' pointers and nothing else: no checks, no shape
    arithmetic, no views, and no device synchronisation. The caller must key its plans by everything the
    constructor saw (``key``) and call under no grad.

    Decisions:

    * ``out`` is allocated in [B, S, H, D] memory order whatever the layout (that is FLUX's layout, and the order
      of SDPA's flash output, so SD3's ``out.transpose(1, 2).reshape(B, S, H * D)`` stays a view, as after SDPA).
    * ``lse`` and the text statistics go into float32 [B, H, S] buffers the caller allocates once per forward
      (`new_stats`: one allocation) and reuses across layers (the kernels of one stream run in order); the text
      entropies can get one buffer per layer, so a per-layer reduction becomes one per forward.
    * ``probs(accumulate=False)`` writes instead of adding, so the first layer of a forward needs no zeroed buffer
      (`new_probs` is ``torch.empty``; on the torch backend it is zeroed and always added to).
    * Inputs without unit stride along D fall back to the public ops (validated per call).
    * ``cross=True``: cross-attention (k, v [B, H, T, D] with their own length T; Wan's ``attn2``), validated by
      its own check and always on the torch path (see the module docstring); the statistics and ``out`` are over q's
      N queries, the text range indexes k's T keys.
    """

    @staticmethod
    def key(q, k, v, layout, text_start, text_len, query_start, query_len, cross=False):
        base = (layout, q.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, text_start, text_len,
                query_start, query_len)
        return base + ("cross", k.shape) if cross else base

    def __init__(self, q, k, v, *, layout, text_start, text_len, query_start, query_len, impl="auto", cross=False):
        if cross:
            scale = _check_cross_attention(q, k, v, text_start, text_len, layout, impl)
        else:
            scale = _check_attention(q, k, v, text_start, text_len, None, layout)
        B, H, S, D = _bhsd(q, layout).shape
        _check_int("query_start", query_start, 0, S, f"a position in the sequence of S={S} tokens")
        _check_int("query_len", query_len, 0, S - query_start, f"query_start + query_len <= S={S}")
        self.layout, self.scale, self.impl, self.cross = layout, scale, impl, cross
        self.text_start, self.text_len, self.query_start, self.query_len = text_start, text_len, query_start, query_len
        self.stats_shape = (3, B, H, S)
        self.probs_shape = (B, query_len, text_len)
        self.device = q.device
        backend = "torch" if cross else resolve_impl(impl, q.device)
        if backend == "triton":
            _check_triton_head_dim(D)
            if q.dtype == torch.float64:
                raise ValueError("q is float64: the Triton kernel takes float32/float16/bfloat16; use impl='torch'")
            if any(t.stride(-1) != 1 for t in (q, k, v)):
                backend = "public"
        self.backend = backend
        self.empty = q.numel() == 0
        if backend != "triton":
            return
        from fastgrpo.kernels.attention_entropy import PlannedLaunches, _interpreting

        self.out_shape = (B, S, H, D)
        self.dtype = q.dtype
        # The interpreter truncates float32 -> bf16/fp16 stores: there the kernel writes float32, torch rounds.
        self.store_dtype = torch.float32 if _interpreting() else q.dtype
        logical = lambda t: tuple(_bhsd(t, layout).stride()[:3])  # noqa: E731
        out_strides = (S * H * D, D, H * D)  # logical [B, H, S] strides of a [B, S, H, D] buffer
        self.launches = PlannedLaunches((B, H, S, D), logical(q), logical(k), logical(v), out_strides, q.dtype,
                                        text_start, text_len, query_start, query_len, (query_len * text_len, text_len),
                                        scale)

    def new_stats(self, n_entropy: int = 1):
        """(lse, text_lse, text_entropy_1, ..., text_entropy_n) buffers, float32 [B, H, S] each: views of one
        float32 [2 + n, B, H, S] allocation (returned last), so several layers can keep their text entropies."""
        _, B, H, S = self.stats_shape
        base = torch.empty((2 + n_entropy, B, H, S), dtype=torch.float32, device=self.device)
        return (*base.unbind(0), base)

    def new_probs(self) -> torch.Tensor:
        """The float32 [B, query_len, text_len] buffer for `probs` (uninitialised on the Triton backend)."""
        if self.backend == "triton":
            return torch.empty(self.probs_shape, dtype=torch.float32, device=self.device)
        return torch.zeros(self.probs_shape, dtype=torch.float32, device=self.device)

    def attention(self, q, k, v, stats):
        """(out in q's layout, lse, text_entropy); on the Triton backend the statistics land in ``stats``
        (lse, text_lse, text_entropy buffers, e.g. from `new_stats`)."""
        if self.backend == "triton":
            buf = torch.empty(self.out_shape, dtype=self.store_dtype, device=self.device)
            lse, text_lse, text_ent = stats
            if not self.empty:
                self.launches.attention(q, k, v, buf, lse, text_lse, text_ent)
            if self.store_dtype != self.dtype:
                buf = buf.to(self.dtype)
            return (buf.transpose(1, 2) if self.layout == "bhsd" else buf), lse, text_ent
        if self.backend == "torch":
            res = _attention_torch(q, k, v, self.text_start, self.text_len, self.scale, self.layout)
        else:
            res = attention_with_text_entropy(q, k, v, text_start=self.text_start, text_len=self.text_len,
                                              layout=self.layout, impl=self.impl)
        return res.out, res.lse, res.text_entropy

    def probs(self, q, k, lse, out, accumulate: bool) -> None:
        """Add (or, on the Triton backend with ``accumulate=False``, write) the head-summed text probabilities of
        the queries into ``out`` (from `new_probs`)."""
        if self.backend == "triton":
            if not self.empty:
                self.launches.probs(q, k, lse, out, accumulate)
        elif self.backend == "torch":
            _text_probs_torch(q, k, lse, self.text_start, self.text_len, self.query_start, self.query_len,
                              self.scale, self.layout, out)
        else:
            text_attention_probs(q, k, lse, text_start=self.text_start, text_len=self.text_len,
                                 query_start=self.query_start, query_len=self.query_len, layout=self.layout, out=out,
                                 impl=self.impl)
