#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool; README.md, "Benchmarks" / "GPU"):
#   bench/gpu_session.sh bench [-k expr] [timeout_s]  pytest bench/ on the GPU -> $OUT/gpu.json (+ logs)
#   bench/gpu_session.sh tests [timeout_s] [args]     the test suite on the GPU, Triton compiled (no interpreter)
#   bench/gpu_session.sh probe [timeout_s]            bench/gpu_probe.py: kernel vs host time, attention and
#                                                     token-forward tile sweeps
#   bench/gpu_session.sh round [budget_s]             issue 19 in one call (budget 560 s by default): the
#                                                     whole-round benchmark, sde_step, token shaping, the
#                                                     collector, the probe, the CUDA-only tests, then with the time
#                                                     left the token-forward tile sweep
#                                                     -> $OUT/{kernels,collector,round,probe}.json, log.txt
# The machine has its own python3 with a CUDA torch and Triton; packages it lacks (diffusers and its small
# dependencies) travel as wheels in .whl/ (git-ignored; the command names `.whl` in `carry`). fastgrpo itself
# is used from the checkout (links give it its installed layout; no pip, no dependencies), so the machine's own
# torch/triton are what is measured (recorded in every result).
set -uo pipefail
OUT=${OUT:-/tmp/fastgrpo-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# fastgrpo as its installed layout (kernels/ -> fastgrpo.kernels, configs/, csrc/), without pip or its deps.
# (links in this throw-away checkout: python -m puts the checkout first on sys.path, so it must be complete)
for d in kernels configs csrc; do ln -sfn "../$d" "fastgrpo/$d"; done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
# Triton's and Inductor's compile caches inside the checkout (git-ignored): a second call on the same warm machine
# (a rerun) keeps the checkout's ignored files, so it reuses the kernels and block graphs the first call compiled
# instead of spending loan time compiling them again. Both caches are keyed by source and versions.
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

case "${1:-bench}" in
bench)
    # Two runs, each writing its own JSON, so that one that overruns does not lose the other's results.
    i=0
    for files in "bench/test_bench_ceilings.py bench/test_bench_sde.py bench/test_bench_ovf.py bench/test_bench_token.py bench/test_bench_host.py" \
                 "bench/test_bench_attention.py bench/test_bench_collector.py"; do
        i=$((i + 1))
        timeout "${3:-270}" python3 -m pytest $files -q -p no:cacheprovider -k "${2:-not cpp}" \
            --benchmark-json="$OUT/gpu$i.json" --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench$i.log"
    done
    python3 bench/report.py "$OUT"/gpu*.json --gpu --save-merged "$OUT/gpu.json"
    ;;
tests)
    timeout "${2:-540}" python3 -m pytest tests -q -ra -p no:cacheprovider --durations=15 "${@:3}" 2>&1 \
        | tee "$OUT/tests.log"
    ;;
probe)  # where the ops' time goes (kernels vs host) and attention tile configs: $OUT/probe.json
    timeout "${2:-300}" python3 bench/gpu_probe.py --out "$OUT" "${@:3}" 2>&1 | tee "$OUT/probe.log"
    ;;
round)
    # Everything issue 19 measures in one call within its budget, the least measured first: the whole-round
    # benchmark (eager, fast without compile, fast with compile; its partial results are rewritten after each
    # path, so a run stopped at its limit keeps the finished paths), the kernel cases (ceilings, sde_step, token
    # shaping), the collector cases, the ops/collector probe, the CUDA-only tests, and last, with whatever time is
    # left, the token forward's tile sweep (probe.json is rewritten after each configuration). Each part gets what
    # is left of the budget ($2, default 560 s: with the machine's start-up that leaves about 4 minutes of device
    # time for a rerun), capped. Files (at most 8 come back): log.txt, kernels.json, collector.json, round.json,
    # probe.json.
    t0=$SECONDS
    BUDGET=${2:-560}
    LOG="$OUT/log.txt"
    left() { local l=$((BUDGET - (SECONDS - t0))); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 5 ? l : 5)); }
    part() { echo "== $1 (at $((SECONDS - t0)) s)" | tee -a "$LOG"; }
    # Every part runs whatever an earlier one did; the call's exit status says whether any failed (124: its time
    # ran out), so the `run` result shows it at once, and log.txt ends with the list.
    FAILED=()
    check() { [ "$2" -eq 0 ] || { FAILED+=("$1 (rc $2)"); echo "!! $1 failed: rc $2" | tee -a "$LOG"; }; }
    cat "$OUT/gpu.txt" >> "$LOG"; rm -f "$OUT/gpu.txt"
    bench() {  # bench NAME SECONDS FILES... [-k EXPR]
        local name=$1 secs=$2; shift 2
        part "$name"
        timeout "$(left "$secs")" python3 -m pytest "$@" -q -p no:cacheprovider --benchmark-json="$OUT/$name.json" \
            --benchmark-columns=median,rounds >> "$LOG" 2>&1
        check "$name" $?
        tail -1 "$LOG"
    }
    part round
    FASTGRPO_ROUND_PARTIAL="$OUT/round.json" timeout "$(left 360)" python3 -m pytest bench/test_bench_round.py -q \
        -p no:cacheprovider -x >> "$LOG" 2>&1
    check round $?
    tail -4 "$LOG"
    bench kernels 75 bench/test_bench_ceilings.py bench/test_bench_sde.py bench/test_bench_token.py bench/test_bench_host.py \
        -k "not cpp and not compiled and not forward- and not whole_model and not (test_train and image) and not (test_train and text)"
    bench collector 45 bench/test_bench_collector.py
    part probe  # (collector first, then ops, each written when done; 90 s: four collector ways at two batches,
                # each with a profile and a cProfile, then the ops' cases: about a minute on the H200 by estimate)
    timeout "$(left 90)" python3 bench/gpu_probe.py --out "$OUT" --only collector ops >> "$LOG" 2>&1
    check probe $?
    part "CUDA tests"
    timeout "$(left 75)" python3 -m pytest tests/test_speed_paths.py tests/test_ar_host_reads.py tests/test_sde_step.py \
        tests/test_collector.py tests/test_token_eg_grpo.py -q -ra -p no:cacheprovider -k "cuda or graph or sync" \
        >> "$LOG" 2>&1
    check "CUDA tests" $?
    tail -8 "$LOG"
    if [ $((BUDGET - (SECONDS - t0))) -gt 30 ]; then  # the sweep (token_tiles) into its own copy, then merged
        part "token tiles"
        mkdir -p "$OUT/tiles"
        timeout "$(left 200)" python3 bench/gpu_probe.py --out "$OUT/tiles" --only token_tiles >> "$LOG" 2>&1
        python3 - "$OUT" <<'PY' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
probe, tiles = out / "probe.json", out / "tiles" / "probe.json"
if tiles.exists():
    merged = json.loads(probe.read_text()) if probe.exists() else {}
    merged["token_tiles"] = json.loads(tiles.read_text()).get("token_tiles")
    probe.write_text(json.dumps(merged, indent=1))
PY
        rm -rf "$OUT/tiles"
    fi
    part report
    python3 bench/report.py "$OUT"/kernels.json "$OUT"/collector.json "$OUT"/round.json --gpu 2>&1 \
        | tee -a "$LOG" | grep -E "^\| (sample|train_fwd|forward \| case=shaping|2 \| collector|8 \| collector|eager|fast)"
    part done
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "failed parts: ${FAILED[*]}" | tee -a "$LOG"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 bench [-k expr] [timeout_s] | tests [timeout_s] [pytest args] | probe [timeout_s] | round [budget_s]" >&2
    exit 2
    ;;
esac
