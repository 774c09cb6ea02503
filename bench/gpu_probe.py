"""GPU probes that pytest-benchmark does not give: where each op's time goes, and attention tile configs.

    python bench/gpu_probe.py --out DIR        (on a CUDA machine; bench/gpu_session.sh probe runs it)

1. ``ops``: for each op at the benchmark shapes, the CUDA-event time of one call (``triton.testing.do_bench``,
   L2 flushed) beside the summed device time of the kernels it launches (torch.profiler), kernel by kernel. The
   difference is host work the GPU waits for (Python, launches, a validation sync); where it goes, per case:
   ``host_issue_ms`` (the time until the call returns, before synchronising), ``cpu_events`` (torch.profiler's
   CPU-side events by self time: aten ops, ``cudaLaunchKernel``/``cuLaunchKernel``, the autograd engine's
   ``evaluate_function`` nodes) and ``host_profile`` (cProfile: the Python functions by own time). Without CUDA
   (``probe_ops()`` on a CPU machine, or ``main`` there) it is a smoke run: tiny shapes, host timings only.
2. ``attention``: ``attention_with_text_entropy`` under each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages)
   against SDPA's flash backend at the SD3-512 and FLUX-1024 shapes. ``token_tiles``: the token forward kernel
   (the whole of ``eg_grpo_shaping``'s bandwidth but 3-8 us) under each (BLOCK, num_warps, LANES, PREFETCH) at
   the T2I-R1 shapes, as % of copy bandwidth (CUDA only; 96 configurations, two or three minutes).
3. ``collector``: AEGPO's whole step (bench/test_bench_collector.py's SD3.5-Medium forward, bf16, no grad) at
   batch 2 and 8, plain and inside ``AttentionEntropyCollector(layers=(5, 10, 15), mode="mixture")``: the forward
   timed with CUDA events (median of a few), the host's issue time of the call (until it returns, before the
   synchronisation: when it is close to the event time the forward is host-bound and every host op the collector
   adds shows), and, from torch.profiler, the CPU ops, device kernels and their summed device time per forward
   with and without it (``extra_kernel_ms``: GPU work the collector adds, to set against the host time it adds).
   Ways: ``plain``; ``collector`` (constructed per forward, as the benchmark times it); ``collector_reused`` (one
   collector entered for all forwards, AEGPO's use); ``collector_stubbed`` (constructed per forward, its two
   attention kernels replaced by stubs that launch nothing, `fastgrpo.testing.stubbed_kernels`: the forward's
   numbers are then garbage, its times are the collector's cost without its launches, so ``collector`` against
   it is what the six launches cost, driver and device included: ``launch_overhead_ms``). About 30 s of GPU
   time. On CPU (``probe_collector()`` without CUDA) a scaled-down model runs as a smoke test.

Writes ``DIR/probe.json`` and prints a short table. On a machine without CUDA, ``python bench/gpu_probe.py --out DIR``
runs the CPU smoke path of the ``ops`` and ``collector`` sections (the attention sweep needs CUDA).
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def _event_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median CUDA-event time of ``fn`` (``triton.testing.do_bench``: ``warmup`` and ``rep`` in ms of calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _profile_calls(fn, calls: int = 20, top: int = 12) -> tuple:
    """One torch.profiler session over ``calls`` calls of ``fn``: (summed kernel ms per call, {kernel: ms per call},
    CPU-side events, counts per call, `_autograd_timeline`). The events (`_cpu_rows`) are the host's: aten ops, the
    autograd engine's nodes, and the launches as the CUDA runtime/driver API calls they are. The counts: CPU aten
    ops (top level and nested), launch API calls and device kernels. Without CUDA: (None, {}, CPU events, counts,
    timeline)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    counts = {"cpu_aten_ops": 0, "launch_calls": 0, "device_kernels": 0}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name[:80]] = per_kernel.get(evt.name[:80], 0.0) + evt.device_time / 1e3 / calls
            counts["device_kernels"] += 1
        elif evt.device_type == torch.autograd.DeviceType.CPU:
            counts["cpu_aten_ops"] += evt.name.startswith("aten::")
            counts["launch_calls"] += evt.name in LAUNCH_EVENTS
    per_kernel = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))
    counts = {key: round(n / calls) for key, n in counts.items()}
    return ((sum(per_kernel.values()) if cuda else None), per_kernel, _cpu_rows(prof, calls, top), counts,
            _autograd_timeline(prof))


LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _cpu_rows(prof, calls: int, top: int) -> list:
    """The ``top`` CPU-side events of a profile by self CPU time (the launch events always listed), as [event,
    calls per call, self us per call, total us per call]."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = events[:top] + [e for e in events[top:] if e.key in LAUNCH_EVENTS]
    return [[e.key[:80], e.count / calls, round(e.self_cpu_time_total / calls, 2), round(e.cpu_time_total / calls, 2)]
            for e in rows]


GRAD_EVENT = "probe::autograd.grad"  # torch.profiler's label of the training cases' torch.autograd.grad


def _grad(loss, inputs):
    """``torch.autograd.grad(loss, inputs)`` under a profiler label (`GRAD_EVENT`), for `_autograd_timeline`."""
    with torch.profiler.record_function(GRAD_EVENT):
        return torch.autograd.grad(loss, inputs)


def _autograd_timeline(prof) -> dict | None:
    """Where a training case's ``torch.autograd.grad`` spends its time (the profile's `GRAD_EVENT` events; None when
    it has none), medians over the profiled calls in us: the whole call (``grad_us``), until the engine starts the
    first backward node (``to_first_node_us``: with CUDA tensors the engine runs the nodes on its device thread, so
    this is the hand-over to that thread), the nodes' own time (``nodes_us``, the kernels' launches included), the
    gaps between nodes (``between_nodes_us``), and from the last node's end until the call returns
    (``after_last_node_us``: the hand-back); ``other_thread``: whether the nodes ran on another thread than the
    caller (on CUDA they do, on the CPU they run on the calling thread). The eager reference pays the same
    hand-over and hand-back, so on a host-bound call they bound the speed-up one op's kernels can show."""
    import statistics

    events = list(prof.events())
    nodes = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")]
    rows = []
    for g in (e for e in events if e.name == GRAD_EVENT):
        start, end = g.time_range.start, g.time_range.end
        inside = [e for e in nodes if start <= e.time_range.start and e.time_range.end <= end]
        if not inside:
            continue
        first = min(e.time_range.start for e in inside)
        last = max(e.time_range.end for e in inside)
        busy = sum(e.time_range.elapsed_us() for e in inside)
        rows.append({"grad_us": end - start, "to_first_node_us": first - start, "nodes_us": busy,
                     "between_nodes_us": (last - first) - busy, "after_last_node_us": end - last,
                     "nodes": len(inside), "other_thread": any(e.thread != g.thread for e in inside)})
    if not rows:
        return None
    out = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "other_thread"}
    return {**out, "other_thread": all(r["other_thread"] for r in rows), "calls": len(rows)}


# The CPU smoke run's shapes (no CUDA): the code path of the probe, not numbers to read.
SMOKE_SDE_SHAPES = {"tiny": (8, 4, 16, 16)}
SMOKE_TOKEN_SHAPES = {"image": (2, 16, 512)}
SMOKE_OVF = (64, 8, 4)  # P, G, K


def ops_cases(smoke: bool = False):
    """name -> (call, minimum bytes) at the benchmark shapes on CUDA; ``smoke``: tiny shapes on the CPU."""
    from fastgrpo import eg_grpo_shaping, ovf_select, sde_step, token_logprob_entropy
    from test_bench_ovf import G, K, P
    from test_bench_sde import SHAPES as SDE_SHAPES
    from test_bench_token import SHAPES as TOKEN_SHAPES

    dev = "cpu" if smoke else "cuda"
    if smoke:
        SDE_SHAPES, TOKEN_SHAPES, (P, G, K) = SMOKE_SDE_SHAPES, SMOKE_TOKEN_SHAPES, SMOKE_OVF
    g = torch.Generator().manual_seed(0)
    cases = {}
    for name, shape in SDE_SHAPES.items():
        x, v, prev, vref = (torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(4))
        noise = torch.randn(shape, generator=g).to(dev)
        n, es = x.numel(), 2
        cases[f"sde_sample_{name}_bf16"] = (lambda x=x, v=v, noise=noise: sde_step(x, v, 0.8, 0.7, noise=noise),
                                            n * (2 * es + 12))
        vg = v.clone().requires_grad_(True)
        prevf = prev.float()

        def train(x=x, vg=vg, prevf=prevf, vref=vref):
            out = sde_step(x, vg, 0.8, 0.7, prev_sample=prevf, v_ref=vref)
            return _grad(out.log_prob.sum() + 0.01 * out.kl.sum(), vg)

        cases[f"sde_train_{name}_bf16"] = (train, n * (3 * es + 8 + es))

        def train_eager(x=x, vg=vg, prevf=prevf, vref=vref):  # the eager reference, for its autograd timeline
            out = sde_step(x, vg, 0.8, 0.7, prev_sample=prevf, v_ref=vref, impl="torch")
            return _grad(out.log_prob.sum() + 0.01 * out.kl.sum(), vg)

        cases[f"sde_train_{name}_bf16_eager"] = (train_eager, n * (3 * es + 8 + es))
    for name, (B, L, V) in TOKEN_SHAPES.items():
        logits = (torch.randn(B, L, V, generator=g) * 2).to(dev, torch.bfloat16)
        targets = torch.randint(0, V, (B, L), generator=g).to(dev)
        modality = torch.full((B, L), int(name == "image"), device=dev)
        adv = torch.randn(B, generator=g).to(dev)
        R = B * L
        cases[f"token_forward_{name}"] = (lambda lg=logits, t=targets: token_logprob_entropy(lg, t), R * V * 2)
        cases[f"token_shaping_{name}"] = (
            lambda lg=logits, t=targets, m=modality, a=adv: eg_grpo_shaping(lg, t, m, a), R * V * 2)
        cases[f"token_shaping_novalidate_{name}"] = (
            lambda lg=logits, t=targets, m=modality, a=adv: eg_grpo_shaping(lg, t, m, a, validate=False), R * V * 2)
        lr = logits.clone().requires_grad_(True)

        def ttrain(lr=lr, t=targets):
            logp, ent = token_logprob_entropy(lr, t)
            return _grad(logp.sum() + ent.sum(), lr)

        cases[f"token_train_{name}"] = (ttrain, 3 * R * V * 2)
    rewards = (torch.randn(P, G, generator=g) * 0.5 + 22).to(dev)
    cases[f"ovf_select_{P}x{G}_k{K}"] = (lambda: ovf_select(rewards, K), P * (G * 4 + K * 8 + 4))
    return cases


def _host_issue_ms(fn, repeats: int = 20) -> float:
    """Median time until ``fn()`` returns, started on an idle device and not waiting for it: the host's share of
    a call (close to the CUDA-event time when the call is host-bound)."""
    import statistics
    import time

    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(times)


def probe_ops(copy_gbps: float | None) -> dict:
    """Per op case: CUDA-event time, kernel time and kernels, and where the host time goes (``host_issue_ms``,
    ``cpu_events``, ``host_profile``; for the training cases also ``autograd``, `_autograd_timeline`). Without
    CUDA: the smoke run (tiny CPU shapes, ``event_ms`` is the host time of a call, no kernel table)."""
    cuda = torch.cuda.is_available()
    res = {}
    for name, (fn, nbytes) in ops_cases(smoke=not cuda).items():
        with torch.no_grad() if "train" not in name else torch.enable_grad():
            fn()  # compiles the kernels on a GPU
            issue = _host_issue_ms(fn, repeats=20 if cuda else 3)
            ev = _event_ms(fn) if cuda else issue
            kern, per, events, _, timeline = _profile_calls(fn, calls=20 if cuda else 2)
            host = _host_profile(fn, top=12)
        res[name] = {"event_ms": ev, "kernel_ms": kern, "host_issue_ms": issue, "bytes": nbytes,
                     "gb_per_s_event": nbytes / ev / 1e6,
                     "gb_per_s_kernels": nbytes / kern / 1e6 if kern else None, "kernels": per,
                     "cpu_events": events, "host_profile": host, **({"autograd": timeline} if timeline else {})}
        bw = f"{nbytes / kern / 1e6 / copy_gbps:6.1%} of copy (kernels)" if kern and copy_gbps else ""
        kern_txt = f"{kern:8.3f} ms" if kern is not None else "     n/a   "
        print(f"{name:32s} event {ev:8.3f} ms  host issue {issue:8.3f} ms  kernels {kern_txt}  {bw}  "
              f"{len(per)} kernels", flush=True)
    return res


def _attention_probe() -> dict:
    from fastgrpo import attention_with_text_entropy
    from fastgrpo.kernels import attention_entropy as mod
    from test_bench_attention import CASES

    original = mod._attention_config
    shapes = {case: CASES[case] for case in ("sd3-512-b2", "sd3-512-b8", "flux-1024-b1")}
    out = {}
    g = torch.Generator().manual_seed(0)
    for case, (B, H, n_img, n_txt, D, layout) in shapes.items():
        S = n_img + n_txt
        ts = n_img if layout == "bhsd" else 0
        shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
        q, k, v = (torch.randn(shape, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
        qh, kh, vh = (t if layout == "bhsd" else t.transpose(1, 2) for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_ms = _event_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh))
            ref = F.scaled_dot_product_attention(qh, kh, vh)
        ref = ref if layout == "bhsd" else ref.transpose(1, 2)
        rows = []
        grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
        for bm, bn, nw, ns in grid:
            if D == 128 and bn == 128 and bm == 128:
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
            mod._attention_config = lambda head_dim, interpret, dtype=None, cfg=cfg: dict(cfg)
            try:
                fn = lambda: attention_with_text_entropy(q, k, v, text_start=ts, text_len=n_txt,  # noqa: E731
                                                         layout=layout, impl="triton")
                res = fn()
                err = float((res.out.float() - ref.float()).abs().max())
                ms = _event_ms(fn)
                rows.append({**cfg, "ms": ms, "vs_sdpa": sdpa_ms / ms, "max_abs_err_vs_sdpa": err})
            except Exception as e:  # noqa: BLE001  (out of shared memory, say)
                rows.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            finally:
                mod._attention_config = original
        ok = sorted((r for r in rows if "ms" in r and r["max_abs_err_vs_sdpa"] < 0.05), key=lambda r: r["ms"])
        out[case] = {"sdpa_ms": sdpa_ms, "current": original(D, False, torch.bfloat16), "configs": rows,
                     "best": ok[:5]}
        best = ok[0] if ok else None
        print(f"{case}: sdpa {sdpa_ms:.3f} ms; best {best}", flush=True)
    return out


TOKEN_TILE_SHAPES = {"image": (16, 576, 16_384), "text": (16, 256, 102_400)}  # bench/test_bench_token.py's


def _token_tiles_probe(copy_gbps, blocks=(4096, 2048, 8192, 1024), warps=(8, 4, 16), lanes=(True, False),
                       prefetch=(False, True), shapes=None, on_update=None) -> dict:
    """``token_logprob_entropy``'s forward kernel (no grad, ``validate=False``) under each candidate (BLOCK,
    num_warps, LANES, PREFETCH) at the T2I-R1 shapes, against the current `fwd_config`: event ms, % of copy
    bandwidth (the bf16 logits read once), and the largest logp difference from the current configuration's output
    (the block size and the variant change the summation order only).

    Order: each configuration at every shape before the next configuration, the four variants of a (BLOCK,
    num_warps) back to back, the likeliest tiles first, so that a sweep cut short still compares the variants at
    every shape (96 configurations; each takes a compile, 0.15-0.4 s for sm_90 under Triton 3.6 as measured on a CPU
    through `fastgrpo.testing.dispatched_kernels`, then about 0.15 s of timing per shape: do_bench with 10 ms of
    warm-up and 100 ms of calls, hundreds of calls of these 0.1-0.3 ms kernels).
    No ``num_stages``: the loop's loads feed no ``tl.dot``, and for sm_90 Triton 3.7 emits the same code for 1 and
    3 stages (no cp.async; ptxas reports the same registers), so stages would only cost GPU time. Without CUDA (a
    smoke test: Triton's interpreter, host time, ``shapes`` small) the percentages are None. ``on_update(partial)``,
    after each configuration at each shape: the results so far (every shape marked ``"partial": True``), so that a
    sweep stopped at a time limit keeps its rows."""
    from fastgrpo import token_logprob_entropy
    from fastgrpo.kernels import token_entropy as mod

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    timer = (lambda fn: _event_ms(fn, warmup=10, rep=100)) if cuda else lambda fn: _host_issue_ms(fn, repeats=1)
    pct = lambda n, ms: n / ms / 1e6 / copy_gbps if copy_gbps else None  # noqa: E731
    original = mod.fwd_config
    g = torch.Generator().manual_seed(0)

    def entry(c, partial):
        ok = sorted((r for r in c["rows"] if "ms" in r and r["max_abs_logp_diff"] < 1e-2), key=lambda r: r["ms"])
        return {"current": original(c["V"]), "current_ms": c["base_ms"],
                "current_pct_of_copy": pct(c["bytes"], c["base_ms"]), "configs": list(c["rows"]), "best": ok[:5],
                **({"partial": True} if partial else {})}

    cases = {}
    with torch.no_grad():
        for name, (B, L, V) in (shapes or TOKEN_TILE_SHAPES).items():
            logits = (torch.randn(B, L, V, generator=g) * 2).to(device, torch.bfloat16)
            targets = torch.randint(0, V, (B, L), generator=g).to(device)
            fn = lambda x=logits, t=targets: token_logprob_entropy(x, t, validate=False, impl="triton")  # noqa: E731
            cases[name] = {"fn": fn, "ref": fn()[0], "V": V, "bytes": B * L * V * 2, "base_ms": timer(fn), "rows": []}
        for block, nw, lane, ahead in itertools.product(blocks, warps, lanes, prefetch):
            cfg = {"BLOCK": block, "num_warps": nw, "LANES": lane, "PREFETCH": ahead}
            for name, c in cases.items():
                mod.fwd_config = lambda V, cfg=cfg: dict(cfg)
                try:
                    err = float((c["fn"]()[0] - c["ref"]).abs().max())
                    ms = timer(c["fn"])
                    c["rows"].append({**cfg, "ms": ms, "pct_of_copy": pct(c["bytes"], ms), "max_abs_logp_diff": err})
                except Exception as e:  # noqa: BLE001  (out of registers / shared memory)
                    c["rows"].append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                finally:
                    mod.fwd_config = original
                if on_update is not None:
                    on_update({n: entry(cc, partial=True) for n, cc in cases.items()})
    out = {name: entry(c, partial=False) for name, c in cases.items()}
    for name, r in out.items():
        best = r["best"]
        print(f"token tiles {name}: current {r['current_ms']:.3f} ms ({r['current_pct_of_copy']}); "
              f"best {best[0] if best else None}", flush=True)
    return out


def probe_collector(batches=(2, 8), repeats: int = 7) -> dict:
    """Plain vs collector forward of bench/test_bench_collector.py's model (SD3.5 Medium on CUDA, its scaled-down
    CPU configuration otherwise): times, host issue time, ops and kernels per forward, overhead; per way also the
    summed device time of its kernels (``kernel_ms``, the top kernels, ``extra_kernel_ms`` per batch: whether the
    batch-2 overhead is GPU work or host work), the CPU-side profiler events (launch API calls among them) and a
    cProfile, and the host time spent in each transformer block (``block_host_ms``, with ``hooked_host_ms`` the
    whole forward's in the same calls: `_block_host_ms`). The ways
    (module docstring): plain, collector, collector_reused, collector_stubbed; per batch also
    ``launch_overhead_ms`` (collector against collector_stubbed: what the collector's launches cost) and
    ``extra_block_host_ms`` (collector less plain, per block: whether the extra host time sits in the selected
    blocks or is spread over all of them)."""
    import contextlib
    import statistics
    import time

    from test_bench_collector import LAYERS, _forward, _inputs, _model

    from fastgrpo.diffusion.attention import AttentionEntropyCollector
    from fastgrpo.testing import stubbed_kernels

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = _model(device)
    out = {"layers": list(LAYERS), "mode": "mixture", "scaled_down": not cuda, "dtype": str(model.dtype)}
    for batch in batches:
        inputs = _inputs(model, batch, device)
        row = {}
        reused = AttentionEntropyCollector(model, layers=LAYERS, mode="mixture")

        def in_reused():  # AEGPO's use: one collector entered for a whole probe of T forwards
            with torch.no_grad():
                v = model(**inputs).sample
                return v, reused.pop()

        ways = (("plain", None), ("collector", AttentionEntropyCollector), ("collector_reused", None),
                ("collector_stubbed", AttentionEntropyCollector))
        for way, cls in ways:
            fn = _forward(model, inputs, cls) if way != "collector_reused" else in_reused
            stubs = stubbed_kernels(ATTENTION_KERNELS) if way == "collector_stubbed" else contextlib.nullcontext()
            with stubs, (reused if way == "collector_reused" else contextlib.nullcontext()):
                for _ in range(2):  # warm-up: kernels compiled, allocator primed
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                ev, host = [], []
                for _ in range(repeats):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                    t0 = time.perf_counter()
                    fn()
                    host.append((time.perf_counter() - t0) * 1e3)
                    if cuda:
                        end.record()
                        torch.cuda.synchronize()
                        ev.append(start.elapsed_time(end))
                kern, per, events, counts, _ = _profile_calls(fn, calls=3, top=15)  # counts: per forward
                row[way] = {"ms": statistics.median(ev or host), "host_issue_ms": statistics.median(host),
                            "ms_all": ev or host, **counts, "kernel_ms": kern,
                            "kernels_top": dict(list(per.items())[:12]), "cpu_events": events,
                            "host_profile": _host_profile(fn)}
                row[way]["block_host_ms"], row[way]["hooked_host_ms"] = _block_host_ms(
                    model.transformer_blocks, fn, repeats=repeats)
        p, c = row["plain"], row["collector"]
        row["overhead"] = c["ms"] / p["ms"] - 1
        row["host_issue_overhead_ms"] = c["host_issue_ms"] - p["host_issue_ms"]
        row["extra_kernels_per_forward"] = c["device_kernels"] - p["device_kernels"]
        row["extra_cpu_ops_per_forward"] = c["cpu_aten_ops"] - p["cpu_aten_ops"]
        # device time the collector adds (None without CUDA): with the host issue time, GPU work vs host work
        row["extra_kernel_ms"] = c["kernel_ms"] - p["kernel_ms"] if cuda else None
        row["host_bound"] = p["host_issue_ms"] > 0.8 * p["ms"]
        # what the collector's six launches cost (Triton's launch path, the driver, the device): against the same
        # collector with its kernels stubbed
        row["launch_overhead_ms"] = c["ms"] - row["collector_stubbed"]["ms"]
        # host time per block, collector less plain: in the selected blocks, or spread over every block
        row["extra_block_host_ms"] = [a - b for a, b in zip(c["block_host_ms"], p["block_host_ms"])]
        out[f"b{batch}"] = row
        print(f"collector b{batch}: plain {p['ms']:.2f} ms (host {p['host_issue_ms']:.2f}), collector {c['ms']:.2f} ms "
              f"(host {c['host_issue_ms']:.2f}): {row['overhead']:+.1%}; kernels stubbed "
              f"{row['collector_stubbed']['ms']:.2f} ms (host {row['collector_stubbed']['host_issue_ms']:.2f}); "
              + (f"kernel time {p['kernel_ms']:.2f} -> {c['kernel_ms']:.2f} ms; " if cuda else "")
              + f"kernels {p['device_kernels']} -> "
              f"{c['device_kernels']}, cpu ops {p['cpu_aten_ops']} -> {c['cpu_aten_ops']}", flush=True)
    return out


ATTENTION_KERNELS = "fastgrpo.kernels.attention_entropy"


def _block_host_ms(blocks, fn, repeats: int = 5) -> tuple:
    """Host time spent in each of ``blocks`` per call of ``fn`` (median over ``repeats`` calls, ms), read by a
    forward pre-hook and a forward hook on each block, each call started on an idle device: on a host-bound
    forward, where the host time goes block by block (whether a way's extra time sits in some blocks or is spread
    over all). Returns (per block, the median host time of the same calls, `_host_issue_ms`). The hooks are removed
    afterwards."""
    import statistics
    import time

    starts, times = {}, [[] for _ in blocks]

    def pre(i):
        return lambda module, args: starts.__setitem__(i, time.perf_counter())

    def post(i):
        return lambda module, args, out: times[i].append((time.perf_counter() - starts[i]) * 1e3)

    handles = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        total = _host_issue_ms(fn, repeats=repeats)
    finally:
        for h in handles:
            h.remove()
    return [statistics.median(t) if t else None for t in times], total


def _host_profile(fn, calls: int = 3, top: int = 15) -> list:
    """Where the host time of ``fn`` goes: cProfile over a few calls, the ``top`` functions by own time, as
    [function, calls per call, own ms per call, cumulative ms per call]."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [[f"{Path(f).name}:{line}({name})", n / calls, tt * 1e3 / calls, ct * 1e3 / calls]
            for (f, line, name), (_, n, tt, ct, _) in rows]


def _copy_gbps(n: int = 1 << 29) -> float:
    """Device-to-device copy bandwidth of a 1 GiB bf16 tensor, bytes read + written."""
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * n * 2 / _event_ms(lambda: dst.copy_(src)) / 1e6


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_readme.py parses the README's gpu_probe.py lines with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", nargs="+", choices=["ops", "attention", "collector", "token_tiles"], default=None,
                    help="run only these sections (default: all)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    copy_gbps = _copy_gbps() if cuda else None
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run: tiny shapes, host timings only)",
              "torch": torch.__version__, "copy_gb_per_s": copy_gbps}
    import triton

    result["triton"] = triton.__version__
    print(f"copy {copy_gbps:,.0f} GB/s" if cuda else "no CUDA: CPU smoke run of the ops and collector sections",
          flush=True)
    # Each section on its own: one that fails is reported and the others still run (and are written).
    out = Path(args.out, "probe.json")

    def partial_tiles(part):  # the sweep's rows so far, written after each configuration (time limits)
        out.write_text(json.dumps({**result, "token_tiles": part}, indent=1))

    sections = [("collector", probe_collector), ("ops", lambda: probe_ops(copy_gbps)), ("attention", _attention_probe),
                ("token_tiles", lambda: _token_tiles_probe(copy_gbps, on_update=partial_tiles))]
    for name, fn in sections:
        if args.only is not None and name not in args.only:
            continue
        if name in ("attention", "token_tiles") and not cuda:
            continue
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
