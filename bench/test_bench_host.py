"""Host cost of the Triton launchers: each call with its Triton kernels stubbed or only dispatched (no device
work at all).

On a GPU these calls are host-bound at the benchmark shapes (bench/results/h200*.json: a training `sde_step`
takes 0.7-1.0 ms for 0.02-0.03 ms of kernels), so the Python path around the kernels -- argument checks, the
schedule, allocations, launch arguments, the autograd Function -- is what a training loop waits for. Here that
path is timed on its own, on any machine: `fastgrpo.testing.stubbed_kernels` replaces the kernels of
``fastgrpo.kernels.sde_step`` / ``fastgrpo.kernels.token_entropy`` by stubs that launch nothing, and
`harness.measure_host` times the call (``host_us``), counts its stubbed launches and the torch ops it dispatches,
and fails before timing when a call launches other kernels than the expected ones (names and count). Stubbed,
Triton's own launch path (argument binding and specialisation, cache lookup, launch metadata) is not counted, so
each case on CPU tensors runs a second time "dispatched" (`fastgrpo.testing.dispatched_kernels`): the compiled
kernels go through that path against a stand-in CUDA driver whose launcher records the launch. What neither
counts is the driver call itself, which `bench/gpu_probe.py`'s host profile shows on a GPU.

Cases (bf16 inputs, ``impl="triton"``):
* ``sde_sample``: a rollout step, ``sde_step(x, v, 0.8, 0.7, noise=noise)`` under no_grad;
* ``sde_train``: ``sde_step(x, v, 0.8, 0.7, prev_sample=prev, v_ref=v_ref)`` and ``torch.autograd.grad`` of
  ``log_prob.sum() + 0.01 * kl.sum()`` w.r.t. v (bench/test_bench_sde.py's training case, loss ops included);
  at the tiny presets' shape [8, 4, 16, 16] and SD3.5-512's [24, 16, 64, 64];
* ``token_logprob_entropy`` (forward, under no_grad) and ``eg_grpo_shaping`` (forward: masks and shaped
  advantages), at the T2I-R1 image shape [16, 576, 16384] of bench/test_bench_token.py, with the default
  ``validate=True`` (a host read of the check flag: a device sync on CUDA) and with ``validate=False``.
* ``AttentionEntropyCollector`` (AEGPO): the collector's own host work around one no-grad transformer forward
  of SD3.5-Medium's structure (24 joint blocks, 1,041 modules; ``layers`` 5, 10, 15, "mixture"): the forward's
  hooks, the three selected layers' attention (`_attend`: plan look-up, output allocation, two launches each) and
  Entropy(t) at the end -- the rest of the forward is diffusers' own, the same with or without the collector.
  ``constructed_each_time``: constructed, entered and exited around the forward, as bench/test_bench_collector.py
  times it; ``entered_once``: one collector for many forwards, as AEGPO uses it (a probe trajectory's steps). The
  model's widths are tiny (its module tree is what the constructor walks); q, k, v have SD3.5-Medium's 24 heads
  x 64 at batch 2, with SD3.5's 1024 image + 333 text tokens in bf16 on CUDA tensors and 16 + 12 in float32 on
  CPU tensors (there Entropy(t) at the end of the forward is real arithmetic on the [B, image, text] buffer, which
  a GPU runs asynchronously, and bf16 would add an output conversion that only Triton's interpreter needs).

Every tensor has its real shape (but the collector's on CPU, above); the large ones are ``torch.empty`` (never
touched: with the kernels stubbed nothing reads them, so they cost no memory), the small ones the host reads
(targets, modality, advantages) hold real values. On CPU the tensors are CPU tensors with ``TRITON_INTERPRET=1`` set
during the call (it only lets ``impl="triton"`` accept CPU tensors: no kernel runs in the interpreter); on a CUDA
machine the same cases also run on CUDA tensors (the caching allocator's cost included).
"""
import contextlib
import statistics

import pytest
import torch

pytest.importorskip("triton", reason="the host path of the Triton launchers needs the triton package (Linux)")
from triton.runtime.jit import JITFunction  # noqa: E402
import fastgrpo.kernels.sde_step  # noqa: F401,E402  imported before TRITON_INTERPRET is set: compiled on GPUs
import fastgrpo.kernels.token_entropy  # noqa: F401,E402
import fastgrpo.kernels.attention_entropy  # noqa: F401,E402
from fastgrpo import eg_grpo_shaping, sde_step, token_logprob_entropy  # noqa: E402
from fastgrpo.ops import _backend  # noqa: E402
from fastgrpo.testing import dispatched_kernels, stubbed_kernels  # noqa: E402
from harness import HAS_CUDA, measure_host  # noqa: E402
from test_bench_collector import _inputs as collector_inputs  # noqa: E402
from test_bench_sde import SHAPES as SDE_SHAPES  # noqa: E402
from test_bench_token import SHAPES as TOKEN_SHAPES  # noqa: E402

SDE = "fastgrpo.kernels.sde_step"
TOKEN = "fastgrpo.kernels.token_entropy"
ATTENTION = "fastgrpo.kernels.attention_entropy"
DEVICES = ["cpu", "cuda"]


@pytest.fixture
def host_device(request, monkeypatch):
    device = torch.device(request.param)
    if device.type == "cuda" and not HAS_CUDA:
        pytest.skip("the CUDA-tensor variant needs a CUDA device (this machine has none)")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl="triton" take CPU tensors; the kernels are stubs
    return device


KERNELS = ["stubbed", "dispatched"]
# `dispatched_kernels` needs compiled kernels: none when TRITON_INTERPRET=1 was set before they were defined
_INTERPRETED = not isinstance(fastgrpo.kernels.sde_step.sde_step_fwd_kernel, JITFunction)
NO_DISPATCH = (HAS_CUDA or _INTERPRETED,
               "a CUDA machine runs Triton's real launch path (bench/gpu_probe.py)" if HAS_CUDA else
               "the kernels were defined under TRITON_INTERPRET=1 (interpreted): nothing to dispatch")
TIMING = {"stubbed": "host clock, Triton kernels stubbed (fastgrpo.testing.stubbed_kernels)",
          "dispatched": "host clock, Triton's launch path with a stand-in CUDA driver "
                        "(fastgrpo.testing.dispatched_kernels)"}


@pytest.fixture
def kernels(request, host_device, monkeypatch):
    """(name, context manager) of how the call's kernels are replaced: ``stubbed`` (`stubbed_kernels`) or
    ``dispatched`` (`dispatched_kernels`: CPU tensors only; on a GPU the real launch path runs in
    bench/gpu_probe.py). Dispatched, the kernels are the compiled ones with their GPU constexprs, so
    ``TRITON_INTERPRET`` is unset again and only the backend check is told that CPU tensors may take
    ``impl="triton"``."""
    name = request.param
    if name == "stubbed":
        return name, stubbed_kernels
    if NO_DISPATCH[0]:  # on CUDA its sm_90 compiles would also take a GPU session's time for nothing
        pytest.skip(NO_DISPATCH[1])
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)
    return name, dispatched_kernels


@pytest.mark.parametrize("host_device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape_name", ["tiny", "sd35-512"])
@pytest.mark.parametrize("case", ["sde_sample", "sde_train"])
@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_host_sde_step(benchmark, host_device, kernels, case, shape_name):
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
    with kernels[1](SDE) as launches:
        measure_host(benchmark, fn, launches=launches, expected=expected, op="sde_step", case=case.removeprefix("sde_"),
                     shape_name=shape_name, shapes={"x": list(shape)}, dtype="bfloat16", device=host_device,
                     kernels=kernels[0], timing=TIMING[kernels[0]])


@pytest.mark.parametrize("host_device", DEVICES, indirect=True)
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "novalidate"])
@pytest.mark.parametrize("case", ["token_logprob_entropy", "eg_grpo_shaping"])
@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_host_token(benchmark, host_device, kernels, case, validate):
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
    with kernels[1](TOKEN) as launches:
        measure_host(benchmark, fn, launches=launches, expected=expected, op=case,
                     case="forward" if validate else "forward, validate=False", shape_name="image",
                     shapes={"logits": [B, L, V]}, dtype="bfloat16", device=host_device, kernels=kernels[0],
                     timing=TIMING[kernels[0]])


_SD35_STRUCTURE = {}


def _sd35_structure():
    """SD3.5-Medium's module tree (24 joint blocks, dual attention in 0-12, qk-norm) with tiny widths."""
    if not _SD35_STRUCTURE:
        from diffusers import SD3Transformer2DModel

        from fastgrpo.diffusion.tiny import SD35_MEDIUM

        torch.manual_seed(0)
        cfg = dict(SD35_MEDIUM, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                   joint_attention_dim=16, pooled_projection_dim=16, sample_size=8)
        _SD35_STRUCTURE["model"] = SD3Transformer2DModel(**cfg).eval().requires_grad_(False)
    return _SD35_STRUCTURE["model"]


@pytest.mark.parametrize("host_device", ["cpu"], indirect=True)
@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_host_collector_whole_model(benchmark, host_device, kernels, monkeypatch):
    """A whole no-grad forward of `_sd35_structure` (SD3.5-Medium's 24 blocks, tiny widths, batch 2) on CPU tensors,
    plain and inside a collector constructed per forward (layers 5/10/15, as bench/test_bench_collector.py times
    it), in alternation: what the collector adds to a forward's host time with diffusers' own code around it. On
    the H200 it added 8.8 ms at batch 2 (bench/results/h200-probe.json); here the forward's own arithmetic is tiny,
    so the difference is host work. pytest-benchmark times one pair (plain, then collector); ``extra_info`` has each
    way's median and the median of the paired differences (``collector_minus_plain_ms``, with its 20th-80th
    percentiles): pairs taken back to back cancel most of a shared machine's drift, which separate benchmark
    cases do not. ``launches_ms``: the median time per collector forward inside its six launch calls (the cached
    plans' ``attention`` and ``probs``: Triton's launch path when dispatched), timed in that forward's context.
    Denormals are flushed (a stubbed kernel leaves its output uninitialised). CPU only: on a GPU
    bench/gpu_probe.py times the real model."""
    import datetime
    import time

    import fastgrpo.kernels.attention_entropy as plans
    from fastgrpo.diffusion.attention import AttentionEntropyCollector

    if HAS_CUDA:  # 200 CPU forwards (~20 s) would take a GPU session's time for a CPU measurement
        pytest.skip("a CPU measurement: on a GPU machine bench/gpu_probe.py times the real model's forwards")

    model = _sd35_structure()
    inputs = collector_inputs(model, 2, host_device)  # the collector benchmark's inputs (12 text tokens on CPU)
    times = {"plain": [], "collector": [], "launches": []}
    in_launches = []
    for name in ("attention", "probs"):  # time the launch calls inside the forward
        real = getattr(plans.PlannedLaunches, name)

        def timed_launch(self, *args, _real=real, **kwargs):
            t0 = time.perf_counter()
            _real(self, *args, **kwargs)
            in_launches.append((time.perf_counter() - t0) * 1e3)

        monkeypatch.setattr(plans.PlannedLaunches, name, timed_launch)
    ROUNDS = 100  # noqa: N806  (pairs: their differences spread by a few ms on a shared 2-core machine)

    def plain():
        return model(**inputs).sample

    def collected():
        in_launches.clear()
        with AttentionEntropyCollector(model, layers=(5, 10, 15), impl="triton") as collector:
            model(**inputs)
            out = collector.pop()
        times["launches"].append(sum(in_launches))
        assert len(in_launches) == 6, in_launches  # through the plans: 2 launches in each selected layer
        return out

    def pair():
        for way, fn in (("plain", plain), ("collector", collected)):
            t0 = time.perf_counter()
            fn()
            times[way].append((time.perf_counter() - t0) * 1e3)

    torch.set_flush_denormal(True)
    try:
        with torch.no_grad(), kernels[1](ATTENTION) as launches:
            measure_host(benchmark, pair, launches=launches,
                         expected=["attention_text_entropy_fwd_kernel", "text_probs_kernel"] * 3,
                         op="SD3 transformer forward, plain then with the collector",
                         case="collector constructed per forward, layers 5/10/15",
                         shape_name="SD3.5-Medium's 24 blocks, tiny widths, batch 2",
                         shapes={"hidden_states": list(inputs["hidden_states"].shape)}, dtype="float32",
                         device=host_device, kernels=kernels[0], timing=TIMING[kernels[0]], rounds=ROUNDS, warmup=5)
    finally:
        torch.set_flush_denormal(False)
    # the timed rounds only (measure_host's first call, op count and host-read check run the pair too)
    diffs = sorted(c - p for p, c in zip(times["plain"][-ROUNDS:], times["collector"][-ROUNDS:]))
    assert len(diffs) >= 3 and all(t > 0 for t in times["plain"] + times["collector"])
    pick = lambda q: diffs[min(len(diffs) - 1, int(q * len(diffs)))]  # noqa: E731
    benchmark.extra_info.update(
        recorded=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        pairs=len(diffs), plain_ms=statistics.median(times["plain"][-ROUNDS:]),
        collector_ms=statistics.median(times["collector"][-ROUNDS:]), collector_minus_plain_ms=statistics.median(diffs),
        collector_minus_plain_p20_p80_ms=[pick(0.2), pick(0.8)],
        launches_ms=statistics.median(times["launches"][-ROUNDS:]))


@pytest.mark.parametrize("host_device", DEVICES, indirect=True)
@pytest.mark.parametrize("way", ["constructed_each_time", "entered_once"])
@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_host_collector(benchmark, host_device, kernels, way):
    from fastgrpo.diffusion.attention import AttentionEntropyCollector

    model = _sd35_structure()
    layers = (5, 10, 15)
    n_image, n_text = (1024, 333) if host_device.type == "cuda" else (16, 12)
    # bf16 on CUDA; float32 on CPU, where Triton's interpreter would have the kernel store float32 and the launcher
    # convert the output to bf16 (a copy no GPU makes)
    dtype = torch.bfloat16 if host_device.type == "cuda" else torch.float32
    q, k, v = (torch.empty((2, 24, n_image + n_text, 64), dtype=dtype, device=host_device) for _ in range(3))

    def forward(collector):  # what one transformer forward asks of the collector
        collector._begin_forward(model, (), {})
        for i in layers:
            collector._attend(i, q, k, v, "bhsd", n_image, n_text, 0, n_image)
        collector._end_forward(model, (), None)
        return collector.pop()

    def fresh():  # constructed, entered and exited around the forward
        with AttentionEntropyCollector(model, layers=layers, impl="triton") as collector:
            return forward(collector)

    # (no "forward-" in the ids: bench/gpu_session.sh round deselects that)
    once = AttentionEntropyCollector(model, layers=layers, impl="triton") if way == "entered_once" else None
    with torch.no_grad(), kernels[1](ATTENTION) as launches, once or contextlib.nullcontext():
        measure_host(benchmark, fresh if once is None else lambda: forward(once), launches=launches,
                     expected=["attention_text_entropy_fwd_kernel", "text_probs_kernel"] * 3,
                     op="AttentionEntropyCollector",
                     case=f"one forward, collector {'constructed per forward' if once is None else 'entered once'}",
                     shape_name="SD3.5-Medium, layers 5/10/15", shapes={"q": list(q.shape)},
                     dtype=str(dtype).removeprefix("torch."), device=host_device, kernels=kernels[0],
                     timing=TIMING[kernels[0]])


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
    # and each training case's autograd.grad is timed from the caller to the nodes and back (on the CPU the nodes
    # run on the calling thread); the other cases have no such timeline
    for name in ("sde_train_tiny_bf16", "sde_train_tiny_bf16_eager", "token_train_image"):
        t = res[name]["autograd"]
        assert t["calls"] == 2 and t["nodes"] >= 2 and t["other_thread"] is False, (name, t)
        parts = t["to_first_node_us"] + t["nodes_us"] + t["between_nodes_us"] + t["after_last_node_us"]
        assert min(t["to_first_node_us"], t["nodes_us"], t["after_last_node_us"]) > 0, (name, t)
        assert t["between_nodes_us"] >= -1e-6 and parts <= t["grad_us"] * 1.001 + 1e-3, (name, t)
    # the eager reference runs more backward nodes than our one autograd.Function and its loss
    assert res["sde_train_tiny_bf16_eager"]["autograd"]["nodes"] > res["sde_train_tiny_bf16"]["autograd"]["nodes"]
    assert all("autograd" not in r for name, r in res.items() if "train" not in name)



@pytest.mark.skipif(NO_DISPATCH[0], reason=NO_DISPATCH[1])
def test_dispatched_kernels_runs_tritons_launch_path_and_restores_it(monkeypatch):
    """`dispatched_kernels` sends a launch through Triton's own path (the kernel is compiled for sm_90 and cached
    under the stand-in driver's device, and its launcher records the plan's grid), then gives Triton back its
    driver and each kernel its caches; interpreted kernels are refused."""
    import types

    import triton
    from triton.runtime import driver as driver_config

    from fastgrpo.kernels import sde_step as sde_kernels

    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)  # CPU tensors may take impl="triton"
    kernel = sde_kernels.sde_step_fwd_kernel
    driver_before, caches_before = driver_config._active, kernel.device_caches
    x = torch.empty((3, 5, 7, 11), dtype=torch.bfloat16)  # N = 385: one chunk of 512 per sample
    with torch.no_grad(), dispatched_kernels(SDE) as launches:
        sde_step(x, torch.empty_like(x), 0.8, 0.7, noise=torch.empty(x.shape), impl="triton")
        variants = launches.variants()
    assert launches.names() == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    assert launches.grids == [(1, 3, 1), (3, 1, 1)]
    assert set(variants) == {"sde_step_fwd_kernel", "sde_step_finish_kernel"}  # the backward: not launched
    assert len(variants["sde_step_fwd_kernel"]) == 1 and variants["sde_step_fwd_kernel"][0].metadata.target.arch == 90
    assert driver_config._active is driver_before and kernel.device_caches is caches_before

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton.jit reads it when a kernel is defined
    module = types.ModuleType("interpreted_kernels")
    module.copy_kernel = triton.jit(_copy)
    with pytest.raises(RuntimeError, match="interpreted_kernels.copy_kernel is not a plain compiled"):
        with dispatched_kernels(module):
            pass
    assert driver_config._active is driver_before


def _copy(src_ptr, dst_ptr):  # defined as a kernel for the refusal above, never launched
    import triton.language as tl

    tl.store(dst_ptr, tl.load(src_ptr))


@pytest.mark.skipif(NO_DISPATCH[0], reason=NO_DISPATCH[1])
def test_no_kernel_compiles_per_step(monkeypatch):
    """What changes from one denoising step, training chunk, forward or micro-batch to the next (the sigmas, as floats
    or as per-sample tensors; the values in the tensors) compiles no new kernel: after each loop's first step, every
    kernel's Triton cache (under `dispatched_kernels`, as a GPU would fill it) holds what it held. A value that
    Triton specialised on (a constexpr, or an int it checks for 1 and divisibility by 16) would compile a kernel
    per step on a GPU, seconds each, and show nowhere on the CPU but here."""
    from fastgrpo.diffusion.attention import AttentionEntropyCollector

    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)  # CPU tensors may take impl="triton"

    def cached(launches):  # kernel -> how many variants Triton compiled for it in the block
        return {name: len(v) for name, v in launches.variants().items()}

    sigmas = torch.linspace(0.96, 0.04, 12).tolist()
    x = torch.empty((4, 16, 8, 8), dtype=torch.bfloat16)
    v, noise, v_ref = torch.empty_like(x), torch.empty(x.shape), torch.empty_like(x)
    vg = v.clone().requires_grad_(True)
    with dispatched_kernels(SDE) as launches:
        for step, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            per_sample = (torch.full((4,), s), torch.full((4,), sn))
            with torch.no_grad():
                prev = sde_step(x, v, s, sn, noise=noise, impl="triton").prev_sample
                sde_step(x, v, *per_sample, noise=noise, impl="triton")  # branching: one sigma per sample
            out = sde_step(x, vg, s, sn, prev_sample=prev, v_ref=v_ref, impl="triton")
            torch.autograd.grad(out.log_prob.sum() + 0.01 * out.kl.sum(), vg)
            if step == 0:
                first = cached(launches)
        assert first == {"sde_step_fwd_kernel": 3, "sde_step_finish_kernel": 3, "sde_step_bwd_kernel": 1}
        assert cached(launches) == first

    model = _sd35_structure()
    q, k, vv = (torch.empty((2, 24, 28, 64)) for _ in range(3))
    with torch.no_grad(), dispatched_kernels(ATTENTION) as launches, \
            AttentionEntropyCollector(model, layers=(5, 10, 15), impl="triton") as collector:
        for forward in range(4):  # one probe trajectory's forwards: the same geometry at every timestep
            collector._begin_forward(model, (), {})
            for i in (5, 10, 15):
                collector._attend(i, q.normal_(), k.normal_(), vv.normal_(), "bhsd", 16, 12, 0, 16)
            collector._end_forward(model, (), None)
            collector.pop()
            if forward == 0:
                first = cached(launches)
        # the probabilities kernel: written by the forward's first layer, added to by the others
        assert first == {"attention_text_entropy_fwd_kernel": 1, "text_probs_kernel": 2}
        assert cached(launches) == first

    # EG-GRPO's micro-batches: new logits and advantages, same shape. (A new length can add a variant: Triton
    # specialises the row count on divisibility by 16, and the shaping kernel's block follows the power of 2 of the
    # length -- a few variants per run, not one per step.)
    B, L, V = 4, 37, 16384
    targets, modality = torch.randint(0, V, (B, L)), torch.ones((B, L), dtype=torch.long)
    with torch.no_grad(), dispatched_kernels(TOKEN) as launches:
        for step in range(3):
            logits = torch.randn((B, L, V)).to(torch.bfloat16)
            eg_grpo_shaping(logits, targets, modality, torch.randn(B), impl="triton", validate=False)
            if step == 0:
                first = cached(launches)
        assert first == {"token_stats_fwd_kernel": 1, "eg_shaping_kernel": 1}
        assert cached(launches) == first
