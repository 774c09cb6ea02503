"""pytest-benchmark harness shared by every kernel benchmark (see bench/conftest.py for the fixtures).

`measure(benchmark, fn, check=..., bytes_moved=..., ...)`:
1. runs ``fn`` once and calls ``check(result)`` -- a wrong kernel is never timed;
2. warms up, then times ``fn`` with a CUDA synchronisation inside every timed call;
3. records in ``benchmark.extra_info``: device name, torch/triton/fastgrpo versions, dtype, shapes, the bytes the op
   must move at least (inputs read once, outputs written once), the median time and the achieved GB/s, and on
   CUDA the peak extra memory.

Save results with ``pytest bench/ --benchmark-json=bench/results/NAME.json``. Cases that need a GPU skip with a
reason on CPU (Triton's interpreter is a correctness tool, not something to time).
"""
from __future__ import annotations

import importlib.metadata as md
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def require_cuda(impl: str):
    if not HAS_CUDA:
        pytest.skip(f"impl={impl!r} is timed on a CUDA device only (this machine has none)")


def measure(benchmark, fn, *, check, bytes_moved: int, dtype: torch.dtype, shapes: dict, rounds: int = 20,
            warmup: int = 3, **info):
    result = fn()
    sync()
    check(result)
    del result

    def timed():
        out = fn()
        sync()
        return out

    benchmark.extra_info.update({
        "device": device_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastgrpo": _version("fastgrpo"),
        "cuda": torch.version.cuda,
        "dtype": str(dtype).replace("torch.", ""),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "bytes_moved": int(bytes_moved),
        **info,
    })
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if HAS_CUDA:
        benchmark.extra_info["peak_extra_memory_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9
