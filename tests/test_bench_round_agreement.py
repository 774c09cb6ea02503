"""bench/test_bench_round.py's agreement check: a fast path beyond a tolerance is still timed and written (a GPU
session is too short to lose its numbers), and the test fails after every path has run."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


class _Benchmark:
    """What test_round uses of pytest-benchmark's fixture."""

    def __init__(self):
        self.extra_info = {}
        self.timed = 0

    def pedantic(self, fn, rounds, warmup_rounds=0, iterations=1):
        for _ in range(rounds):
            fn()
            self.timed += 1


@pytest.mark.slow
def test_a_path_beyond_tolerance_is_timed_then_fails(monkeypatch, tmp_path):
    import test_bench_round as rb

    partial = tmp_path / "round.json"
    monkeypatch.setenv("FASTGRPO_ROUND_PARTIAL", str(partial))
    monkeypatch.setattr(rb, "COMPILE", False)  # eager and fast_nocompile: enough for the check, half the time
    # a tolerance of 0 that nothing meets (a relative difference of exactly 0 is not < 0) and the real ones
    monkeypatch.setattr(rb, "TOLERANCES", {**rb.TOLERANCES, "grad_rel_l2": 0.0})
    bench = _Benchmark()
    with pytest.raises(AssertionError, match="fast_nocompile.*grad_rel_l2"):
        rb.test_round(bench, torch.device("cpu"), tmp_path)
    assert bench.timed == rb.ROUNDS  # the disagreeing path (the last one) was timed
    info = json.loads(partial.read_text())["benchmarks"][0]["extra_info"]
    fast = info["paths"]["fast_nocompile"]
    assert fast["agreement"]["beyond_tolerance"] == [f"grad_rel_l2 {fast['agreement']['grad_rel_l2']:.1e} >= 0"]
    assert len(fast["round_times_s"]) == rb.ROUNDS and fast["images_per_s"] > 0
    assert info["tolerances"]["grad_rel_l2"] == 0.0 and info["speedup_vs_eager"] > 0
    assert bench.extra_info["paths"]["fast_nocompile"]["agreement"] == fast["agreement"]
