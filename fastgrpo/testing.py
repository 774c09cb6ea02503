"""The one tolerance rule, and the helpers every kernel test uses.

Rule (after flash-attention's README): compare against a float64 reference computed on the same (already
rounded) inputs, with the error measured normwise -- ``max|actual - ref| / max|ref|``:

* float32 (and float64) outputs: within ``FP32_RTOL`` = 1e-5 (kernels accumulate in fp32, so their error is
  fp32 rounding, amplified a little by reductions); where a float32 ``baseline`` is given (ill-conditioned
  inputs, e.g. attention logits in the hundreds), within twice PyTorch's own float32 error if that is larger.
* float16 / bfloat16 outputs: at most twice PyTorch's own error at that dtype (``baseline``: the same
  computation done by PyTorch in the low dtype; by default the reference rounded to that dtype, i.e. the error
  of merely storing the exact answer) plus a small absolute floor of a few ulps of the reference's scale.

Helpers: `rel_err`, `assert_close`, and `poisoned_allocations`, which makes ``torch.empty``/``empty_like`` return
NaN-filled (or extreme-integer) memory so a test can prove a kernel writes every element of its outputs.

Host-cost helpers (bench/test_bench_host.py): `stubbed_kernels` replaces the Triton kernels of some modules by stubs
that launch nothing and record each launch, so that a call's own host work (checks, allocations, launch arguments,
the autograd Function) can be timed and profiled on any machine; `dispatched_kernels` lets the compiled kernels go
through Triton's own launch path too, against a stand-in CUDA driver that records instead of launching; `aten_ops`
lists the torch ops a call dispatches (`host_reads` below lists its reads of tensor values on the host: device
syncs on a GPU).

Family-wide tests: `tiny_presets` / `tiny_flow_families` / `tiny_family_config` (every flow family with a
``configs/tiny-*.yaml`` preset, so a new family with a tiny preset is covered without editing the tests).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

FP32_RTOL = 1e-5
LOW_PRECISION_FACTOR = 2.0
_ULPS_FLOOR = 2.0


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Normwise relative error ``max|a - r| / max|r|`` in float64 (0 when both are all zero)."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)  # the oracle may live on another device
    r = reference.detach().to(device="cpu", dtype=torch.float64)
    if a.shape != r.shape:
        raise ValueError(f"shapes differ: actual {tuple(a.shape)} vs reference {tuple(r.shape)}")
    if r.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    scale = r.abs().max().item()
    err = (a - r).abs().max().item()
    if scale == 0.0:
        return err
    return err / scale


def tolerance(dtype: torch.dtype, reference: torch.Tensor, baseline: Optional[torch.Tensor] = None) -> float:
    """The allowed normwise relative error for an output of ``dtype`` against ``reference`` (float64)."""
    if dtype in (torch.float32, torch.float64):
        if baseline is None:
            return FP32_RTOL
        # Ill-conditioned inputs (logits in the hundreds): PyTorch's own float32 error may exceed FP32_RTOL.
        return max(FP32_RTOL, LOW_PRECISION_FACTOR * rel_err(baseline, reference))
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"no tolerance rule for dtype {dtype}")
    if baseline is None:
        baseline = reference.to(dtype)
    return LOW_PRECISION_FACTOR * rel_err(baseline, reference) + _ULPS_FLOOR * torch.finfo(dtype).eps


def assert_close(actual: torch.Tensor, reference: torch.Tensor, *, baseline: Optional[torch.Tensor] = None,
                 name: str = "output") -> None:
    """Assert ``actual`` meets the tolerance rule against the float64 ``reference``."""
    if reference.dtype != torch.float64:
        raise ValueError(f"reference for {name} must be float64 (the oracle), got {reference.dtype}")
    err = rel_err(actual, reference)
    tol = tolerance(actual.dtype, reference, baseline)
    if not err <= tol:
        diff = (actual.detach().to(torch.float64) - reference).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(
            f"{name}: normwise relative error {err:.3e} > tolerance {tol:.3e} ({actual.dtype}); "
            f"largest difference {diff.max().item():.3e} at index {where}"
        )


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, ``torch.empty``/``torch.empty_like`` return poisoned memory (NaN for floats, the
    dtype's minimum for integers) so that any element a kernel forgets to write shows up in the output."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(torch.iinfo(t.dtype).min)

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


class KernelLaunches(list):
    """The launches recorded by `stubbed_kernels`: the kernels' names in launch order (a list), and their grids
    (``grids``, in the same order)."""

    def __init__(self):
        super().__init__()
        self.grids = []

    def names(self) -> list:
        return list(self)

    def clear(self) -> None:
        super().clear()
        self.grids.clear()


class _StubKernel:
    """Stands in for one Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing but record its name and grid."""

    def __init__(self, name: str, log: KernelLaunches):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        log, name = self.log, self.name

        def launch(*args, **kwargs):
            log.append(name)
            log.grids.append(grid)

        return launch


@contextlib.contextmanager
def stubbed_kernels(*modules):
    """Within the block, every Triton kernel (any ``triton.jit``/autotuned object, interpreted or compiled) defined in
    ``modules`` (module objects or dotted names, e.g. ``"fastgrpo.kernels.sde_step"``) is replaced by a stub that
    launches nothing and records the kernel's name and grid in the yielded `KernelLaunches`; the kernels are
    restored on exit. The launchers look their kernels up as module globals at call time, so they call the stubs.

    What is left of a call is its host path: argument checks, output allocation, launch arguments, the autograd
    Function -- on CPU tensors (``impl="triton"`` needs ``TRITON_INTERPRET=1`` there, which only opens the backend
    check: nothing runs in the interpreter) or CUDA tensors alike. The outputs are uninitialised memory, so nothing
    about the results can be checked: check the recorded launches instead.
    """
    import importlib

    from triton.runtime.jit import KernelInterface  # imported lazily: importing triton takes seconds

    log = KernelLaunches()
    saved = []
    try:
        for mod in modules:
            mod = importlib.import_module(mod) if isinstance(mod, str) else mod
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, KernelInterface):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _StubKernel(name, log))
        yield log
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


class DispatchedLaunches(KernelLaunches):
    """The launches recorded by `dispatched_kernels` (names and grids, as `KernelLaunches`), and the kernel variants
    Triton compiled for them inside the block (`variants`)."""

    def __init__(self, kernels: dict):
        super().__init__()
        self._kernels = kernels  # name -> JITFunction

    def variants(self) -> dict:
        """{kernel name: the compiled variants in its Triton cache (CompiledKernel objects)} for the kernels
        launched so far in the block: one per specialisation Triton made (constexprs, ints it checks for 1 and
        divisibility by 16, dtypes), so a count that grows from step to step means a compile per step on a GPU."""
        return {name: list(k.device_caches[0][0].values()) for name, k in self._kernels.items()
                if 0 in k.device_caches}


class _RecordingLauncher:
    """Stands in for Triton's CUDA launcher of one compiled kernel (`dispatched_kernels`): a launch records the
    kernel's name and grid instead of calling the driver."""

    def __init__(self, log: KernelLaunches, name: str):
        self.log, self.name = log, name

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        self.log.append(self.name)
        self.log.grids.append((grid_x, grid_y, grid_z))


class _StandInCudaDriver:
    """The part of Triton's active-driver interface (Triton 3.6-3.7) that compiling and launching a ``triton.jit``
    kernel asks of the driver: an sm_90 target on device 0, stream 0, device properties (an H100/H200's shared
    memory per block), a binary "load" that hands back placeholder handles, and a launcher class that records."""

    def __init__(self, log: KernelLaunches):
        import types

        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        properties = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
        self.utils = types.SimpleNamespace(load_binary=lambda name, kernel, shared, device: (1, 1, 32, 0, 1024),
                                           get_device_properties=lambda device: dict(properties))
        self.launcher_cls = lambda src, metadata: _RecordingLauncher(log, metadata.name)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def dispatched_kernels(*modules):
    """Within the block, the compiled Triton kernels of ``modules`` (as in `stubbed_kernels`) go through Triton's
    own launch path -- argument binding and specialisation, the kernel-cache lookup, the launch metadata, and on
    first use compilation for sm_90 (``ptxas`` from Triton's bundle) -- against a stand-in CUDA driver whose
    launcher records the launch (name and grid, in the yielded `DispatchedLaunches`, which also lists the kernel
    variants compiled in the block) instead of calling the GPU.
    Nothing runs, on any device; what `stubbed_kernels` leaves out of a call's host time is then in it, up to the
    driver call itself (its argument packing in C and ``cuLaunchKernelEx``: a few us on a GPU machine).

    For machines without a GPU (bench/test_bench_host.py's "dispatched" cases): the kernels must have been
    defined without ``TRITON_INTERPRET=1`` (compiled ``triton.jit`` functions), and the caller lets
    ``impl="triton"`` take CPU tensors. Each kernel gets empty per-device caches for the block (restored after it),
    so kernels compiled here never serve a real launch, and Triton's active driver is restored on exit.
    Raises RuntimeError when a kernel is interpreted or Triton's driver interface is not the one this stands in for.
    """
    import importlib
    from collections import defaultdict

    from triton.runtime import driver as driver_config
    from triton.runtime.jit import JITFunction, KernelInterface

    by_name = {}
    for mod in modules:
        mod = importlib.import_module(mod) if isinstance(mod, str) else mod
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface):
                if not isinstance(obj, JITFunction):
                    raise RuntimeError(f"{mod.__name__}.{name} is not a plain compiled triton.jit kernel (an "
                                       "interpreted one was defined with TRITON_INTERPRET=1); dispatched_kernels "
                                       "needs those")
                by_name[name] = obj
    kernels = list(by_name.values())
    log = DispatchedLaunches(by_name)
    if not hasattr(driver_config, "_active") or not all(hasattr(k, "device_caches") for k in kernels):
        raise RuntimeError("dispatched_kernels: this Triton's driver/kernel-cache interface is not the one it "
                           "stands in for (Triton 3.6-3.7)")
    saved_driver = driver_config._active
    saved_caches = [k.device_caches for k in kernels]
    driver_config.set_active(_StandInCudaDriver(log))
    try:
        for k in kernels:
            k.device_caches = defaultdict(k.create_binder)
        yield log
    finally:
        for k, caches in zip(kernels, saved_caches):
            k.device_caches = caches
        driver_config._active = saved_driver


def aten_ops(fn) -> list:
    """The aten ops one ``fn()`` dispatches (names like ``"aten.empty.memory_format"``, in order), seen below
    autograd by a ``TorchDispatchMode`` -- including the ones the autograd engine runs in a backward on this thread
    (CPU tensors; CUDA backward work runs on the engine's device thread and is not seen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return seen


def cuda_syncs(fn) -> list:
    """Run ``fn()`` under ``torch.cuda.set_sync_debug_mode("warn")`` and return the messages of the device syncs it
    caused (from any thread), e.g. to prove a loop does not wait for the GPU per step."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's per-sync warning ("called a synchronizing CUDA operation"), not its one-off note that the debug mode
    # is a prototype
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


# Tensor methods that hand a tensor's value to the host: on CUDA each waits for the device (a sync).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def host_reads(fn) -> list:
    """Run ``fn()`` and return one ``"fastgrpo/<file>:<line> <method>"`` per call that read a tensor's value on the
    host (`HOST_READS`: ``.item()``, ``.tolist()``, ``bool``/``int``/``float``/index conversion, ``.cpu()``,
    ``.numpy()``), from any thread, whatever the tensor's device.

    A read is attributed to the innermost frame inside the ``fastgrpo`` package (this module excepted) on the
    caller's stack, with `` via <file>:<line>`` added when the read itself happens outside the package (torch,
    transformers); reads with no ``fastgrpo`` frame on the stack (the test's own) are not counted. On the CPU
    these reads cost nothing, but on CUDA each is a device sync: a CPU test proves with this that a loop does not
    read per iteration (`cuda_syncs` counts the syncs themselves on a GPU, including those a C++ op does, which
    this cannot see). The patched methods are restored when ``fn`` returns or raises."""
    import os
    import sys
    import threading

    import fastgrpo

    root = os.path.dirname(os.path.abspath(fastgrpo.__file__))
    top = os.path.dirname(root)
    me = os.path.abspath(__file__)
    found, lock = [], threading.Lock()

    def where(frame):
        via = None
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(root + os.sep) and path != me:
                here = f"{os.path.relpath(path, top)}:{frame.f_lineno}"
                return here if via is None else f"{here} via {via}"
            if via is None and path != me:
                via = f"{os.path.basename(path)}:{frame.f_lineno}"
            frame = frame.f_back
        return None

    def wrap(name, real):
        def read(self, *args, **kwargs):
            at = where(sys._getframe(1))
            if at is not None:
                with lock:
                    found.append(f"{at} {name}")
            return real(self, *args, **kwargs)

        read.__name__ = name
        return read

    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        fn()
    finally:
        for name, own in saved.items():
            if own is None:
                delattr(torch.Tensor, name)  # back to torch._C.TensorBase's method
            else:
                setattr(torch.Tensor, name, own)
    return found


# ------------------------------------------------------------------------------------------ family-wide tests
# The smallest Flow-GRPO round: 2 prompts x 2 rollouts, 2 denoising steps, one step; quiet
TINY_SIZES = {"sample": {"num_steps": 2, "prompts_per_step": 2, "group_size": 2, "batch_size": 4},
              "log": {"progress": False, "tensorboard": False}, "train": {"steps": 1}, "checkpoint": {"every": 1}}


def tiny_presets() -> dict:
    """{model.family: the data of its tiny preset} over ``configs/tiny-*.yaml`` (Flow-GRPO's when a family has
    several)."""
    from pathlib import Path

    import yaml

    from fastgrpo.train.config import preset_paths

    found = {}
    for name, path in sorted(preset_paths().items()):
        if not name.startswith("tiny-"):
            continue
        data = yaml.safe_load(Path(path).read_text())
        fam = data.get("model", {}).get("family", "sd3")
        if fam not in found or data.get("algo") == "flow_grpo":
            found[fam] = data
    return found


def tiny_flow_families() -> list:
    """The flow families of `fastgrpo.families.FAMILIES` (table order) that have a tiny preset."""
    from fastgrpo.families import FAMILIES

    tiny = tiny_presets()
    return [name for name, row in FAMILIES.items() if row.kind == "flow" and name in tiny]


def tiny_family_config(family: str, **sections):
    """Flow-GRPO at `TINY_SIZES` on the family's tiny model (its tiny preset's model, prompts and reward);
    ``sections`` update the config's sections (``model={"lora": None}``) or set top-level keys."""
    from fastgrpo.train import config_from_dict

    src = tiny_presets()[family]
    data = {"algo": "flow_grpo", "seed": 0, "model": dict(src["model"]), "reward": src.get("reward"),
            "prompts": src.get("prompts", {}), **{k: dict(v) for k, v in TINY_SIZES.items()}}
    data = {k: v for k, v in data.items() if v is not None}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return config_from_dict(data)


def tiny_clip_folder(path, *, max_length: int = 16, projection_dim: int = 8, seed: int = 0) -> tuple:
    """A random tiny CLIP (model + processor with the code-built character tokenizer, 32 px images) saved as a
    ``from_pretrained`` folder at ``path``, for the CLIP-based rewards' tests: (folder as str, model, processor)."""
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fastgrpo.diffusion.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(max_length=max_length)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(Path(path))
    proc.save_pretrained(Path(path))
    return str(path), model, proc
