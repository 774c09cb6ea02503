# fastgrpo: `make demo` runs the main job, `make test` the test suite. Both create .venv when it is absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastgrpo-installed

.PHONY: install ext ext-clean demo test test-slow bench compile-check gpu-wheels gpu-image-check clean

install: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel here (and the CUDA build on GPU machines) instead of
# resolving a multi-GB CUDA build as a dependency of the package.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job: Flow-GRPO on a tiny random SD3 pipeline (CPU, under a minute); prints where curves.png is.
demo: install
	$(PY) -m fastgrpo train --preset tiny-flow-grpo --out runs/tiny-flow-grpo --overwrite

# Build (or find cached) the C++ extension fastgrpo._C now and fail loudly if it does not build; with
# FASTGRPO_BUILD_EXT=0 it only says that the extension is disabled.
ext: install
	$(PY) -m fastgrpo._ext

# Remove the extension's build caches, one per ISA (the next use rebuilds it from scratch).
ext-clean: install
	$(PY) -c 'from fastgrpo._ext import clean; clean()'

# The suite without the tests marked slow (under 5 minutes on 2 cores); `make test-slow` runs those (CI runs both).
test: ext
	$(PY) -m pytest tests -q -m "not slow" -n auto

test-slow: ext
	$(PY) -m pytest tests -q -m slow -n auto

bench: ext
	$(PY) -m pytest bench

compile-check: install
	$(PY) tests/compile_for_gpu.py 90

# The packages a lent GPU machine lacks (its image has torch, triton, transformers, peft, accelerate, pytest and
# pytest-benchmark, not diffusers), as wheels for its Python 3.12 in .whl/ (git-ignored): bench/gpu_session.sh
# installs them there when the call carries .whl.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		diffusers==0.42.1 importlib_metadata==10.2.0

# Before a GPU session, on the CPU: the working tree under the GPU machine's own versions (torch 2.11.0, triton
# 3.6.0, transformers 5.17.0, ...): every kernel compiled for sm_90 with that Triton, the suite, bench/. Its venv
# (a CUDA torch, about 5 GB) goes to /tmp/fastgrpo-gpu-image, made once; bench/gpu_image_check.sh says the rest.
gpu-image-check:
	bench/gpu_image_check.sh all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
