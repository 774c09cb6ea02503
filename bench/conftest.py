"""Fixtures of the benchmark suite; the timing harness itself is bench/harness.py."""
import pytest
import torch

from harness import HAS_CUDA


@pytest.fixture
def bench_device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
