"""sde_step: fused (Triton, C++) vs the torch eager reference and its torch.compile (bench/compiled.py), at SD3.5-512,
FLUX-1024 and Wan2.1-480p video latent shapes.

Two cases:
* ``sample``: a rollout step -- read x, v, noise; write prev_sample, mean (fp32).
* ``train``: forward + backward of a training step -- read x, v, prev_sample, v_ref; write mean (fp32) and
  grad v; the loss uses log_prob and kl.
Minimum bytes count every input read once and every output written once.

The C++ path (``impl="cpp"``) runs on CPU tensors, at the full shapes (a few million elements: CPU-sized already).
``impl="compiled"``: Flow-GRPO's formula (kind="flow_grpo") under torch.compile on the bench device, compiled and
warmed up before timing (bench/compiled.py).
"""
import pytest
import torch

from fastgrpo import sde_step, sde_step_ref
from fastgrpo.testing import assert_close
import compiled
from harness import impl_device, measure, require_cpp, require_cuda

SHAPES = {
    "tiny": (8, 4, 16, 16),  # the tiny presets' latents (8K elements): the per-call host cost dominates (issue 20)
    "sd35-512": (24, 16, 64, 64),  # B=24 latents of SD3.5 at 512 px
    "flux-1024": (12, 4096, 64),  # B=12 packed FLUX latents at 1024 px
    # B=1 video latent of Wan2.1-T2V-1.3B at 480x832 px, 81 frames: [B, 16, (81-1)/4+1, 480/8, 832/8] (2.1 M elements)
    "wan21-480p": (1, 16, 21, 60, 104),
}
IMPLS = ["torch", "compiled", "triton", "cpp"]
SIGMA, SIGMA_NEXT, NOISE_LEVEL = 0.8, 0.7, 0.7


def _inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: torch.randn(shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(), mk(), mk(), mk()


def _f64(t):
    return t.detach().double()


def _case(impl, bench_device, shape_name):
    """(device, comparison, shape) of one case; skips an impl this machine cannot run."""
    if impl == "triton":
        require_cuda(impl)
    if impl == "cpp":
        require_cpp()
    close = compiled.assert_close if impl == "compiled" else assert_close
    return impl_device(impl, bench_device), close, SHAPES[shape_name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_sample(benchmark, bench_device, impl, dtype, shape_name):
    device, close, shape = _case(impl, bench_device, shape_name)
    x, v, noise, _ = _inputs(shape, dtype, device)
    noise = noise.float()
    info = {}
    if impl == "compiled":
        compiled.only_in_correctness_runs_at(benchmark, device, shape_name == "sd35-512" and dtype == torch.bfloat16,
                                             "sd35-512 bf16")
        c = compiled.sde_coefficients(SIGMA, SIGMA_NEXT, NOISE_LEVEL)
        fn, info = compiled.prepare(benchmark, compiled.sde_sample, x, v, noise, c["cx"], c["cv"], c["std"],
                                    c["inv_2var"], c["log_norm"])
    else:
        fn = lambda: sde_step(x, v, SIGMA, SIGMA_NEXT, noise=noise, impl=impl)  # noqa: E731

    def check(out):
        prev, log_prob = (out[0], out[2]) if impl == "compiled" else (out.prev_sample, out.log_prob)
        ref = sde_step_ref(_f64(x), _f64(v), SIGMA, SIGMA_NEXT, noise=_f64(noise))
        close(prev, ref.prev_sample, name="prev_sample")
        close(log_prob, ref.log_prob, name="log_prob")

    n, es = x.numel(), x.element_size()
    measure(benchmark, fn, check=check, bytes_moved=n * (2 * es + 4 + 4 + 4), dtype=dtype,
            shapes={"x": shape}, impl=impl, case="sample", shape_name=shape_name, device=device, **info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_train_fwd_bwd(benchmark, bench_device, impl, dtype, shape_name):
    device, close, shape = _case(impl, bench_device, shape_name)
    x, v, prev, v_ref = _inputs(shape, dtype, device)
    prev = prev.float()
    v = v.requires_grad_(True)
    info = {}
    if impl == "compiled":
        compiled.only_in_correctness_runs_at(benchmark, device, shape_name == "sd35-512" and dtype == torch.bfloat16,
                                             "sd35-512 bf16")
        c = compiled.sde_coefficients(SIGMA, SIGMA_NEXT, NOISE_LEVEL)
        args = (x, v, prev, v_ref, c["cx"], c["cv"], c["inv_2var"], c["log_norm"], c["inv_2sd2"])

        def run(step):
            _, log_prob, kl = step(*args)
            (g,) = torch.autograd.grad(log_prob.sum() + 0.01 * kl.sum(), v)
            return (log_prob, kl), g

        fn, info = compiled.prepare(benchmark, compiled.sde_train, *args, run=run)
    else:
        def fn():
            out = sde_step(x, v, SIGMA, SIGMA_NEXT, prev_sample=prev, v_ref=v_ref, impl=impl)
            (g,) = torch.autograd.grad(out.log_prob.sum() + 0.01 * out.kl.sum(), v)
            return (out.log_prob, out.kl), g

    def check(res):
        (log_prob, kl), g = res
        v64 = _f64(v).requires_grad_(True)
        ref = sde_step_ref(_f64(x), v64, SIGMA, SIGMA_NEXT, prev_sample=_f64(prev), v_ref=_f64(v_ref))
        (g64,) = torch.autograd.grad(ref.log_prob.sum() + 0.01 * ref.kl.sum(), v64)
        close(log_prob, ref.log_prob, name="log_prob")
        close(kl, ref.kl, name="kl")
        close(g, g64, name="grad v")

    n, es = x.numel(), x.element_size()
    measure(benchmark, fn, check=check, bytes_moved=n * (3 * es + 4 + 4 + es), dtype=dtype,
            shapes={"x": shape}, impl=impl, case="train", shape_name=shape_name, device=device, **info)
