"""Backend choice and input checks shared by every op.

`impl` is one of:
* ``"auto"``   -- Triton for CUDA tensors, the C++ extension for CPU tensors when it is built, else torch.
* ``"triton"`` -- the Triton kernel; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set
  before the first kernel is imported, as the test suite does).
* ``"torch"``  -- the plain PyTorch reference (`*_ref`).
* ``"cpp"``    -- the C++ extension `fastgrpo._C`, built on first use (ValueError when it is disabled with
  ``FASTGRPO_BUILD_EXT=0`` or its build failed; see ``fastgrpo._ext``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Sequence

import torch

IMPLS = ("auto", "triton", "torch", "cpp")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (looked up once per process: it is asked on every op call)."""
    return importlib.util.find_spec("triton") is not None


def cpp_available() -> bool:
    """True when the extension `fastgrpo._C` is usable; builds it (once, cached) on the first call."""
    from fastgrpo import _ext

    return _ext.available()


def kernel_module(backend: str, triton_module: str):
    """The launchers of one op for a resolved backend: the C++ extension (same launcher names and arguments as
    the Triton module), or the Triton module itself (imported lazily: importing triton costs seconds)."""
    if backend == "cpp":
        from fastgrpo import _ext

        return _ext.load()
    return sys.modules.get(triton_module) or importlib.import_module(triton_module)


def usable_backends() -> dict[str, bool]:
    """Which backends work in this process (reported by `fastgrpo env`)."""
    cuda = torch.cuda.is_available()
    return {
        "triton": triton_available() and (cuda or triton_interpreting()),
        "cpp": cpp_available(),
        "torch": True,
    }


def resolve_impl(impl: str, device: torch.device, *, has_cpp: bool = False) -> str:
    """Turn ``impl`` into the backend that will run for tensors on ``device``.

    ``has_cpp`` says whether the op has a C++ kernel at all (so "auto" may pick it).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = device.type == "cuda"
    if impl == "auto":
        if on_cuda and triton_available():
            return "triton"
        if not on_cuda and has_cpp and cpp_available():
            return "cpp"
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package, which is not installed")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                f"impl='triton' got tensors on {device}: Triton kernels need CUDA tensors, or Triton's interpreter "
                "on CPU (set TRITON_INTERPRET=1 before fastgrpo's kernels are first used)"
            )
        return "triton"
    if impl == "cpp":
        if not has_cpp:
            raise ValueError("impl='cpp': this op has no C++ kernel yet; use 'auto', 'triton' or 'torch'")
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs the C++ CPU kernels and got tensors on {device}; move them to the "
                             "CPU or use 'auto'")
        if not cpp_available():
            from fastgrpo import _ext

            raise ValueError(f"impl='cpp': the C++ extension fastgrpo._C is not usable ({_ext.failure_reason()}); "
                             "use 'auto' or 'torch' (see csrc/README.md)")
        return "cpp"
    return "torch"


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {t.dtype}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` share memory (a stride-0 / expanded dim, or strides that interleave).

    Sufficient test for non-overlap: sorted by stride, each dim of size > 1 must step past everything the
    smaller-strided dims span. Tensors it calls overlapping that in fact are not (exotic interleavings) are refused
    too, which is safe for an output buffer."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 0  # elements spanned by the dims seen so far, minus one
    for st, sz in dims:
        if st <= span:
            return True
        span += st * (sz - 1)
    return False


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_same_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    """All given tensors on one device; returns it."""
    present = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; put them on one device")
    return first.device
