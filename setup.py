"""setuptools shim.

All metadata lives in pyproject.toml. This file exists for the optional C++/CUDA extension `fastgrpo._C`
(csrc/), which a later change builds here ahead of time when FASTGRPO_BUILD_EXT=1; without it the package is
pure Python and every op falls back to its Triton or torch path.
"""
from setuptools import setup

setup()
