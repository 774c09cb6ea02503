"""pytest-benchmark harness shared by every kernel benchmark (see bench/conftest.py for the fixtures).

`measure(benchmark, fn, check=..., bytes_moved=..., ...)`:
1. runs ``fn`` once and calls ``check(result)`` -- a wrong kernel is never timed;
2. warms up, then times ``fn`` (on CPU with glibc keeping freed buffers for the next call, `_warm_allocator`: no
   implementation is timed page-faulting fresh outputs) with a CUDA synchronisation inside every timed call (pytest-benchmark's table: host
   time per call, launch overhead included);
3. on CUDA, also times the device work with CUDA events (`device_times`: ``triton.testing.do_bench``, L2 flushed
   before each call, so data that fits in the 50 MB L2 is not read from cache) -- ``median_s`` is that median and
   ``q20_s``/``q80_s`` its spread; on CPU ``median_s`` is pytest-benchmark's median;
4. records in ``benchmark.extra_info``: device name, torch/triton/fastgrpo versions, dtype, shapes, the bytes the op
   must move at least (inputs read once, outputs written once), the median time and the achieved GB/s, and the
   peak extra memory of one call (`peak_extra_memory`).

Save results with ``pytest bench/ --benchmark-json=bench/results/NAME.json``. Cases that need a GPU skip with a
reason on CPU (Triton's interpreter is a correctness tool, not something to time).
"""
from __future__ import annotations

import gc
import os
import importlib.metadata as md
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


_DRIVER: list = []


def driver_version() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), None without CUDA or nvidia-smi."""
    if not HAS_CUDA:
        return None
    if not _DRIVER:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            _DRIVER.append(out[0] if out else None)
        except (OSError, subprocess.SubprocessError):
            _DRIVER.append(None)
    return _DRIVER[0]


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


def require_cpp():
    """The C++ kernels (CPU): skip with the reason when the extension is disabled or did not build."""
    from fastgrpo import _ext

    if not _ext.available():
        pytest.skip(f"impl='cpp' needs the C++ extension fastgrpo._C: {_ext.failure_reason()}")


def impl_device(impl: str, bench_device: torch.device) -> torch.device:
    """The C++ kernels run on CPU tensors; everything else on the bench device."""
    return torch.device("cpu") if impl == "cpp" else bench_device


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _fixed_mmap_threshold() -> bool:
    """Make glibc serve every allocation of 64 KiB or more with its own mmap, returned to the OS on free.

    glibc's default threshold grows after large frees, after which big buffers are carved from the heap and stay
    resident when freed: the peak RSS of a later call would then not grow however much it allocates. Setting the
    threshold explicitly turns that adjustment off, so the RSS follows torch's CPU allocations (torch's CPU
    allocator does not cache). Returns False where this is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


_MMAP_FIXED = _fixed_mmap_threshold() if platform.system() == "Linux" else False
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter


def _warm_allocator(on: bool) -> None:
    """Timing (``on``): glibc keeps freed buffers of any size in its heap for the next call (mmap threshold and trim
    threshold 1 GiB), the steady state of a training loop (glibc's own threshold grows after large frees), so no
    implementation is timed page-faulting fresh outputs: torch and torch.compile get what the C++ ops' output cache
    gives them. Off: back to `_fixed_mmap_threshold` for `peak_extra_memory`. ``FASTGRPO_BENCH_ALLOCATOR=cold``
    keeps `_fixed_mmap_threshold` throughout: every large output freshly mapped (the peak-memory pass of the CPU
    table: after a warm timing, freed memory that glibc keeps in its arenas hides later calls' peaks)."""
    if not _MMAP_FIXED or os.environ.get("FASTGRPO_BENCH_ALLOCATOR", "warm") == "cold":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 30) if on else 128 * 1024)
    libc.mallopt(_M_MMAP_THRESHOLD, (1 << 30) if on else 64 * 1024)
    if not on:
        libc.malloc_trim(0)  # return what the timing kept, so the peak measurement starts from the real resident set


def peak_extra_memory(fn, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` call beyond what was allocated before it.

    On CUDA: the growth of ``torch.cuda.max_memory_allocated`` over the memory allocated before the call. On CPU:
    the growth of the process's peak resident set (``VmHWM`` in /proc/self/status, reset to the current RSS
    through /proc/self/clear_refs just before the call), which sees every page the call touches; large buffers
    are mmapped and unmapped on free (`_fixed_mmap_threshold`), so earlier calls do not hide them, and the C++ ops'
    output cache is emptied first for the same reason. None where /proc is not writable or the allocator cannot be
    set up that way.
    """
    gc.collect()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    if not _MMAP_FIXED:
        return None
    from fastgrpo import _ext

    if _ext.available():  # the C++ ops' output cache keeps freed blocks resident: release them, so a call's own
        _ext.load().empty_cache()  # blocks count in its peak (`FASTGRPO_CPU_CACHE_MB`)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    except OSError:
        return None

    def rss(field):
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(field))
        return int(line.split()[1]) * 1024

    base = rss("VmRSS:")
    out = fn()
    peak = rss("VmHWM:") - base
    del out
    return max(0, int(peak))


def measure(benchmark, fn, *, check, bytes_moved: int, dtype: torch.dtype, shapes: dict, rounds: int = 20,
            warmup: int = 3, device: torch.device | None = None, **info):
    device = device or torch.device("cuda" if HAS_CUDA else "cpu")
    result = fn()
    sync()
    check(result)
    del result
    peak = peak_extra_memory(fn, device)

    def timed():
        out = fn()
        sync()
        return out

    benchmark.extra_info.update({
        "device": device_name() if device.type == "cuda" or not HAS_CUDA else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastgrpo": _version("fastgrpo"),
        "cuda": torch.version.cuda,
        "driver": driver_version() if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "bytes_moved": int(bytes_moved),
        "peak_extra_memory_bytes": peak,
        **info,
    })
    _warm_allocator(True)
    try:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        _warm_allocator(False)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # absent under --benchmark-disable
        return
    median = stats.stats.median
    benchmark.extra_info.update(host_median_s=median, timing="host clock, synchronised (pytest-benchmark)")
    if device.type == "cuda":
        times = device_times(fn, host_median_s=median)
        if times is not None:
            median = times["median_s"]
            benchmark.extra_info.update(times)
    benchmark.extra_info["median_s"] = median
    benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9


def device_times(fn, *, host_median_s: float, rep_ms: int = 200) -> dict | None:
    """Device time of ``fn`` from CUDA events (``triton.testing.do_bench``: L2 flushed before every call, ~rep_ms
    of repetitions): median and the 20th/80th percentiles, in seconds. Calls that take over 0.25 s on the host (a
    Python loop over groups, say) keep their host timing: None."""
    if host_median_s > 0.25:
        return None
    from triton.testing import do_bench

    times = sorted(do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e-3  # noqa: E731
    return {"median_s": q(0.5), "q20_s": q(0.2), "q80_s": q(0.8), "device_reps": len(times),
            "timing": "CUDA events (triton.testing.do_bench, L2 flushed before each call)"}


def measure_host(benchmark, fn, *, launches, expected: list, device: torch.device, rounds: int = 300, warmup: int = 30,
                 **info):
    """Time the host path of ``fn``, a call whose Triton kernels are stubbed (`fastgrpo.testing.stubbed_kernels`,
    which yields ``launches``) or dispatched to a stand-in driver (`fastgrpo.testing.dispatched_kernels`, the same):
    nothing runs on a device, so what is timed is Python, argument checks, allocations and autograd (and, dispatched,
    Triton's launch path) -- the part of a call that a GPU waits for when the call is host-bound.

    Results cannot be checked (the outputs are uninitialised memory); instead one call must launch exactly the
    kernels ``expected`` (names, in order) -- an added launch fails the benchmark before anything is timed. Records
    in ``benchmark.extra_info``: ``host_us`` (median of the timed calls, with glibc keeping freed buffers for the
    next call as a CUDA caching allocator would, `_warm_allocator`), ``kernel_launches`` and ``launched`` (the
    stubbed launches of one call), ``aten_ops`` and ``aten_op_counts`` (the torch ops one call dispatches,
    `fastgrpo.testing.aten_ops`), ``host_reads`` (its reads of tensor values into Python, `fastgrpo.testing.host_reads`:
    device syncs with CUDA tensors), plus the machine and versions; ``device`` (where the call's tensors live) names
    the machine as `measure` does ("cpu x{threads}" for CPU tensors, so GPU tables leave the CPU cases out).
    """
    from collections import Counter

    from fastgrpo.testing import aten_ops, host_reads

    fn()  # first call: lazy imports and caches
    launches.clear()
    ops = aten_ops(fn)
    got = launches.names()
    assert got == list(expected), f"the call launched {got}, expected {list(expected)}"
    launches.clear()
    reads = host_reads(fn)
    launches.clear()
    benchmark.extra_info.update({
        "device": device_name() if device.type == "cuda" or not HAS_CUDA else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "triton": _version("triton"), "fastgrpo": _version("fastgrpo"),
        "cuda": torch.version.cuda, "driver": driver_version() if device.type == "cuda" else None,
        "kernel_launches": len(got), "launched": got, "aten_ops": len(ops), "aten_op_counts": dict(Counter(ops)),
        "host_reads": reads,
        "timing": "host clock, Triton kernels stubbed (fastgrpo.testing.stubbed_kernels)", **info,
    })

    def timed():
        out = fn()
        launches.clear()  # keep the record from growing over the rounds
        return out

    _warm_allocator(True)
    try:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        _warm_allocator(False)
    sync()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["host_us"] = stats.stats.median * 1e6
