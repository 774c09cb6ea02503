"""attention_with_text_entropy (ours; its torch reference, and that formula under torch.compile: bench/compiled.py)
vs attention without entropy (torch SDPA, flash backend on GPU; flash-attn
when installed) vs eager attention-map extraction (softmax(QK^T) materialised, then out and the text entropy read
off the map), at SD3-512 and FLUX-1024 shapes in bf16.

* SD3-512: [B, H, S, D] with S = 1024 image + 333 text tokens (text last), H = 24, D = 64, B = 2 and 8.
* FLUX-1024: [B, S, H, D] with S = 512 text + 4096 image tokens (text first), H = 24, D = 128, B = 1 and 2.

Every case checks its output against the float64 reference on a slice (first sample, first two heads) before
timing, and records the attention FLOPs (4*B*H*S^2*D: QK^T and PV) and TFLOP/s, besides the harness's time, bytes
and peak extra memory. On a CPU the Triton and flash cases skip; the torch cases run at scaled-down sizes
(``scaled_down`` in extra_info: S/8 tokens of each kind, 4 heads).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fastgrpo import attention_with_text_entropy, attention_with_text_entropy_ref
from fastgrpo.testing import assert_close
import compiled
from harness import HAS_CUDA, measure, require_cuda

CASES = {  # name: (B, H, n_image, n_text, D, layout)
    "sd3-512-b2": (2, 24, 1024, 333, 64, "bhsd"),
    "sd3-512-b8": (8, 24, 1024, 333, 64, "bhsd"),
    "flux-1024-b1": (1, 24, 4096, 512, 128, "bshd"),
    "flux-1024-b2": (2, 24, 4096, 512, 128, "bshd"),
}
IMPLS = ["triton", "torch", "compiled", "sdpa", "flash_attn", "eager"]


def _shape(case):
    B, H, n_image, n_text, D, layout = CASES[case]
    if not HAS_CUDA:  # a CPU core cannot time the real sizes in reasonable time
        B, H, n_image, n_text = 1, 4, n_image // 8, n_text // 8
    S = n_image + n_text
    text_start = n_image if layout == "bhsd" else 0
    return B, H, S, D, layout, text_start, n_text


def _bhsd(t, layout):
    return t if layout == "bhsd" else t.transpose(1, 2)


def _eager_map_extraction(q, k, v, text_start, text_len, layout):
    """What AEGPO did: materialise the attention map, then read the output and the text entropy off it."""
    qh, kh, vh = (_bhsd(t, layout) for t in (q, k, v))
    P = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) * qh.shape[-1] ** -0.5, dim=-1)  # fp32 map
    out = (P @ vh.float()).to(v.dtype)
    pt = P[..., text_start:text_start + text_len]
    pt = pt / pt.sum(-1, keepdim=True)
    ent = -torch.special.xlogy(pt, pt).sum(-1)
    return _bhsd(out, layout), ent


def _runner(impl, q, k, v, text_start, text_len, layout):
    if impl in ("triton", "torch"):
        return lambda: attention_with_text_entropy(q, k, v, text_start=text_start, text_len=text_len,
                                                   layout=layout, impl=impl)[:2]
    if impl == "sdpa":
        def sdpa():
            qh, kh, vh = (_bhsd(t, layout) for t in (q, k, v))
            if HAS_CUDA:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return _bhsd(F.scaled_dot_product_attention(qh, kh, vh), layout), None
            return _bhsd(F.scaled_dot_product_attention(qh, kh, vh), layout), None
        return sdpa
    if impl == "flash_attn":
        from flash_attn import flash_attn_func  # [B, S, H, D]

        def flash():
            qs, ks, vs = ((t if layout == "bshd" else t.transpose(1, 2)).contiguous() for t in (q, k, v))
            out = flash_attn_func(qs, ks, vs)
            return (out if layout == "bshd" else out.transpose(1, 2)), None
        return flash
    return lambda: _eager_map_extraction(q, k, v, text_start, text_len, layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_with_text_entropy(benchmark, bench_device, impl, case):
    if impl in ("triton", "flash_attn"):
        require_cuda(impl)
    if impl == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install '.[flash-attn]' on a CUDA machine)")
    B, H, S, D, layout, text_start, text_len = _shape(case)
    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
    q, k, v = (torch.randn(shape, generator=g).to(device=bench_device, dtype=dtype) for _ in range(3))
    info, close = {}, assert_close
    if impl == "compiled":  # SDPA for out, the statistics from the whole [B, H, S, S] float32 logits at once
        fn, info = compiled.prepare(benchmark, compiled.attention_with_text_entropy, q, k, v, text_start, text_len,
                                    layout, run=lambda f: f(q, k, v, text_start, text_len, layout)[:2])
        close = compiled.assert_close
    else:
        fn = _runner(impl, q, k, v, text_start, text_len, layout)

    def check(result):
        out, ent = result
        sl = (slice(0, 1), slice(0, 2)) if layout == "bhsd" else (slice(0, 1), slice(None), slice(0, 2))
        qs, ks, vs = (t[sl] for t in (q, k, v))
        ref = attention_with_text_entropy_ref(qs.double(), ks.double(), vs.double(), text_start=text_start,
                                              text_len=text_len, layout=layout)
        qh, kh, vh = (_bhsd(t, layout) for t in (qs, ks, vs))
        baseline = _bhsd(F.scaled_dot_product_attention(qh, kh, vh), layout)
        close(out[sl], ref.out, baseline=baseline, name="out")
        if ent is not None:
            close(ent[:1, :2], ref.text_entropy, name="text_entropy")

    es = q.element_size()
    bytes_moved = 4 * q.numel() * es + (3 * B * H * S * 4 if impl in ("triton", "torch", "compiled") else 0)
    flops = 4 * B * H * S * S * D
    measure(benchmark, fn, check=check, bytes_moved=bytes_moved, dtype=dtype, shapes={"q": shape}, impl=impl,
            case=case, layout=layout, text_start=text_start, text_len=text_len, flops=flops,
            scaled_down=not HAS_CUDA, rounds=10 if HAS_CUDA else 3, warmup=2 if HAS_CUDA else 1, **info)
    median = benchmark.extra_info.get("median_s")
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
