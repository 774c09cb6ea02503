"""The machine's two ceilings, measured beside the kernels: a large device-to-device copy and a large bf16 GEMM.

* ``copy``: ``dst.copy_(src)`` of a 1 GiB bf16 tensor (64 MiB on CPU); bytes = read + write = 2 x its size. The
  memory-bound targets of DESIGN.md §5 ("≥ 80% of measured copy bandwidth") are set against this number.
* ``gemm``: an 8192 x 8192 x 8192 bf16 matrix product (1024 on CPU) on random data (zeros run faster);
  FLOPs = 2 n^3.

Both are checked before timing (the copy equals its source; the product matches a float64 product on a slice).
``bench/report.py`` reads them from the same results file.
"""
import pytest
import torch

from fastgrpo.testing import rel_err
from harness import HAS_CUDA, measure


@pytest.mark.parametrize("ceiling", ["copy", "gemm"])
def test_ceiling(benchmark, bench_device, ceiling):
    g = torch.Generator().manual_seed(0)
    if ceiling == "copy":
        n = (1 << 29) if HAS_CUDA else (1 << 25)  # bf16 elements: 1 GiB / 64 MiB
        src = torch.empty(n, dtype=torch.bfloat16, device=bench_device).normal_()
        dst = torch.full_like(src, float("nan"))

        def check(out):
            assert torch.equal(out, src)

        measure(benchmark, lambda: dst.copy_(src), check=check, bytes_moved=2 * src.numel() * src.element_size(),
                dtype=src.dtype, shapes={"src": tuple(src.shape)}, ceiling=ceiling, rounds=20 if HAS_CUDA else 5)
        return
    n = 8192 if HAS_CUDA else 1024
    a, b = (torch.randn(n, n, generator=g).to(device=bench_device, dtype=torch.bfloat16) for _ in range(2))

    def check(out):  # bf16 operands, fp32 accumulation: normwise error well under 1e-2 (fp32 path: ~1e-3)
        err = rel_err(out[:64], a[:64].double() @ b.double())
        assert err < 1e-2, f"gemm rows 0..63: normwise relative error {err:.2e}"

    flops = 2 * n ** 3
    measure(benchmark, lambda: a @ b, check=check, bytes_moved=3 * n * n * 2, dtype=a.dtype,
            shapes={"a": (n, n), "b": (n, n)}, ceiling=ceiling, flops=flops, rounds=20 if HAS_CUDA else 3)
    median = benchmark.extra_info.get("median_s")
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
