r"""CPU comparison table of the C++ extension against the torch reference, from recorded benchmark results.

    # record (on a quiet machine, please):
    pytest bench/test_bench_token.py bench/test_bench_sde.py bench/test_bench_ovf.py -k "torch or cpp" \
        --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json                      # print the markdown table
    python bench/report.py bench/results/cpu.json --readme README.md   # rewrite the README's table

For every benchmark case run with both impl="torch" and impl="cpp" on CPU, the table gives both median times, the
speed-up (torch / cpp), both peak extra memories (``peak_extra_memory_bytes``, see bench/harness.py) and their
ratio (cpp / torch), plus the machine, thread count and versions recorded with the numbers. Nothing is typed by
hand: the README section between the markers is replaced by this output.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- cpu-bench:start -->", "<!-- cpu-bench:end -->"


def _case(bench: dict) -> str:
    """The benchmark's name without its impl id: the key that pairs torch with cpp."""
    name = bench["name"]
    if "[" not in name:
        return name
    base, ids = name[:-1].split("[", 1)
    kept = [p for p in ids.split("-") if p not in ("torch", "cpp")]
    return f"{base}[{'-'.join(kept)}]" if kept else base


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f}"


def _ratio(num, den) -> str:
    if num is None or not den:
        return "n/a"
    r = num / den
    return f"{r:.3f}" if r >= 0.001 else f"{r:.1e}"


def table(results: dict) -> str:
    pairs: dict[str, dict[str, dict]] = {}
    for b in results["benchmarks"]:
        impl = (b.get("params") or {}).get("impl")
        if impl in ("torch", "cpp") and str(b["extra_info"].get("device", "")).startswith("cpu"):
            pairs.setdefault(_case(b), {})[impl] = b
    info = results.get("machine_info", {})
    first = next(iter(pairs.values()))["cpp"]["extra_info"] if pairs else {}
    lines = [
        f"CPU: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
        f"{first.get('device', '?')}; torch {first.get('torch', '?')}; recorded {results.get('datetime', '?')}"
        f" ({Path(results.get('_source', '')).name}).",
        "",
        "| case | shapes | torch ms | cpp ms | speed-up | torch peak MiB | cpp peak MiB | memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in sorted(pairs):
        p = pairs[case]
        if "torch" not in p or "cpp" not in p:
            continue
        t, c = p["torch"], p["cpp"]
        tm, cm = t["stats"]["median"], c["stats"]["median"]
        tp, cp = t["extra_info"].get("peak_extra_memory_bytes"), c["extra_info"].get("peak_extra_memory_bytes")
        ratio = _ratio(cp, tp)
        shapes = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in c["extra_info"].get("shapes", {}).items())
        lines.append(f"| {case} | {shapes} | {tm * 1e3:,.1f} | {cm * 1e3:,.1f} | {tm / cm:.1f}x | {_mib(tp)} | "
                     f"{_mib(cp)} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--readme", help=f"rewrite the section between {START} and {END} of this file")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    results["_source"] = args.results
    out = table(results)
    if args.readme:
        path = Path(args.readme)
        text = path.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{path} has no {START} ... {END} section")
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{out}\n{END}", text,
                      flags=re.S)
        path.write_text(text)
    print(out)


if __name__ == "__main__":
    main()
