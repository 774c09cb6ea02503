"""setuptools shim.

All metadata lives in pyproject.toml. This file exists for the optional C++ extension `fastgrpo._C` (csrc/):
with ``FASTGRPO_BUILD_EXT=1`` it is compiled ahead of time into the package, e.g.

    FASTGRPO_BUILD_EXT=1 pip install --no-build-isolation .     # torch must already be installed

Without it the package is pure Python and `fastgrpo._ext` builds the extension lazily with ninja on first use
(cached), or the ops fall back to their torch path.
"""
import glob
import os

from setuptools import setup

kwargs = {}
if os.environ.get("FASTGRPO_BUILD_EXT", "").strip() == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    kwargs = dict(  # the same sources and flags as the lazy build (fastgrpo._ext)
        ext_modules=[CppExtension("fastgrpo._C", sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
                                  include_dirs=[os.path.abspath("csrc")],
                                  extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG"], extra_link_args=["-fopenmp"])],
        cmdclass={"build_ext": BuildExtension},
    )

setup(**kwargs)
