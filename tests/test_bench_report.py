"""bench/report.py: the README's performance tables are exactly what the committed results generate, and the GPU
verdicts follow the targets (synthetic results that meet and miss each one)."""
import json
import re
import sys
from pathlib import Path

import pytest

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


def test_readme_cpu_table_is_generated_from_the_committed_results():
    assert _section(report.START, report.END) == report.table(_load("cpu.json"))


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
