r"""CPU comparison table of the C++ extension against the torch reference, from recorded benchmark results.

    # record (on a quiet machine, please):
    pytest bench/test_bench_token.py bench/test_bench_sde.py bench/test_bench_ovf.py -k "torch or cpp or compiled" \
        --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json                      # print the markdown table
    python bench/report.py bench/results/cpu.json --readme README.md   # rewrite the README's table

For every benchmark case run with both impl="torch" and impl="cpp" on CPU, the table gives both median times, the
speed-up (torch / cpp), both peak extra memories (``peak_extra_memory_bytes``, see bench/harness.py) and their
ratio (cpp / torch), plus the machine, thread count and versions recorded with the numbers. Where the results hold
the compiled baseline (``impl="compiled"``: torch.compile of the reference's formula, bench/compiled.py), two more
columns: its median time and ours against it (compiled / cpp), with "(compiled is faster)" where ours is slower.
Nothing is typed by hand: the README section between the markers is replaced by this output.

GPU results (``pytest bench/ --benchmark-json=bench/results/h100.json`` on a CUDA machine) get their own table,
written between ``<!-- gpu-bench:start -->`` and ``<!-- gpu-bench:end -->`` by ``--gpu``::

    python bench/report.py bench/results/h100.json --gpu --probe bench/results/h100-probe.json --readme README.md

It sets every Triton case against the baseline DESIGN.md §5 names (SDPA flash attention; the torch eager
references; OVF's per-group loop), checks the targets (speed-up, fraction of the measured copy bandwidth, peak
extra memory, AEGPO's whole-step overhead) and says "met" or "gap" for each; where the results hold the compiled
baseline, each Triton case is also set against it (compiled ms, and "vs compiled": compiled / triton).

The host cost of the Triton launchers (bench/test_bench_host.py: every kernel stubbed, host time only) gets a table of
its own with ``--host``, written between ``<!-- host-bench:start -->`` and ``<!-- host-bench:end -->``::

    pytest bench/test_bench_host.py --benchmark-json=bench/results/cpu-host.json
    python bench/report.py bench/results/cpu-host.json --host --readme README.md
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- cpu-bench:start -->", "<!-- cpu-bench:end -->"
GPU_START, GPU_END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"
HOST_START, HOST_END = "<!-- host-bench:start -->", "<!-- host-bench:end -->"


def _case(bench: dict) -> str:
    """The benchmark's name without its impl id: the key that pairs torch with cpp (and compiled)."""
    name = bench["name"]
    if "[" not in name:
        return name
    base, ids = name[:-1].split("[", 1)
    kept = [p for p in ids.split("-") if p not in ("torch", "cpp", "compiled")]
    return f"{base}[{'-'.join(kept)}]" if kept else base


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f}"


def _ratio(num, den) -> str:
    if num is None or not den:
        return "n/a"
    r = num / den
    return f"{r:.3f}" if r >= 0.001 else f"{r:.1e}"


def vs_compiled(compiled_s: float | None, ours_s: float) -> str:
    """Ours against the compiled baseline: ``compiled / ours`` as "2.00x", or "0.70x (compiled is faster)" where
    ours is slower; "n/a" without a compiled time."""
    if not compiled_s or not ours_s:
        return "n/a"
    r = compiled_s / ours_s
    return f"{r:.2f}x" + (" (compiled is faster)" if r < 1 else "")


def _compile_note(benches) -> str:
    """One sentence on the compiled baseline (its mode, what is compiled), '' when no result holds one."""
    modes = sorted({str(b["extra_info"].get("compile_mode")) for b in benches
                    if (b.get("params") or {}).get("impl") == "compiled"})
    if not modes:
        return ""
    return (f" Compiled: torch.compile(mode={'/'.join(repr(m) for m in modes)}, fullgraph=True, dynamic=False) of the "
            "reference's plain formula (bench/compiled.py), compiled and warmed up before timing.")


def table(results: dict) -> str:
    pairs: dict[str, dict[str, dict]] = {}
    cpu = [b for b in results["benchmarks"] if str(b["extra_info"].get("device", "")).startswith("cpu")]
    for b in cpu:
        impl = (b.get("params") or {}).get("impl")
        if impl in ("torch", "cpp", "compiled"):
            pairs.setdefault(_case(b), {})[impl] = b
    has_compiled = any("compiled" in p for p in pairs.values())
    info = results.get("machine_info", {})
    first = next((p["cpp"]["extra_info"] for p in pairs.values() if "cpp" in p), {})
    lines = [
        f"CPU: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
        f"{first.get('device', '?')}; torch {first.get('torch', '?')}; recorded {results.get('datetime', '?')}"
        f" ({Path(results.get('_source', '')).name}).{_compile_note(cpu)}",
        "",
    ]
    if has_compiled:
        lines += ["| case | shapes | torch ms | compiled ms | cpp ms | speed-up | vs compiled | torch peak MiB | "
                  "cpp peak MiB | memory ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| case | shapes | torch ms | cpp ms | speed-up | torch peak MiB | cpp peak MiB | memory ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case in sorted(pairs):
        p = pairs[case]
        if "torch" not in p or "cpp" not in p:
            continue
        t, c = p["torch"], p["cpp"]
        tm, cm = t["stats"]["median"], c["stats"]["median"]
        tp, cp = t["extra_info"].get("peak_extra_memory_bytes"), c["extra_info"].get("peak_extra_memory_bytes")
        ratio = _ratio(cp, tp)
        shapes = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in c["extra_info"].get("shapes", {}).items())
        xm = p["compiled"]["stats"]["median"] if "compiled" in p else None
        cells = [case, shapes, f"{tm * 1e3:,.1f}"]
        if has_compiled:
            cells.append("n/a" if xm is None else f"{xm * 1e3:,.1f}")
        cells += [f"{cm * 1e3:,.1f}", f"{tm / cm:.1f}x"]
        if has_compiled:
            cells.append(vs_compiled(xm, cm))
        lines.append("| " + " | ".join(cells + [_mib(tp), _mib(cp), ratio]) + " |")
    return "\n".join(lines)


def host_table(results: dict) -> str:
    """The host cost of the Triton launchers (bench/test_bench_host.py): per case, the median host time of one call
    with every kernel stubbed, and where recorded (CPU tensors) with the kernels going through Triton's own launch
    path against a stand-in driver, the difference per launch; its kernel launches, the torch ops it dispatches and
    how many of them read a value back to the host. A result without ``kernels`` (recorded before the dispatched
    cases existed) counts as stubbed."""
    host = sorted((b for b in results["benchmarks"] if _fn(b).startswith("test_host_")), key=lambda b: b["name"])
    if not host:
        raise SystemExit("no bench/test_bench_host.py results in this file")
    e0 = host[0]["extra_info"]
    info = results.get("machine_info", {})
    threads = next((b["extra_info"]["device"] for b in host
                    if str(b["extra_info"].get("device")).startswith("cpu")), "")

    def tensors(e):
        return "cpu" if str(e.get("device", "cpu")).startswith("cpu") else "cuda"

    def us(b):
        return b["extra_info"].get("host_us", b["stats"]["median"] * 1e6)

    def key(e):
        return e.get("op"), e.get("case"), e.get("shape_name"), tensors(e)

    dispatched = {key(b["extra_info"]): b for b in host if b["extra_info"].get("kernels") == "dispatched"}
    lines = [f"Host cost per call (bench/test_bench_host.py), median host time: with every kernel stubbed (no "
             "device work, no Triton launch path: `fastgrpo.testing.stubbed_kernels`), and for CPU tensors also "
             "with the compiled kernels going through Triton's own launch path (argument binding, specialisation, "
             "cache lookup, launch metadata) against a stand-in CUDA driver that records each launch instead of "
             "calling the GPU (`fastgrpo.testing.dispatched_kernels`; what is left out is the driver call itself). "
             f"CPU: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, {threads}; "
             f"torch {e0.get('torch')}, "
             f"triton {e0.get('triton')}; recorded {results.get('datetime', '?')} "
             f"({Path(results.get('_source', '')).name}).", "",
             "Host reads: reads of a tensor's value on the host by fastgrpo's code (`.item()`, `.tolist()`, ...; "
             "`fastgrpo.testing.host_reads`), each a device sync with CUDA tensors.", "",
             "| op | case | shapes | tensors | host us, kernels stubbed | host us, Triton launch path | "
             "launch path us per launch | kernel launches | torch ops | host reads |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    paired = [b for b in host if "collector_minus_plain_ms" in b["extra_info"]]  # a sentence below, not rows
    for b in host:
        e = b["extra_info"]
        if e.get("kernels", "stubbed") != "stubbed" or b in paired:
            continue
        shapes = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in e.get("shapes", {}).items())
        d = dispatched.get(key(e))
        launches = e.get("kernel_launches")
        via = per_launch = ""
        if d is not None:
            via = f"{us(d):,.1f}"
            per_launch = f"{(us(d) - us(b)) / launches:,.1f}" if launches else ""
        lines.append(f"| {e.get('op', _fn(b))} | {e.get('case', '')} | {e.get('shape_name', '')} ({shapes}) | "
                     f"{tensors(e)} | {us(b):,.1f} | {via} | {per_launch} | {launches} | {e.get('aten_ops')} | "
                     f"{len(e.get('host_reads') or [])} |")
    lines += _paired_forward_lines(paired)
    return "\n".join(lines)


def _paired_forward_lines(paired: list) -> list:
    """bench/test_bench_host.py's whole-model case (``test_host_collector_whole_model``): plain and collector
    forwards in alternation, the median of the paired differences per way the kernels were replaced."""
    if not paired:
        return []
    e0 = paired[0]["extra_info"]
    text = {"stubbed": "with the kernels stubbed", "dispatched": "with Triton's launch path (dispatched)"}
    parts = []
    for b in sorted(paired, key=lambda b: b["extra_info"].get("kernels", "stubbed") != "stubbed"):
        e = b["extra_info"]
        lo, hi = e["collector_minus_plain_p20_p80_ms"]
        launches = f", its six launch calls {e['launches_ms']:.2f} ms" if e.get("launches_ms") is not None else ""
        parts.append(f"{text.get(e.get('kernels', 'stubbed'), e.get('kernels'))} {e['collector_minus_plain_ms']:+.2f} "
                     f"ms ({lo:+.1f} to {hi:+.1f}; plain {e['plain_ms']:.1f} ms{launches})")
    when = f", recorded {e0['recorded']}" if e0.get("recorded") else ""
    return ["", f"A whole forward ({e0['shape_name']}, CPU tensors{when}): what a collector constructed per forward "
            f"(layers 5/10/15) adds to its host time, as the median of {e0['pairs']} differences between a plain "
            "forward and a collector forward taken back to back (20th to 80th percentile in brackets): "
            + "; ".join(parts) + "."]


# ------------------------------------------------------------------------------------------------ GPU table

# test function -> (baseline impl, minimum speed-up over it, minimum fraction of the copy bandwidth, maximum peak
# extra memory relative to the baseline); None where DESIGN.md §5 sets no such target.
GPU_TARGETS = {
    "test_attention_with_text_entropy": ("sdpa", 0.90, None, None),
    "test_forward": ("torch", 4.0, 0.80, 0.10),
    "test_train": ("torch", 4.0, 0.80, 0.10),
    "test_sample": ("torch", 3.0, 0.80, None),
    "test_train_fwd_bwd": ("torch", 3.0, 0.80, None),
    "test_ovf_select": ("loop", None, None, None),
}
# Per-case minimum fraction of the copy bandwidth where an issue changed DESIGN.md's (issue 19: eg_grpo_shaping at
# the T2I-R1 shapes, >= 50% of copy).
CASE_MIN_BW = {("test_forward", "shaping"): 0.50, ("test_forward", "shaping_novalidate"): 0.50}
OVF_TARGET_S = 1e-3  # "one launch for 10^4 groups of 48 in well under 1 ms"
STEP_OVERHEAD_TARGET = 0.01  # collector: "< 1% of a denoising step"
STEP_OVERHEAD_TARGET_BY_BATCH = {2: 0.03}  # issue 19: "at batch 2 adds under 3% to the forward"
ROUND_SPEEDUP_TARGET = 1.3  # issue 19: a whole round at >= 1.3x the eager round's images/s


def _fn(bench: dict) -> str:
    return bench["name"].split("[", 1)[0]


def _param(v) -> str:
    text = str(v)  # pytest-benchmark stores torch dtypes as "UNSERIALIZABLE[torch.bfloat16]"
    return re.sub(r"UNSERIALIZABLE\[torch\.(\w+)\]", r"\1", text)


def _key(bench: dict, drop=("impl", "way")) -> tuple:
    params = {k: _param(v) for k, v in (bench.get("params") or {}).items() if k not in drop}
    return (_fn(bench), tuple(sorted(params.items())))


def _ms(bench: dict) -> str:
    e = bench["extra_info"]
    med = e.get("median_s", bench["stats"]["median"])
    if "q20_s" in e:
        return f"{med * 1e3:.3f} ({e['q20_s'] * 1e3:.3f}-{e['q80_s'] * 1e3:.3f})"
    return f"{med * 1e3:.3f}"


def _median(bench: dict) -> float:
    return bench["extra_info"].get("median_s", bench["stats"]["median"])


def _verdict(checks: list[tuple[str, bool]]) -> str:
    if not checks:
        return "n/a"
    gaps = [what for what, ok in checks if not ok]
    return "met" if not gaps else "gap: " + ", ".join(gaps)


def gpu_table(results: dict) -> str:
    benches = [b for b in results["benchmarks"] if str(b["extra_info"].get("device", "")).startswith("NVIDIA")
               or (b["extra_info"].get("cuda") and not str(b["extra_info"].get("device", "")).startswith("cpu"))]
    if not benches:
        raise SystemExit("no CUDA results in this file")
    by_key: dict[tuple, dict[str, dict]] = {}
    for b in benches:
        params = b.get("params") or {}
        by_key.setdefault(_key(b), {})[str(params.get("impl", params.get("way", "")))] = b
    ceil = {b["params"]["ceiling"]: b for b in benches if _fn(b) == "test_ceiling"}
    copy_gbps = ceil["copy"]["extra_info"]["gb_per_s"] if "copy" in ceil else None
    e0 = benches[0]["extra_info"]
    lines = [f"GPU: {e0.get('device')}, driver {e0.get('driver')}, CUDA {e0.get('cuda')}; torch {e0.get('torch')}, "
             f"triton {e0.get('triton')}; recorded {results.get('datetime', '?')} "
             f"({Path(results.get('_source', '')).name}). Times: median of CUDA-event timings with the L2 flushed "
             "before each call (20th-80th percentile in brackets).", ""]
    if ceil:
        parts = []
        if "copy" in ceil:
            parts.append(f"device-to-device copy {copy_gbps:,.0f} GB/s (read + write, "
                         f"{'x'.join(map(str, ceil['copy']['extra_info']['shapes']['src']))} bf16)")
        if "gemm" in ceil:
            parts.append(f"bf16 GEMM {ceil['gemm']['extra_info']['tflops']:,.0f} TFLOP/s "
                         f"({ceil['gemm']['extra_info']['shapes']['a'][0]}^3)")
        lines += ["Ceilings: " + "; ".join(parts) + ".", ""]
    has_compiled = any("compiled" in g and "triton" in g for g in by_key.values())
    if has_compiled:
        lines[0] += _compile_note(benches)
        lines += ["| op | case | ours ms | baseline | baseline ms | speed-up | compiled ms | vs compiled | "
                  "GB/s (% of copy) | TFLOP/s | peak extra MiB ours / baseline | target | verdict |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    else:
        lines += ["| op | case | ours ms | baseline | baseline ms | speed-up | GB/s (% of copy) | TFLOP/s | "
                  "peak extra MiB ours / baseline | target | verdict |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for key in sorted(by_key):
        fn, params = key
        group = by_key[key]
        if fn not in GPU_TARGETS or "triton" not in group:
            continue
        base_impl, min_speedup, min_bw, max_mem = GPU_TARGETS[fn]
        min_bw = CASE_MIN_BW.get((fn, dict(params).get("case")), min_bw)
        ours = group["triton"]
        base = group.get(base_impl)
        e = ours["extra_info"]
        case = ", ".join(f"{k}={v}" for k, v in params)
        checks, target = [], []
        speed = f"{_median(base) / _median(ours):.2f}x" if base else "n/a"
        if base and min_speedup:
            target.append(f">= {min_speedup:g}x {base_impl}")
            checks.append((f"{speed} < {min_speedup:g}x", _median(base) / _median(ours) >= min_speedup))
        bw = e.get("gb_per_s")
        bw_cell = f"{bw:,.0f}" if bw else "n/a"
        if bw and copy_gbps:
            bw_cell += f" ({bw / copy_gbps:.0%})"
            if min_bw:
                target.append(f">= {min_bw:.0%} of copy")
                checks.append((f"{bw / copy_gbps:.0%} of copy", bw / copy_gbps >= min_bw))
        mine, theirs = e.get("peak_extra_memory_bytes"), base["extra_info"].get("peak_extra_memory_bytes") if base else None
        if max_mem and mine is not None and theirs:
            target.append(f"memory <= {max_mem:g}x")
            checks.append((f"memory {mine / theirs:.2f}x", mine <= max_mem * theirs))
        if fn == "test_ovf_select":
            target.append("well under 1 ms")
            checks.append((f"{_median(ours) * 1e3:.3f} ms", _median(ours) < OVF_TARGET_S))
        tflops = e.get("tflops")
        comp = group.get("compiled")
        compiled = (f"{_ms(comp) if comp else 'n/a'} | {vs_compiled(_median(comp) if comp else None, _median(ours))}"
                    " | ") if has_compiled else ""
        lines.append(f"| {fn.removeprefix('test_')} | {case} | {_ms(ours)} | {base_impl if base else 'n/a'} | "
                     f"{_ms(base) if base else 'n/a'} | {speed} | {compiled}{bw_cell} | "
                     f"{f'{tflops:,.0f}' if tflops else ''} | {_mib(mine)} / {_mib(theirs)} | "
                     f"{'; '.join(target) or 'n/a'} | {_verdict(checks)} |")
    steps = {k: g for k, g in by_key.items() if k[0] == "test_denoising_step" and "plain" in g}
    if steps:
        first = next(iter(steps.values()))["plain"]["extra_info"]
        lines += ["", f"AEGPO whole step: one no-grad forward of an SD3.5-Medium-shaped transformer "
                  f"({first.get('num_layers')} joint blocks, {first.get('heads')} heads x {first.get('head_dim')}, "
                  f"{first.get('params', 0) / 1e9:.2f} B random bf16 weights, {first.get('n_image')} image + "
                  f"{first.get('n_text')} text tokens), Entropy(t) from layers {first.get('layers')} "
                  "(mode mixture). AEGPO reports 11.1% time and +1 GB for its map extraction.", "",
                  "| batch | way | ms | time over plain | peak extra MiB | memory over plain MiB | target | verdict |",
                  "|---:|---|---:|---:|---:|---:|---|---|"]
        for key in sorted(steps, key=lambda k: int(dict(k[1]).get("batch", 0))):
            group = steps[key]
            plain = group["plain"]
            pm = plain["extra_info"].get("peak_extra_memory_bytes") or 0
            for way in ("plain", "collector", "eager_maps"):
                if way not in group:
                    continue
                b = group[way]
                over = _median(b) / _median(plain) - 1
                mem = b["extra_info"].get("peak_extra_memory_bytes")
                target, verdict = "", ""
                if way == "collector":
                    limit = STEP_OVERHEAD_TARGET_BY_BATCH.get(int(dict(key[1]).get("batch", 0)), STEP_OVERHEAD_TARGET)
                    target = f"< {limit:.0%} of the step"
                    verdict = _verdict([(f"{over:+.1%}", over < limit)])
                lines.append(f"| {dict(key[1]).get('batch')} | {way} | {_ms(b)} | "
                             f"{'' if way == 'plain' else f'{over:+.1%}'} | {_mib(mem)} | "
                             f"{'' if way == 'plain' or mem is None else _mib(mem - pm)} | {target} | {verdict} |")
    rounds = round_table(results)
    if rounds:
        lines += ["", rounds]
    return "\n".join(lines)


def round_table(results: dict) -> str:
    """The whole-round benchmark (bench/test_bench_round.py) on CUDA: each path against the eager one."""
    rounds = [b for b in results["benchmarks"] if _fn(b) == "test_round" and b["extra_info"].get("cuda")
              and not str(b["extra_info"].get("device", "")).startswith("cpu")]
    what = {"eager": "impl=torch, no compile, no graphs", "fast_nocompile": "impl=auto, sample.cuda_graphs",
            "fast": "impl=auto, sample.cuda_graphs, model.compile"}
    lines = []
    for b in rounds:
        e, sh = b["extra_info"], b["extra_info"]["shape"]
        paths = e["paths"]
        eager = paths["eager"]
        lines += [f"Whole Flow-GRPO round (bench/test_bench_round.py): SD3.5-Medium-shaped transformer "
                  f"({sh['layers']} joint blocks, {sh['heads']} heads x {sh['head_dim']}, {sh['params'] / 1e9:.2f} B "
                  f"random {sh['dtype']} weights, {sh['image_tokens']} image + {sh['text_tokens']} text tokens), "
                  f"LoRA r = {sh['lora_rank']}, {sh['prompts']} prompts x {sh['group_size']} rollouts in chunks of "
                  f"{sh['batch_size']}, {sh['num_steps']} steps, CFG, KL; {e['device']}, torch {e['torch']}, "
                  f"triton {e['triton']}. Median of {len(eager['round_times_s'])} rounds after a warm-up round "
                  "(warm-up: the first sampling and round, with compilation and graph capture; in brackets, where "
                  "the path compiled, the seconds Dynamo and Inductor spent, the graphs they made and how many "
                  "of them Inductor's on-disk cache served). MFU: transformer "
                  f"FLOPs per second over the bf16 GEMM rate measured in the same test ({e['gemm_tflops']:,.0f} "
                  "TFLOP/s). " + ("Each fast path was compared with the eager path before it was timed "
                                  "(agreement: relative L2 differences of the step-0 rewards / final latents / the "
                                  "gradient of a training pass over the eager path's rollouts; a path beyond a "
                                  "tolerance is not comparable)." if len(paths) > 1 else
                                  "Only the eager path was timed in this run."), "",
                  "| path | images/s | round s | sample s | train s | optimizer s | warm-up s | peak GiB | MFU | "
                  "agreement | speed-up | target | verdict |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
        for name, r in paths.items():
            ph, mem, agree = r["phases_s"], r.get("peak_memory_bytes"), r.get("agreement")
            speed = eager["round_s"] / r["round_s"]
            row = (f"| {name} ({what.get(name, '')}) | {r['images_per_s']:.3f} | {r['round_s']:.2f} | "
                   f"{ph['sample']:.2f} | {ph['train']:.2f} | {ph['optimizer']:.3f} | {_warmup_cell(r)} | "
                   f"{'n/a' if mem is None else f'{mem / 2**30:.1f}'} | {r['mfu']:.1%} | ")
            row += ("" if agree is None else f"{agree['rewards_rel_l2']:.0e} / {agree['latents_rel_l2']:.0e} / "
                    f"{agree['grad_rel_l2']:.0e}") + " | "
            beyond = (agree or {}).get("beyond_tolerance")
            if name == "eager":
                row += " |  |  |"
            elif beyond:  # timed, but its rollouts or gradient differ from the eager path's: no verdict
                row += (f"{speed:.2f}x | >= {ROUND_SPEEDUP_TARGET:g}x eager | not comparable: "
                        f"{'; '.join(beyond)} |")
            else:
                row += (f"{speed:.2f}x | >= {ROUND_SPEEDUP_TARGET:g}x eager | "
                        f"{_verdict([(f'{speed:.2f}x', speed >= ROUND_SPEEDUP_TARGET)])} |")
            lines.append(row)
    return "\n".join(lines)


def _warmup_cell(path: dict) -> str:
    """A round path's warm-up seconds, with what it compiled when it compiled anything (``compile``, recorded
    since 2026-12-01: older results have none): Dynamo's graphs, and where Inductor's on-disk cache served some,
    how many of Inductor's graphs (forward and backward ones) it served."""
    c = path.get("compile") or {}
    cell = f"{path['warmup_s']:.0f}"
    if c.get("graphs"):
        cell += f" ({c['compile_s']:.0f} s compiling {c['graphs']} graphs"
        hits = c.get("fxgraph_cache_hits", 0)
        cell += f"; {hits} of {hits + c.get('fxgraph_cache_misses', 0)} Inductor graphs from its cache)" if hits else ")"
    return cell


def merge(runs: list[dict]) -> dict:
    """One results dict from several pytest-benchmark runs (the first run's machine info and date)."""
    merged = dict(runs[0])
    merged["benchmarks"] = [b for run in runs for b in run["benchmarks"]]
    return merged


def probe_table(probe: dict) -> str:
    """Where each op's time goes (bench/gpu_probe.py): one call's CUDA-event time beside the summed time of the
    kernels it launches (torch.profiler, 20 calls back to back, so inputs under the 50 MB L2 may be served from it)."""
    copy = probe["copy_gb_per_s"]
    lines = [f"Where the time goes ({probe['device']}, torch {probe['torch']}, triton {probe['triton']}; "
             "bench/gpu_probe.py): one call timed with CUDA events beside the summed device time of the kernels it "
             "launches (torch.profiler; back-to-back calls, so inputs smaller than the L2 may be read from it).", "",
             "| op | call ms | kernels ms | kernels | GB/s of the kernels (% of copy) | largest kernel |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in probe.get("ops", {}).items():
        top = next(iter(r["kernels"].items()), ("", 0.0))
        gbps = r["bytes"] / r["kernel_ms"] / 1e6
        lines.append(f"| {name} | {r['event_ms']:.3f} | {r['kernel_ms']:.3f} | {len(r['kernels'])} | "
                     f"{gbps:,.0f} ({gbps / copy:.0%}) | {top[0][:40]} ({top[1] * 1e3:.1f} us) |")
    timelines = {name: r["autograd"] for name, r in probe.get("ops", {}).items() if r.get("autograd")}
    if timelines:  # recorded by probes since 2026-12-01
        lines += ["", "The training cases' `torch.autograd.grad` (bench/gpu_probe.py, torch.profiler; median us per "
                  "call): until the autograd engine starts the first backward node (on CUDA the nodes run on the "
                  "engine's device thread, so this is the hand-over to it), the nodes' own time (launches included), "
                  "the gaps between them, and from the last node's end until the call returns (the hand-back). "
                  "`_eager` is the eager reference (`impl=\"torch\"`).", "",
                  "| op | grad us | to the first node | nodes | between nodes | after the last node | nodes run | "
                  "on another thread |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, t in timelines.items():
            lines.append(f"| {name} | {t['grad_us']:.0f} | {t['to_first_node_us']:.0f} | {t['nodes_us']:.0f} | "
                         f"{t['between_nodes_us']:.0f} | {t['after_last_node_us']:.0f} | {t['nodes']:.0f} | "
                         f"{'yes' if t['other_thread'] else 'no'} |")
    col = probe.get("collector")
    if col:
        batches = sorted((k for k in col if k.startswith("b") and k[1:].isdigit()), key=lambda k: int(k[1:]))
        # the kernels' summed device time per forward: recorded by probes since 2026-12-01 (a column only then)
        device = any(w.get("kernel_ms") is not None for k in batches for w in col[k].values() if isinstance(w, dict))
        reused = any("collector_reused" in col[k] for k in batches)  # ways recorded by probes since 2026-12-01
        stubbed = any("collector_stubbed" in col[k] for k in batches)
        lines += ["", f"AEGPO collector probe (bench/gpu_probe.py; layers {col['layers']}, mode {col['mode']}): one "
                  "no-grad forward of the SD3.5-Medium-shaped transformer, median of CUDA-event times; host issue: "
                  "time until the forward returns, before synchronising; aten ops and kernels per forward"
                  + (", and the kernels' summed device time," if device else "") + " from torch.profiler."
                  + (" Ways: a collector constructed per forward (as the benchmark times it), one entered once for "
                     "all forwards (`collector_reused`, AEGPO's use)" if reused else "")
                  + (", and one constructed per forward with its attention kernels stubbed (`collector_stubbed`: "
                     "its cost without its launches)" if stubbed else "") + ("." if reused else ""), "",
                  "| batch | way | ms | host issue ms | " + ("kernel ms | " if device else "")
                  + "aten ops | launches | kernels | overhead | host-bound |",
                  "|---:|---|---:|---:|" + ("---:|" if device else "") + "---:|---:|---:|---:|---|"]
        for key in batches:
            r = col[key]
            for way in ("plain", "collector", "collector_reused", "collector_stubbed"):
                if way not in r:
                    continue
                w = r[way]
                over = "" if way == "plain" else f"{w['ms'] / r['plain']['ms'] - 1:+.1%}"
                bound = "" if way == "plain" else ("yes" if r["host_bound"] else "no")
                kern = "" if not device else (f"{w['kernel_ms']:.2f} | " if w.get("kernel_ms") is not None
                                              else "n/a | ")
                lines.append(f"| {key[1:]} | {way} | {w['ms']:.2f} | {w['host_issue_ms']:.2f} | {kern}"
                             f"{w['cpu_aten_ops']} | {w['launch_calls']} | {w['device_kernels']} | {over} | "
                             f"{bound} |")
        lines += _block_host_lines(col, batches)
    att = probe.get("attention")
    if att:
        lines += ["", "Attention tiles (bench/gpu_probe.py sweep, bf16): the two fastest per case; the tiles the kernel "
                  "uses per head dim are in kernels/attention_entropy.py (_attention_config).", "",
                  "| case | SDPA flash ms | best (BLOCK_M, BLOCK_N, warps, stages) | ms | vs SDPA |",
                  "|---|---:|---|---:|---:|"]
        for case, r in att.items():
            for b in r["best"][:2]:
                lines.append(f"| {case} | {r['sdpa_ms']:.3f} | ({b['BLOCK_M']}, {b['BLOCK_N']}, {b['num_warps']}, "
                             f"{b['num_stages']}) | {b['ms']:.3f} | {b['vs_sdpa']:.2f}x |")
    lines += _token_tiles_lines(probe.get("token_tiles"))
    return "\n".join(lines)


def _block_host_lines(col: dict, batches: list) -> list:
    """Where the collector's extra host time sits, block by block (``extra_block_host_ms``: collector less plain,
    host time per transformer block from forward hooks; probes since 2026-12-01): the selected blocks one by one,
    the others summed, and the largest of those."""
    rows = [(key, col[key]["extra_block_host_ms"]) for key in batches if col[key].get("extra_block_host_ms")]
    if not rows:
        return []
    lines = [""]
    for key, extra in rows:
        layers = [i for i in col["layers"] if i < len(extra)]
        others = [(x, i) for i, x in enumerate(extra) if i not in layers]
        big = max(others, key=lambda o: abs(o[0])) if others else (0.0, None)
        lines.append(f"Host time per transformer block, collector less plain (forward hooks, median ms per forward), "
                     f"batch {key[1:]}: selected blocks " + ", ".join(f"{i}: {extra[i]:+.2f}" for i in layers)
                     + f"; the other {len(others)} blocks: {sum(x for x, _ in others):+.2f} in all (largest "
                     f"{big[0]:+.2f}, block {big[1]}).")
    return lines


def _token_variant(cfg: dict) -> str:
    """A token forward configuration's variant: "lanes" or "blocked", "+ prefetch" when it loads a step ahead
    (sweeps before PREFETCH existed have no such key: no prefetch)."""
    return ("lanes" if cfg.get("LANES") else "blocked") + (" + prefetch" if cfg.get("PREFETCH") else "")


def _token_tiles_lines(tiles) -> list:
    """The token forward's tile sweep (bench/gpu_probe.py ``token_tiles``): per shape, the current configuration
    and the fastest of each variant (per-lane statistics or blocked update, each with or without prefetch), in %
    of copy bandwidth."""
    if not tiles:
        return []
    lines = ["", "Token forward tiles (bench/gpu_probe.py sweep, bf16 logits, no grad, validate=False): the current "
             "configuration (kernels/token_entropy.py, fwd_config) and the fastest of each variant (LANES: per-lane "
             "statistics; blocked: one running triple, three block reductions per step; prefetch: each block loaded "
             "one step ahead).", "",
             "| shape | configuration | (BLOCK, warps) | ms | % of copy | configurations timed |",
             "|---|---|---|---:|---:|---:|"]
    pct = lambda v: "" if v is None else f"{v:.0%}"  # noqa: E731
    for shape, r in tiles.items():
        timed = [c for c in r["configs"] if "ms" in c]
        done = f"{len(timed)}" + (" (cut short)" if r.get("partial") else "")
        cur = r["current"]
        lines.append(f"| {shape} | current ({_token_variant(cur)}) | ({cur['BLOCK']}, "
                     f"{cur['num_warps']}) | {r['current_ms']:.3f} | {pct(r['current_pct_of_copy'])} | {done} |")
        for variant in ("lanes", "blocked", "lanes + prefetch", "blocked + prefetch"):
            ok = [c for c in timed if _token_variant(c) == variant and c["max_abs_logp_diff"] < 1e-2]
            if ok:
                b = min(ok, key=lambda c: c["ms"])
                lines.append(f"| {shape} | fastest {variant} | ({b['BLOCK']}, {b['num_warps']}) | {b['ms']:.3f} | "
                             f"{pct(b['pct_of_copy'])} | |")
    return lines


def _rewrite(path: Path, start: str, end: str, out: str) -> None:
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{out}\n{end}", text, flags=re.S)
    path.write_text(text)


def with_peaks_from(results: dict, cold: dict) -> dict:
    """``results`` (timed with the warm allocator) with each case's ``peak_extra_memory_bytes`` from ``cold`` (the
    same cases run with ``FASTGRPO_BENCH_ALLOCATOR=cold``: every large allocation freshly mapped, so each call's
    peak shows); the source is recorded as ``peak_from``. A case missing from ``cold`` keeps no peak (None)."""
    peaks = {b["fullname"]: b["extra_info"].get("peak_extra_memory_bytes") for b in cold.get("benchmarks", [])}
    for b in results.get("benchmarks", []):
        b["extra_info"]["peak_extra_memory_bytes"] = peaks.get(b["fullname"])
        b["extra_info"]["peak_from"] = "FASTGRPO_BENCH_ALLOCATOR=cold run"
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_readme.py parses the README's report.py lines with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json); several are merged")
    ap.add_argument("--gpu", action="store_true", help="the GPU table (CUDA results) instead of the CPU one")
    ap.add_argument("--readme", help="rewrite the table's section (between its markers) in this file")
    ap.add_argument("--save-merged", help="write the merged results to this JSON file")
    ap.add_argument("--probe", help="with --gpu: also the table of bench/gpu_probe.py's probe.json")
    ap.add_argument("--peaks-from", help="take each case's peak memory from this JSON (a FASTGRPO_BENCH_ALLOCATOR=cold "
                                         "run of the same cases; `bench/harness.py`) and write the merge back")
    ap.add_argument("--host", action="store_true",
                    help="the host-cost table (bench/test_bench_host.py results) instead of the CPU one")
    ap.add_argument("--section", default="gpu-bench",
                    help="with --gpu --readme: the README section's marker name (<!-- NAME:start --> ... end)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.results if Path(f).stat().st_size]  # empty: run died
    if not runs:
        raise SystemExit(f"no results in {args.results}")
    results = merge(runs)
    if args.save_merged:
        Path(args.save_merged).write_text(json.dumps(results, indent=1))
    if args.peaks_from:
        results = with_peaks_from(results, json.loads(Path(args.peaks_from).read_text()))
        Path(args.save_merged or args.results[0]).write_text(json.dumps(results, indent=1))
    results["_source"] = args.save_merged or args.results[0]
    out = host_table(results) if args.host else gpu_table(results) if args.gpu else table(results)
    if args.gpu and args.probe:
        out += "\n\n" + probe_table(json.loads(Path(args.probe).read_text()))
    if args.readme:
        markers = ((HOST_START, HOST_END) if args.host else
                   (f"<!-- {args.section}:start -->", f"<!-- {args.section}:end -->") if args.gpu else (START, END))
        _rewrite(Path(args.readme), *markers, out)
    print(out)


if __name__ == "__main__":
    main()
