"""bench/report.py: the README's performance tables are exactly what the committed results generate, and the GPU
verdicts follow the targets (synthetic results that meet and miss each one)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402


def _section(start, end):
    text = (ROOT / "README.md").read_text()
    return re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, flags=re.S).group(1)


def _load(name):
    results = json.loads((ROOT / "bench" / "results" / name).read_text())
    results["_source"] = f"bench/results/{name}"
    return results


def test_readme_gpu_table_is_generated_from_the_committed_results():
    results = _load("h100.json")
    probe = json.loads((ROOT / "bench" / "results" / "h100-probe.json").read_text())
    want = report.gpu_table(results) + "\n\n" + report.probe_table(probe)
    assert _section(report.GPU_START, report.GPU_END) == want


def test_readme_h200_section_is_generated_from_the_committed_results():
    probe = json.loads((ROOT / "bench" / "results" / "h200-probe.json").read_text())
    want = report.gpu_table(_load("h200.json")) + "\n\n" + report.probe_table(probe)
    assert _section("<!-- gpu-h200:start -->", "<!-- gpu-h200:end -->") == want


def test_readme_cpu_table_is_generated_from_the_committed_results():
    assert _section(report.START, report.END) == report.table(_load("cpu.json"))


def test_readme_host_table_is_generated_from_the_committed_results():
    assert _section(report.HOST_START, report.HOST_END) == report.host_table(_load("cpu-host.json"))


def _bench(name, params, median, **extra):
    info = {"device": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "median_s": median, "peak_extra_memory_bytes": 1 << 20}
    return {"name": name, "params": params, "stats": {"median": median}, "extra_info": {**info, **extra}}


@pytest.mark.parametrize("ours_s, gbps, verdict", [(1e-5, 2500.0, "met"), (5e-5, 2500.0, "gap: 2.00x < 3x"),
                                                   (1e-5, 1000.0, "gap: 33% of copy")])
def test_gpu_verdicts_follow_the_targets(ours_s, gbps, verdict):
    results = {"benchmarks": [
        _bench("test_ceiling[copy]", {"ceiling": "copy"}, 1e-3, gb_per_s=3000.0, shapes={"src": [1 << 29]}),
        _bench("test_sample[a-triton]", {"impl": "triton", "dtype": "UNSERIALIZABLE[torch.bfloat16]"}, ours_s,
               gb_per_s=gbps),
        _bench("test_sample[a-torch]", {"impl": "torch", "dtype": "UNSERIALIZABLE[torch.bfloat16]"}, 1e-4),
    ]}
    row = next(line for line in report.gpu_table(results).splitlines() if line.startswith("| sample"))
    assert row.rstrip(" |").endswith(verdict), row
    assert "dtype=bfloat16" in row


def test_gpu_table_refuses_cpu_only_results():
    with pytest.raises(SystemExit, match="no CUDA results"):
        report.gpu_table(_load("cpu.json"))


def _round_bench(fast_s, eager_s):
    def path(t, agreement=None):
        return {"round_s": t, "images_per_s": 8 / t, "round_times_s": [t, t], "warmup_s": 90.0, "mfu": 0.3,
                "phases_s": {"sample": 1.0, "advantages": 0.01, "train": 2.0, "optimizer": 0.02},
                "peak_memory_bytes": 3 << 30, "agreement": agreement}

    agree = {"rewards_rel_l2": 1e-3, "latents_rel_l2": 2e-3, "grad_rel_l2": 1e-2}
    nothing = {"graphs": 0, "frames": 0, "graph_breaks": 0, "compile_s": 0.0}
    fast = {**path(fast_s, agree), "compile": {"graphs": 9, "frames": 11, "graph_breaks": 0, "compile_s": 71.6}}
    info = {"device": "NVIDIA H200", "cuda": "13.0", "torch": "2.11", "triton": "3.6", "gemm_tflops": 780.0,
            "paths": {"eager": {**path(eager_s), "compile": nothing}, "fast_nocompile": path(eager_s, agree),
                      "fast": fast},
            "shape": {"layers": 24, "heads": 24, "head_dim": 64, "params": 2.24e9, "dtype": "bfloat16",
                      "image_tokens": 1024, "text_tokens": 333, "lora_rank": 32, "prompts": 2, "group_size": 4,
                      "batch_size": 8, "num_steps": 10}}
    return {"name": "test_round", "params": {}, "stats": {"median": fast_s}, "extra_info": info}


@pytest.mark.parametrize("fast_s, verdict", [(5.0, "met"), (8.0, "gap: 1.25x")])
def test_round_table_sets_each_path_against_the_eager_one(fast_s, verdict):
    out = report.round_table({"benchmarks": [_round_bench(fast_s, 10.0)]})
    rows = {line.split(" (")[0][2:]: line for line in out.splitlines() if line.startswith("| ")
            and not line.startswith("| path")}
    assert list(rows) == ["eager", "fast_nocompile", "fast"]
    assert rows["fast"].rstrip(" |").endswith(verdict), rows["fast"]
    assert rows["fast_nocompile"].rstrip(" |").endswith("gap: 1.00x")
    assert f"| {8 / fast_s:.3f} | {fast_s:.2f} |" in rows["fast"] and "| 0.800 | 10.00 |" in rows["eager"]
    assert "1e-03 / 2e-03 / 1e-02" in rows["fast"]
    # warm-up: what a path compiled, where it compiled anything (the no-compile path's record predates it)
    assert "| 90 (72 s compiling 9 graphs) |" in rows["fast"]
    assert "| 90 |" in rows["eager"] and "| 90 |" in rows["fast_nocompile"] and "compiling" not in rows["eager"]
    bench = _round_bench(fast_s, 10.0)  # a rerun that found the first call's graphs in Inductor's cache
    bench["extra_info"]["paths"]["fast"]["compile"].update(fxgraph_cache_hits=12, fxgraph_cache_misses=0,
                                                             compile_s=9.4)
    fast = next(line for line in report.round_table({"benchmarks": [bench]}).splitlines()
                if line.startswith("| fast ("))
    assert "| 90 (9 s compiling 9 graphs; 12 of 12 Inductor graphs from its cache) |" in fast
    # a path beyond an agreement tolerance keeps its times but gets no verdict
    bench = _round_bench(fast_s, 10.0)
    bench["extra_info"]["paths"]["fast"]["agreement"] = {"rewards_rel_l2": 1e-3, "latents_rel_l2": 2e-3,
                                                         "grad_rel_l2": 0.2,
                                                         "beyond_tolerance": ["grad_rel_l2 2.0e-01 >= 0.05"]}
    fast = next(line for line in report.round_table({"benchmarks": [bench]}).splitlines()
                if line.startswith("| fast ("))
    assert fast.endswith("| not comparable: grad_rel_l2 2.0e-01 >= 0.05 |") and "met" not in fast
    assert f"| {10 / fast_s:.2f}x |" in fast and "1e-03 / 2e-03 / 2e-01" in fast
    # CPU correctness runs of the same benchmark are not GPU results
    cpu = _round_bench(5.0, 10.0)
    cpu["extra_info"].update(device="cpu x1", cuda=None)
    assert report.round_table({"benchmarks": [cpu]}) == ""


def _cpu_bench(name, impl, median, mode="default"):
    info = {"device": "cpu x86_64 x1 threads", "torch": "2.13", "shapes": {"x": [2, 3]},
            "peak_extra_memory_bytes": 2 << 20}
    if impl == "compiled":
        info["compile_mode"] = mode
    return {"name": f"{name[:-1]}-{impl}]", "params": {"impl": impl}, "stats": {"median": median}, "extra_info": info}


@pytest.mark.parametrize("compiled_s, cell", [(4e-3, "2.00x"), (1.4e-3, "0.70x (compiled is faster)"),
                                              (1.99e-3, "0.99x (compiled is faster)"), (None, "n/a")])
def test_cpu_table_sets_cpp_against_the_compiled_baseline(compiled_s, cell):
    benches = [_cpu_bench("test_sample[a-bf16]", "torch", 8e-3), _cpu_bench("test_sample[a-bf16]", "cpp", 2e-3),
               _cpu_bench("test_train[b]", "torch", 1.0), _cpu_bench("test_train[b]", "cpp", 0.5),
               _cpu_bench("test_train[b]", "compiled", 0.25)]
    if compiled_s is not None:
        benches.append(_cpu_bench("test_sample[a-bf16]", "compiled", compiled_s))
    out = report.table({"benchmarks": benches})
    header = next(line for line in out.splitlines() if line.startswith("| case"))
    assert [c.strip() for c in header.split("|")[3:8]] == ["torch ms", "compiled ms", "cpp ms", "speed-up",
                                                          "vs compiled"]
    row = next(line for line in out.splitlines() if line.startswith("| test_sample[a-bf16]"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    want_ms = "n/a" if compiled_s is None else f"{compiled_s * 1e3:,.1f}"
    assert cells[2:7] == ["8.0", want_ms, "2.0", "4.0x", cell], row
    train = next(line for line in out.splitlines() if line.startswith("| test_train[b]"))
    assert "| 0.50x (compiled is faster) |" in train
    assert "torch.compile(mode='default'" in out.splitlines()[0]


def test_cpu_table_without_compiled_results_keeps_its_columns():
    out = report.table({"benchmarks": [_cpu_bench("test_sample[a]", "torch", 8e-3),
                                       _cpu_bench("test_sample[a]", "cpp", 2e-3)]})
    assert "compiled" not in out and "| torch ms | cpp ms | speed-up |" in out


@pytest.mark.parametrize("compiled_s, cell", [(2e-5, "2.00x"), (5e-6, "0.50x (compiled is faster)")])
def test_gpu_table_sets_triton_against_the_compiled_baseline(compiled_s, cell):
    dtype = {"dtype": "UNSERIALIZABLE[torch.bfloat16]"}
    results = {"benchmarks": [
        _bench("test_ceiling[copy]", {"ceiling": "copy"}, 1e-3, gb_per_s=3000.0, shapes={"src": [1 << 29]}),
        _bench("test_sample[a-triton]", {"impl": "triton", **dtype}, 1e-5, gb_per_s=2500.0),
        _bench("test_sample[a-torch]", {"impl": "torch", **dtype}, 1e-4),
        _bench("test_sample[a-compiled]", {"impl": "compiled", **dtype}, compiled_s, compile_mode="default"),
    ]}
    out = report.gpu_table(results)
    header = next(line for line in out.splitlines() if line.startswith("| op"))
    assert [c.strip() for c in header.split("|")[6:9]] == ["speed-up", "compiled ms", "vs compiled"]
    row = next(line for line in out.splitlines() if line.startswith("| sample"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5:8] == ["10.00x", f"{compiled_s * 1e3:.3f}", cell], row
    assert row.rstrip(" |").endswith("met")  # the verdict stays against DESIGN.md's baseline (torch)
    assert "torch.compile(mode='default'" in out.splitlines()[0]
    # without compiled results the table keeps its columns (the committed h100/h200 tables)
    no_compiled = {"benchmarks": results["benchmarks"][:3]}
    assert "compiled" not in report.gpu_table(no_compiled)


def test_peaks_come_from_the_cold_run_by_case():
    warm = {"benchmarks": [{"fullname": "a[x]", "extra_info": {"peak_extra_memory_bytes": 0}},
                           {"fullname": "b[y]", "extra_info": {"peak_extra_memory_bytes": 5}}]}
    cold = {"benchmarks": [{"fullname": "b[y]", "extra_info": {"peak_extra_memory_bytes": 7 << 20}},
                           {"fullname": "a[x]", "extra_info": {"peak_extra_memory_bytes": 3 << 20}}]}
    out = report.with_peaks_from(warm, cold)
    assert [b["extra_info"]["peak_extra_memory_bytes"] for b in out["benchmarks"]] == [3 << 20, 7 << 20]
    assert all(b["extra_info"]["peak_from"].startswith("FASTGRPO_BENCH_ALLOCATOR=cold") for b in out["benchmarks"])
    missing = report.with_peaks_from({"benchmarks": [{"fullname": "c", "extra_info": {}}]}, cold)
    assert missing["benchmarks"][0]["extra_info"]["peak_extra_memory_bytes"] is None


def test_host_table_lists_the_host_benchmark_cases_only():
    def host(name, op, case, device, us, launches, ops, reads=None, kernels=None):
        info = {"device": device, "torch": "2.13", "triton": "3.7", "op": op, "case": case, "shape_name": "tiny",
                "shapes": {"x": [8, 4, 16, 16]}, "host_us": us, "kernel_launches": launches, "aten_ops": ops,
                "host_reads": reads}
        if kernels:
            info["kernels"] = kernels
        return {"name": name, "params": {}, "stats": {"median": us * 1e-6}, "extra_info": info}

    results = {"benchmarks": [
        host("test_host_sde_step[dispatched-sde_train-tiny-cpu]", "sde_step", "train", "cpu x1", 180.4, 3, 14,
             kernels="dispatched"),
        host("test_host_sde_step[stubbed-sde_train-tiny-cpu]", "sde_step", "train", "cpu x1", 113.9, 3, 14,
             kernels="stubbed"),
        host("test_host_sde_step[sde_sample-tiny-cuda]", "sde_step", "sample", "NVIDIA H200", 41.25, 2, 5, ["item"]),
        _bench("test_sample[a-torch]", {"impl": "torch"}, 1e-4),
    ]}
    rows = [line for line in report.host_table(results).splitlines() if line.startswith("| sde_step")]
    # one row per case: the dispatched time beside the stubbed one, (180.4 - 113.9) / 3 launches; a result without
    # "kernels" (recorded before the dispatched cases) counts as stubbed
    assert rows == ["| sde_step | sample | tiny (x 8x4x16x16) | cuda | 41.2 |  |  | 2 | 5 | 1 |",
                    "| sde_step | train | tiny (x 8x4x16x16) | cpu | 113.9 | 180.4 | 22.2 | 3 | 14 | 0 |"]
    with pytest.raises(SystemExit, match="test_bench_host"):
        report.host_table({"benchmarks": results["benchmarks"][3:]})


def test_gpu_probe_token_tiles_section():
    """bench/gpu_probe.py's ``token_tiles`` sweep: every candidate configuration runs the forward kernel and is
    compared with the current one, its rows handed over after each configuration (here a smoke run in Triton's
    interpreter at tiny shapes; on a GPU it runs last in bench/gpu_session.sh round, with the time left)."""
    import gpu_probe
    from fastgrpo.kernels import token_entropy

    if torch.cuda.is_available():
        pytest.skip("the full sweep runs on a GPU through bench/gpu_session.sh")

    original = token_entropy.fwd_config
    updates = []
    res = gpu_probe._token_tiles_probe(None, blocks=(16, 32), warps=(4,),
                                       shapes={"tiny": (2, 3, 37), "odd": (1, 5, 19)}, on_update=updates.append)
    assert token_entropy.fwd_config is original  # restored
    row = res["tiny"]
    assert row["current"] == original(37) and row["current_ms"] > 0
    # the four forward variants of each tile, back to back
    variants = [(True, False), (True, True), (False, False), (False, True)]  # (LANES, PREFETCH)
    assert [(r["BLOCK"], r["LANES"], r["PREFETCH"]) for r in row["configs"]] == \
        [(b, lanes, ahead) for b in (16, 32) for lanes, ahead in variants]
    assert all("ms" in r and r["max_abs_logp_diff"] < 1e-5 and r["pct_of_copy"] is None for r in row["configs"])
    assert row["best"] and row["best"][0]["ms"] == min(r["ms"] for r in row["configs"])
    # after each configuration at each shape, the rows so far (a sweep stopped at a time limit keeps them): every
    # configuration at both shapes before the next one
    assert [(len(u["tiny"]["configs"]), len(u["odd"]["configs"])) for u in updates] == \
        [(n, n - 1 + i) for n in range(1, 9) for i in range(2)]  # (1, 0), (1, 1), (2, 1), ... (8, 8)
    assert all(u["tiny"]["partial"] and u["odd"]["partial"] for u in updates)
    assert {k: v for k, v in updates[-1]["odd"].items() if k != "partial"} == res["odd"] and "partial" not in res["odd"]
    assert res["odd"]["current"] == original(19)
    assert [(r["LANES"], r["PREFETCH"]) for r in res["odd"]["configs"]] == variants * 2
    assert updates[-1]["odd"]["configs"] == res["odd"]["configs"] and "partial" not in res["odd"]


def test_probe_table_shows_the_token_tile_sweep_per_variant():
    """The sweep's rows become the current configuration and the fastest of each variant (a row whose output
    differs from the current one's is never picked; a sweep cut short says so)."""
    cur = {"BLOCK": 4096, "num_warps": 8, "LANES": True}
    rows = [{"BLOCK": 4096, "num_warps": 8, "LANES": True, "ms": 0.100, "pct_of_copy": 0.70, "max_abs_logp_diff": 0},
            {"BLOCK": 4096, "num_warps": 8, "LANES": False, "ms": 0.125, "pct_of_copy": 0.56,
             "max_abs_logp_diff": 1e-6},
            {"BLOCK": 2048, "num_warps": 4, "LANES": True, "ms": 0.090, "pct_of_copy": 0.78, "max_abs_logp_diff": 1e-6},
            {"BLOCK": 2048, "num_warps": 4, "LANES": False, "ms": 0.050, "pct_of_copy": 1.4, "max_abs_logp_diff": 3.0},
            {"BLOCK": 8192, "num_warps": 4, "LANES": False, "error": "OutOfResources"}]
    probe = {"device": "NVIDIA H200", "torch": "2.13.0", "triton": "3.7.1", "copy_gb_per_s": 4000.0,
             "token_tiles": {"image": {"current": cur, "current_ms": 0.101, "current_pct_of_copy": 0.69,
                                       "configs": rows, "best": rows[:3], "partial": True}}}
    lines = report.probe_table(probe).splitlines()
    body = [ln for ln in lines if ln.startswith("| image")]
    assert body == ["| image | current (lanes) | (4096, 8) | 0.101 | 69% | 4 (cut short) |",
                    "| image | fastest lanes | (2048, 4) | 0.090 | 78% | |",
                    "| image | fastest blocked | (4096, 8) | 0.125 | 56% | |"]
    # sweeps since PREFETCH: its rows get variants of their own (a row without the key has no prefetch)
    ahead = [{**rows[0], "PREFETCH": True, "ms": 0.080, "pct_of_copy": 0.88},
             {**rows[1], "BLOCK": 2048, "PREFETCH": True, "ms": 0.095, "pct_of_copy": 0.74},
             {**rows[1], "PREFETCH": False, "ms": 0.130, "pct_of_copy": 0.54}]
    probe["token_tiles"]["image"].update(configs=rows + ahead, current={**cur, "PREFETCH": True}, partial=False)
    body = [ln for ln in report.probe_table(probe).splitlines() if ln.startswith("| image")]
    assert body == ["| image | current (lanes + prefetch) | (4096, 8) | 0.101 | 69% | 7 |",
                    "| image | fastest lanes | (2048, 4) | 0.090 | 78% | |",
                    "| image | fastest blocked | (4096, 8) | 0.125 | 56% | |",
                    "| image | fastest lanes + prefetch | (4096, 8) | 0.080 | 88% | |",
                    "| image | fastest blocked + prefetch | (2048, 8) | 0.095 | 74% | |"]
    assert report.probe_table({**probe, "token_tiles": {}}) == report.probe_table(
        {k: v for k, v in probe.items() if k != "token_tiles"})


def _collector_probe(with_device: bool) -> dict:
    def way(ms, host, kern):
        w = {"ms": ms, "host_issue_ms": host, "cpu_aten_ops": 9458, "launch_calls": 2304, "device_kernels": 2365}
        return {**w, "kernel_ms": kern} if with_device else w

    row = {"plain": way(46.0, 45.5, 20.25), "collector": way(55.2, 55.0, 21.5),
           "collector_reused": way(50.6, 50.0, 21.5), "host_bound": True}
    return {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "copy_gb_per_s": 4000.0,
            "collector": {"layers": [5, 10, 15], "mode": "mixture", "b2": row}}


def test_probe_table_shows_the_collector_with_stubbed_kernels_when_recorded():
    """Probes since the stubbed way exists add its row (its overhead against plain) and say what it is; the
    table of a probe without it is unchanged."""
    probe = _collector_probe(True)
    row = probe["collector"]["b2"]
    row["collector_stubbed"] = {**row["collector"], "ms": 46.92, "host_issue_ms": 46.5, "launch_calls": 2298}
    table = report.probe_table(probe).splitlines()
    assert [ln for ln in table if ln.startswith("| 2 | collector_stubbed")] == [
        "| 2 | collector_stubbed | 46.92 | 46.50 | 21.50 | 9458 | 2298 | 2365 | +2.0% | yes |"]
    assert any("`collector_stubbed`: its cost without its launches" in ln for ln in table)
    del row["collector_stubbed"]
    assert not any("collector_stubbed" in ln for ln in report.probe_table(probe).splitlines())


def test_probe_table_shows_the_collectors_device_time_when_recorded():
    """The collector probe's kernel-time column appears when the probe recorded device time (probes since
    2026-12-01) and the older probes' table keeps its columns."""
    new = [ln for ln in report.probe_table(_collector_probe(True)).splitlines() if ln.startswith("| 2 ")]
    assert new == ["| 2 | plain | 46.00 | 45.50 | 20.25 | 9458 | 2304 | 2365 |  |  |",
                   "| 2 | collector | 55.20 | 55.00 | 21.50 | 9458 | 2304 | 2365 | +20.0% | yes |",
                   "| 2 | collector_reused | 50.60 | 50.00 | 21.50 | 9458 | 2304 | 2365 | +10.0% | yes |"]
    old = report.probe_table(_collector_probe(False)).splitlines()
    assert [ln for ln in old if ln.startswith("| 2 ")] == [
        "| 2 | plain | 46.00 | 45.50 | 9458 | 2304 | 2365 |  |  |",
        "| 2 | collector | 55.20 | 55.00 | 9458 | 2304 | 2365 | +20.0% | yes |",
        "| 2 | collector_reused | 50.60 | 50.00 | 9458 | 2304 | 2365 | +10.0% | yes |"]
    header = [ln for ln in old if ln.startswith("| batch")]
    assert header == ["| batch | way | ms | host issue ms | aten ops | launches | kernels | overhead | host-bound |"]


def test_probe_table_shows_the_training_calls_autograd_timeline_when_recorded():
    """Probes since 2026-12-01 time each training case's `torch.autograd.grad` (hand-over to the engine, the nodes,
    the hand-back): a table of its own; probes without it (bench/results/h200-probe.json) have none."""
    def op(timeline=None):
        return {"event_ms": 0.9, "kernel_ms": 0.02, "bytes": 10 ** 6, "kernels": {"k": 0.01},
                **({"autograd": timeline} if timeline else {})}

    ours = {"grad_us": 610.4, "to_first_node_us": 250.2, "nodes_us": 120.0, "between_nodes_us": 40.0,
            "after_last_node_us": 200.2, "nodes": 6, "other_thread": True, "calls": 20}
    eager = {**ours, "grad_us": 980.0, "nodes_us": 500.0, "nodes": 31}
    probe = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "copy_gb_per_s": 4000.0,
             "ops": {"sde_sample_sd35-512_bf16": op(), "sde_train_sd35-512_bf16": op(ours),
                     "sde_train_sd35-512_bf16_eager": op(eager)}}
    table = report.probe_table(probe).splitlines()
    rows = [ln for ln in table if ln.startswith("| sde_train") and ln.count("|") == 9]
    assert rows == ["| sde_train_sd35-512_bf16 | 610 | 250 | 120 | 40 | 200 | 6 | yes |",
                    "| sde_train_sd35-512_bf16_eager | 980 | 250 | 500 | 40 | 200 | 31 | yes |"]
    assert any(ln.startswith("| op | grad us | to the first node") for ln in table)
    old = report.probe_table(_load("h200-probe.json"))
    assert "grad us" not in old


def test_probe_table_says_where_the_collectors_extra_host_time_sits_when_recorded():
    """Probes since 2026-12-01 record the host time per transformer block: the report sets the selected blocks'
    extra time beside the others' sum and their largest; older probes get no such line."""
    probe = _collector_probe(True)
    extra = [0.01] * 24
    extra[5], extra[10], extra[15], extra[20] = 2.5, 2.25, 2.0, -0.5
    probe["collector"]["b2"]["extra_block_host_ms"] = extra
    lines = [ln for ln in report.probe_table(probe).splitlines() if ln.startswith("Host time per transformer block")]
    assert lines == ["Host time per transformer block, collector less plain (forward hooks, median ms per forward), "
                     "batch 2: selected blocks 5: +2.50, 10: +2.25, 15: +2.00; the other 21 blocks: -0.30 in all "
                     "(largest -0.50, block 20)."]
    del probe["collector"]["b2"]["extra_block_host_ms"]
    assert "Host time per transformer block" not in report.probe_table(probe)


def test_host_table_states_the_paired_whole_forward_as_a_sentence():
    """The whole-model host case (plain and collector forwards in alternation) is not a row of per-call host
    costs: the report states its paired differences below the table, the stubbed way first."""
    results = _load("cpu-host.json")
    results["benchmarks"] = [b for b in results["benchmarks"] if "collector_minus_plain_ms" not in b["extra_info"]]

    def paired(kernels, diff):
        return {"name": f"test_host_collector_whole_model[{kernels}-cpu]", "params": {}, "stats": {"median": 0.08},
                "extra_info": {"op": "SD3 transformer forward, plain then with the collector", "kernels": kernels,
                               "shape_name": "SD3.5-Medium's 24 blocks, tiny widths, batch 2", "device": "cpu x1",
                               "pairs": 100, "plain_ms": 38.04, "collector_ms": 38.04 + diff,
                               "collector_minus_plain_ms": diff, "collector_minus_plain_p20_p80_ms": [-2.4, 6.8],
                               **({"launches_ms": 0.474} if kernels == "dispatched" else {})}}

    results["benchmarks"] += [paired("dispatched", 1.22), paired("stubbed", 0.1)]
    out = report.host_table(results)
    assert "plain then with the collector" not in out.split("\n\n")[-2]  # no table row
    assert out.endswith("as the median of 100 differences between a plain forward and a collector forward taken "
                        "back to back (20th to 80th percentile in brackets): with the kernels stubbed +0.10 ms (-2.4 "
                        "to +6.8; plain 38.0 ms); with Triton's launch path (dispatched) +1.22 ms (-2.4 to +6.8; "
                        "plain 38.0 ms, its six launch calls 0.47 ms).")
