#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool; README.md, "Benchmarks" / "GPU"):
#   bench/gpu_session.sh bench [-k expr] [timeout_s]  pytest bench/ on the GPU -> $OUT/gpu.json (+ logs)
#   bench/gpu_session.sh tests [timeout_s] [args]     the test suite on the GPU, Triton compiled (no interpreter)
#   bench/gpu_session.sh probe [timeout_s]            bench/gpu_probe.py: kernel vs host time, attention tiles
#   bench/gpu_session.sh round                        issue 19 in one call (~9 min): the round benchmark, sde_step,
#                                                     token shaping, the collector (bench + probe), the CUDA-only
#                                                     tests -> $OUT/round.json, $OUT/kernels.json, $OUT/probe.json
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
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

case "${1:-bench}" in
bench)
    # Two runs, each writing its own JSON, so that one that overruns does not lose the other's results.
    i=0
    for files in "bench/test_bench_ceilings.py bench/test_bench_sde.py bench/test_bench_ovf.py bench/test_bench_token.py" \
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
    # Everything issue 19 measures, most important first; each part has its own time limit and JSON, so one that
    # fails or overruns does not lose the others. Budget: 600 s per call.
    t0=$SECONDS
    timeout 300 python3 -m pytest bench/test_bench_round.py -q -p no:cacheprovider -x \
        --benchmark-json="$OUT/round.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/round.log"
    if ! grep -q "1 passed" "$OUT/round.log"; then  # compile failed or overran: the graphs-only fast path
        echo "== round with model.compile=false ($((SECONDS - t0)) s so far)"
        FASTGRPO_ROUND_COMPILE=0 timeout 150 python3 -m pytest bench/test_bench_round.py -q -p no:cacheprovider \
            -x --benchmark-json="$OUT/round-nocompile.json" 2>&1 | tee "$OUT/round-nocompile.log"
    fi
    echo "== kernels ($((SECONDS - t0)) s so far)"
    timeout 120 python3 -m pytest bench/test_bench_ceilings.py bench/test_bench_sde.py bench/test_bench_token.py \
        bench/test_bench_collector.py -q -p no:cacheprovider -k "not cpp and not forward-" \
        --benchmark-json="$OUT/kernels.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/kernels.log"
    echo "== probe ($((SECONDS - t0)) s so far)"
    timeout 60 python3 bench/gpu_probe.py --out "$OUT" --only collector 2>&1 | tee "$OUT/probe.log"
    echo "== CUDA tests ($((SECONDS - t0)) s so far)"
    timeout 90 python3 -m pytest tests/test_speed_paths.py tests/test_sde_step.py tests/test_collector.py \
        tests/test_token_eg_grpo.py -q -ra -p no:cacheprovider -k "cuda or graph or sync" 2>&1 \
        | tee "$OUT/tests.log" | tail -25
    python3 bench/report.py "$OUT/kernels.json" --gpu --save-merged "$OUT/gpu.json" >/dev/null 2>&1
    echo "== done in $((SECONDS - t0)) s"
    ;;
*)
    echo "usage: $0 bench [-k expr] [timeout_s] | tests [timeout_s] [pytest args] | probe [timeout_s]" >&2
    exit 2
    ;;
esac
