"""Test-suite setup: Triton's interpreter on machines without CUDA, and the `gpu` marker.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before fastgrpo's kernel modules
are imported; conftest.py is imported by pytest before the test modules, so setting it here is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where the kernels under test run: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
