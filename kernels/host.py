"""Host-side block arithmetic of the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: called from host code they unwrap
their arguments first and cost ~2 us a call, a visible share of a launcher's host path when a call is host-bound
(bench/test_bench_host.py). These give the same integers for the non-negative ints the launchers pass.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n for n >= 1, and 0 for n = 0 (``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
