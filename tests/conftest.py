"""Test-suite setup: Triton's interpreter on machines without CUDA, one CPU thread, and the `gpu` marker.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before fastgrpo's kernel modules
are imported; conftest.py is imported by pytest before the test modules, so setting it here is early enough.
"""
import contextlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# The suite runs tiny models and small tensors: one intra-op thread, here and in the processes tests start (unless
# OMP_NUM_THREADS says otherwise). With torch's default (a thread per core) a busy 2-core machine loses a factor of
# 15-30 to oversubscription.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpp_extension_or_skip(request):
    """Tests parametrised with impl="cpp" need the C++ extension: it builds on first use (once per session,
    cached across sessions); when it cannot build (FASTGRPO_BUILD_EXT=0, no compiler) they skip and say why.
    `make test` builds it first and fails loudly, so in CI they run."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "cpp":
        from fastgrpo import _ext

        if not _ext.available():
            pytest.skip(f"the C++ extension fastgrpo._C is not usable: {_ext.failure_reason()}")


@pytest.fixture
def device(request):
    """Where the kernels under test run: CUDA when present, else CPU (Triton interpreter); the C++ kernels
    (impl="cpp") always run on CPU."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "cpp":
        return torch.device("cpu")
    return torch.device("cuda" if HAS_CUDA else "cpu")


@contextlib.contextmanager
def _fresh_extension_state(monkeypatch):
    """Within the block the loader starts afresh (and forgets an imported fastgrpo._C); afterwards the outcome
    of this session's real load is restored, without building again."""
    from fastgrpo import _ext

    saved_state = dict(_ext._state)
    saved_module = sys.modules.get(_ext.MODULE)
    with monkeypatch.context() as m:
        m.delitem(sys.modules, _ext.MODULE, raising=False)
        _ext._state.update(done=False, module=None, reason=None, build_s=None, where=None)
        try:
            yield m
        finally:
            _ext._state.clear()
            _ext._state.update(saved_state)
    if saved_module is not None:
        sys.modules[_ext.MODULE] = saved_module


@pytest.fixture
def cpp_fresh(monkeypatch):
    """Context manager yielding a monkeypatch context in which the loader starts afresh (see above)."""
    return lambda: _fresh_extension_state(monkeypatch)


@pytest.fixture
def cpp_disabled(monkeypatch):
    """Context manager: the extension disabled by FASTGRPO_BUILD_EXT=0 within the block."""

    @contextlib.contextmanager
    def disabled():
        with _fresh_extension_state(monkeypatch) as m:
            m.setenv("FASTGRPO_BUILD_EXT", "0")
            yield

    return disabled


@pytest.fixture
def cpp_build_fails(monkeypatch):
    """Context manager: within the block, building the extension fails with the given compiler message."""
    from fastgrpo import _ext

    @contextlib.contextmanager
    def failing(message):
        def broken_build(verbose=False):
            raise RuntimeError(message)

        with _fresh_extension_state(monkeypatch) as m:
            m.delenv("FASTGRPO_BUILD_EXT", raising=False)
            m.setattr(_ext, "_build", broken_build)
            yield

    return failing
