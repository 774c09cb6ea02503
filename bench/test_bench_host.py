"""Host cost of the Triton launchers: each call with every Triton kernel stubbed (no device work at all).

On a GPU these calls are host-bound at the benchmark shapes (bench/results/h200*.json: a training `sde_step`
takes 0.7-1.0 ms for 0.02-0.03 ms of kernels), so the Python path around the kernels -- argument checks, the
schedule, allocations, launch arguments, the autograd Function -- is what a training loop waits for. Here that
path is timed on its own, on any machine: `fastgrpo.testing.stubbed_kernels` replaces the kernels of
``fastgrpo.kernels.sde_step`` / ``fastgrpo.kernels.token_entropy`` by stubs that launch nothing, and
`harness.measure_host` times the call (``host_us``), counts its stubbed launches and the torch ops it dispatches,
and fails before timing when a call launches other kernels than the expected ones (names and count). What is not
counted: Triton's own launch path (argument binding, cache lookup, the driver call; tens of us per launch on a
GPU), which `bench/gpu_probe.py`'s host profile shows on a GPU.

Cases (bf16 inputs, ``impl="triton"``):
* ``sde_sample``: a rollout step, ``sde_step(x, v, 0.8, 0.7, noise=noise)`` under no_grad;
* ``sde_train``: ``sde_step(x, v, 0.8, 0.7, prev_sample=prev, v_ref=v_ref)`` and ``torch.autograd.grad`` of
  ``log_prob.sum() + 0.01 * kl.sum()`` w.r.t. v (bench/test_bench_sde.py's training case, loss ops included);
  at the tiny presets' shape [8, 4, 16, 16] and SD3.5-512's [24, 16, 64, 64];
* ``token_logprob_entropy`` (forward, under no_grad) and ``eg_grpo_shaping`` (forward: masks and shaped
  advantages), at the T2I-R1 image shape [16, 576, 16384] of bench/test_bench_token.py, with the default
  ``validate=True`` (a host read of the check flag: a device sync on CUDA) and with ``validate=False``.

Every tensor has its real shape; the large ones are ``torch.empty`` (never touched: with the kernels stubbed
nothing reads them, so they cost no memory), the small ones the host reads (targets, modality, advantages) hold
real values. On CPU the tensors are CPU tensors with ``TRITON_INTERPRET=1`` set during the call (it only lets
``impl="triton"`` accept CPU tensors: no kernel runs in the interpreter); on a CUDA machine the same cases also
run on CUDA tensors (the caching allocator's cost included).
"""
import pytest
import torch

pytest.importorskip("triton", reason="the host path of the Triton launchers needs the triton package (Linux)")
import fastgrpo.kernels.sde_step  # noqa: F401,E402  imported before TRITON_INTERPRET is set: compiled on GPUs
import fastgrpo.kernels.token_entropy  # noqa: F401,E402
from fastgrpo import eg_grpo_shaping, sde_step, token_logprob_entropy  # noqa: E402
from fastgrpo.testing import stubbed_kernels  # noqa: E402
from harness import HAS_CUDA, measure_host  # noqa: E402
from test_bench_sde import SHAPES as SDE_SHAPES  # noqa: E402
from test_bench_token import SHAPES as TOKEN_SHAPES  # noqa: E402

SDE = "fastgrpo.kernels.sde_step"
TOKEN = "fastgrpo.kernels.token_entropy"
DEVICES = ["cpu", "cuda"]


@pytest.fixture
def host_device(request, monkeypatch):
    device = torch.device(request.param)
    if device.type == "cuda" and not HAS_CUDA:
        pytest.skip("the CUDA-tensor variant needs a CUDA device (this machine has none)")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl="triton" take CPU tensors; the kernels are stubs
    return device


@pytest.mark.parametrize("host_device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape_name", ["tiny", "sd35-512"])
@pytest.mark.parametrize("case", ["sde_sample", "sde_train"])
def test_host_sde_step(benchmark, host_device, case, shape_name):
    shape = SDE_SHAPES[shape_name]
    x = torch.empty(shape, dtype=torch.bfloat16, device=host_device)
    v = torch.empty_like(x)
    if case == "sde_sample":
        noise = torch.empty(shape, device=host_device)

        def fn():
            with torch.no_grad():
                return sde_step(x, v, 0.8, 0.7, noise=noise, impl="triton")

        expected = ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    else:
        v.requires_grad_(True)
        prev, v_ref = torch.empty(shape, device=host_device), torch.empty_like(x)

        def fn():
            out = sde_step(x, v, 0.8, 0.7, prev_sample=prev, v_ref=v_ref, impl="triton")
            return torch.autograd.grad(out.log_prob.sum() + 0.01 * out.kl.sum(), v)

        expected = ["sde_step_fwd_kernel", "sde_step_finish_kernel", "sde_step_bwd_kernel"]
    with stubbed_kernels(SDE) as launches:
        measure_host(benchmark, fn, launches=launches, expected=expected, op="sde_step", case=case.removeprefix("sde_"),
                     shape_name=shape_name, shapes={"x": list(shape)}, dtype="bfloat16", device=host_device)


@pytest.mark.parametrize("host_device", DEVICES, indirect=True)
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "novalidate"])
@pytest.mark.parametrize("case", ["token_logprob_entropy", "eg_grpo_shaping"])
def test_host_token(benchmark, host_device, case, validate):
    B, L, V = TOKEN_SHAPES["image"]
    g = torch.Generator().manual_seed(0)
    logits = torch.empty((B, L, V), dtype=torch.bfloat16, device=host_device)
    targets = torch.randint(0, V, (B, L), generator=g).to(host_device)
    if case == "token_logprob_entropy":
        def fn():
            with torch.no_grad():
                return token_logprob_entropy(logits, targets, impl="triton", validate=validate)

        expected = ["token_stats_fwd_kernel"]
    else:
        modality = torch.ones((B, L), dtype=torch.long, device=host_device)
        advantages = torch.randn(B, generator=g).to(host_device)

        def fn():
            with torch.no_grad():
                return eg_grpo_shaping(logits, targets, modality, advantages, impl="triton", validate=validate)

        expected = ["token_stats_fwd_kernel", "eg_shaping_kernel"]
    with stubbed_kernels(TOKEN) as launches:
        measure_host(benchmark, fn, launches=launches, expected=expected, op=case,
                     case="forward" if validate else "forward, validate=False", shape_name="image",
                     shapes={"logits": [B, L, V]}, dtype="bfloat16", device=host_device)


def test_gpu_probe_ops_section():
    """bench/gpu_probe.py's ``ops`` section records where each case's host time goes (host issue time, torch.profiler's
    CPU-side events, cProfile rows) beside its times; on CPU its smoke run (tiny shapes, host timings only) runs
    here, on CUDA the real probe is bench/gpu_session.sh's job (minutes)."""
    import gpu_probe

    if HAS_CUDA:
        pytest.skip("the full ops probe runs on a GPU through bench/gpu_session.sh probe")
    res = gpu_probe.probe_ops(None)
    assert {"sde_sample_tiny_bf16", "sde_train_tiny_bf16", "token_forward_image", "token_shaping_image"} <= res.keys()
    for name, r in res.items():
        assert r["host_issue_ms"] > 0 and r["event_ms"] > 0 and r["kernel_ms"] is None, name
        events = r["cpu_events"]  # [event, calls per call, self us per call, total us per call]
        assert 0 < len(events) <= 12 and all(len(e) == 4 and e[1] > 0 and 0 <= e[2] <= e[3] + 1e-6 for e in events)
        assert [e[2] for e in events] == sorted((e[2] for e in events), reverse=True), name
        top = r["host_profile"]  # [function, calls per call, own ms, cumulative ms]
        assert 0 < len(top) <= 12 and all(len(row) == 4 and row[2] >= 0 for row in top)
    # the training case runs the autograd engine: its backward node is among the events
    assert any("Backward" in e[0] for e in res["sde_train_tiny_bf16"]["cpu_events"])

