"""ovf_select at Pro-GRPO's scale: P = 10^4 groups x G = 48 preview rewards, keep k = 12.

Five ways, each checked against the float64 torch reference before timing:
* ``triton``: one launch, one program per group (CUDA only);
* ``torch``: the vectorised torch reference (sort, prefix sums, k + 1 candidates for all groups at once);
* ``loop``: a Python loop over groups calling the reference on each row (what a per-prompt trainer loop does);
* ``cpp``: the C++ extension on CPU tensors (OpenMP over groups);
* ``compiled``: the torch reference's algorithm under torch.compile on the bench device (bench/compiled.py: the
  chosen positions by a gather instead of a boolean mask), compiled and warmed up before timing.
Brute force is out of reach at this size (C(48, 12) ~ 7e10 subsets per group); tests/test_ovf.py checks it on
small groups. Minimum bytes: read P*G rewards, write P*k int64 indices and P float32 variances.
"""
import pytest
import torch

from fastgrpo import ovf_select, ovf_select_ref
from fastgrpo.testing import assert_close
import compiled
from harness import impl_device, measure, require_cpp, require_cuda

P, G, K = 10_000, 48, 12


def _loop(rewards, k):
    outs = [ovf_select_ref(rewards[p], k) for p in range(rewards.shape[0])]
    return torch.stack([o.indices for o in outs]), torch.stack([o.variance for o in outs])


def _check(rewards, close=assert_close):
    ref = ovf_select_ref(rewards.double(), K)

    def check(result):
        indices, variance = result
        assert indices.shape == (P, K) and bool((indices.diff(dim=1) > 0).all())
        close(variance, ref.variance, name="variance")
        chosen = rewards.double().gather(1, indices).var(dim=1, unbiased=False)
        close(chosen, ref.variance, name="variance of the chosen subsets")
        # Indices equal the oracle's except at float32 near-ties (two candidates within rounding).
        assert (indices == ref.indices).all(dim=1).float().mean() > 0.999

    return check


@pytest.mark.parametrize("impl", ["triton", "torch", "compiled", "loop", "cpp"])
def test_ovf_select(benchmark, bench_device, impl):
    if impl == "triton":
        require_cuda(impl)
    if impl == "cpp":
        require_cpp()
    device = impl_device(impl, bench_device)
    g = torch.Generator().manual_seed(0)
    rewards = (torch.randn(P, G, generator=g) * 0.5 + 22.0).to(device)  # PickScore-like previews
    info, close = {}, assert_close
    if impl == "loop":
        fn = lambda: _loop(rewards, K)  # noqa: E731
        rounds, warmup = 3, 1
    elif impl == "compiled":
        fn, info = compiled.prepare(benchmark, compiled.ovf_select, rewards, K)
        rounds, warmup, close = 20, 3, compiled.assert_close
    else:
        fn = lambda: tuple(ovf_select(rewards, K, impl=impl))  # noqa: E731
        rounds, warmup = 20, 3
    measure(benchmark, fn, check=_check(rewards, close), bytes_moved=P * G * 4 + P * K * 8 + P * 4,
            dtype=torch.float32, shapes={"rewards": (P, G)}, rounds=rounds, warmup=warmup, impl=impl, k=K,
            launches=1 if impl == "triton" else None, device=device, **info)
