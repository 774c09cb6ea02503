#!/usr/bin/env bash
# Before a GPU session, on this CPU machine: does the working tree run under the lent GPU machine's own package
# versions? A mismatch found on the GPU costs minutes of a 15-minute loan; found here it costs none.
#
#   bench/gpu_image_check.sh [all|compile|tests|bench]      (make gpu-image-check runs "all")
#
# The versions are the GPU image's (the device tool's KINDS.md, "nvidia-h200", 2026-11): torch 2.11.0, triton
# 3.6.0, transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0; diffusers 0.42.1 and importlib_metadata
# travel as wheels in .whl/ (make gpu-wheels), as bench/gpu_session.sh installs them there. Where the image's
# version is not listed (peft, pytest and the other test tools) pip's choice is taken. Differences that remain:
#   * Python 3.11 here, 3.12 there;
#   * PyPI's torch 2.11.0 is the CUDA build (with its nvidia-* wheels, about 5 GB in the venv): it runs on the CPU;
#   * numpy 2.2.6 here (2.5.2 there): Triton 3.6's interpreter, which runs the kernels on the CPU, fails under
#     numpy 2.4 and later ("only 0-dimensional arrays can be converted to Python scalars", every kernel test); on
#     the GPU the kernels are compiled, not interpreted.
# Prints each step's summary (the whole output goes to GPU_IMAGE_LOG, default /tmp/fastgrpo-gpu-image-check.log)
# and stops at the first step that fails. Steps: "compile" builds every kernel for sm_90 with Triton 3.6
# (tests/compile_for_gpu.py, about 2.5 min); "tests" runs the suite without the slow tier (about 3.5 min on 2
# cores); "bench" runs bench/ with the timing off (the CPU paths; the CUDA cases skip; about 2.5 min).
#
# The venv is made once (GPU_IMAGE_VENV, default /tmp/fastgrpo-gpu-image); the checked copy is the working tree's
# tracked and untracked, not ignored, files -- what a `run` call carries -- in a fresh temporary folder, with the
# links bench/gpu_session.sh makes (fastgrpo/kernels -> kernels, configs, csrc), imported through PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-all}
case "$STEP" in all|compile|tests|bench) ;; *) echo "usage: $0 [all|compile|tests|bench]" >&2; exit 2 ;; esac
VENV=${GPU_IMAGE_VENV:-/tmp/fastgrpo-gpu-image}
PY=$VENV/bin/python
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 numpy==2.2.6)
if [ ! -f "$VENV/.pins" ] || [ "$(cat "$VENV/.pins")" != "${PINS[*]}" ]; then
    echo "== venv $VENV: ${PINS[*]} (a CUDA torch: several GB, a few minutes)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # torch and its pins first, so that nothing below resolves another torch
    "$PY" -m pip install --quiet "${PINS[@]}"
    "$PY" -m pip install --quiet "${PINS[@]}" peft safetensors pyyaml tqdm matplotlib requests ninja pillow \
        pytest pytest-benchmark pytest-xdist hypothesis tensorboard starlette uvicorn
    echo "${PINS[*]}" > "$VENV/.pins"
fi
compgen -G ".whl/*.whl" >/dev/null || make gpu-wheels
LOG=${GPU_IMAGE_LOG:-/tmp/fastgrpo-gpu-image-check.log}  # the whole output; the steps print their summaries
: > "$LOG"
WORK=$(mktemp -d /tmp/fastgrpo-gpu-image-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$WORK"
"$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/.site" .whl/*.whl
cd "$WORK"
for d in kernels configs csrc; do ln -sfn "../$d" "fastgrpo/$d"; done
export PYTHONPATH=$WORK:$WORK/.site
"$PY" -c "import torch, triton, transformers, diffusers, numpy
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'diffusers', diffusers.__version__, 'numpy', numpy.__version__)"
if [ "$STEP" = all ] || [ "$STEP" = compile ]; then
    echo "== every kernel for sm_90 with this Triton"
    env -u TRITON_INTERPRET "$PY" tests/compile_for_gpu.py 90 >> "$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
    tail -1 "$LOG"
fi
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    echo "== tests (not slow)"
    "$PY" -m pytest tests -q -m "not slow" -n 2 -p no:cacheprovider -rfEs >> "$LOG" 2>&1 || { tail -40 "$LOG"; exit 1; }
    sed -n '/short test summary/,$p' "$LOG"
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    echo "== bench/ (timing off)"
    "$PY" -m pytest bench -q --benchmark-disable -n 2 -p no:cacheprovider >> "$LOG" 2>&1 || { tail -40 "$LOG"; exit 1; }
    tail -1 "$LOG"
fi
