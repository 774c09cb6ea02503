"""Packaging, the command line and the demo."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastgrpo


def _run(args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env or os.environ.copy())


def test_kernels_ship_as_fastgrpo_kernels_not_top_level(tmp_path):
    """`kernels` belongs to Hugging Face; ours must only be importable as fastgrpo.kernels."""
    code = ("import importlib.util, fastgrpo.kernels.sde_step as k, os\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(os.path.dirname(k.__file__))\n"
            "print(spec.origin if spec else None)\n")
    proc = _run(["-c", code], cwd=tmp_path)  # a folder without our checkout on sys.path
    assert proc.returncode == 0, proc.stderr
    ours, top_level = proc.stdout.split()
    assert top_level == "None" or not top_level.startswith(ours)


def test_public_names():
    for name in ("sde_step", "sde_step_ref", "SDEStep"):
        assert hasattr(fastgrpo, name)


def test_env_command_reports_versions_and_backends(tmp_path):
    proc = _run(["-m", "fastgrpo", "env", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    for key in ("python", "torch", "triton", "diffusers", "transformers", "device", "backends"):
        assert key in info
    assert info["backends"]["torch"] is True
    assert info["backends"]["triton"] == (info["device"].startswith("cuda") or info["triton_interpret"])
    text = _run(["-m", "fastgrpo", "env"], cwd=tmp_path).stdout
    assert "backend triton" in text and "backend torch" in text


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_demo_samples_and_recomputes_log_probs(impl):
    from fastgrpo.demo import run_demo

    res = run_demo(batch=3, steps=4, impl=impl)
    assert res["log_probs"].shape == (3, 4)
    assert res["log_probs"].isfinite().all()
    assert res["ratio_max_dev"] == 0.0
    assert res["final"].shape == (3, 4, 16, 16)


def test_demo_cli_prints_log_probs(tmp_path):
    proc = _run(["-m", "fastgrpo", "demo", "--batch", "2", "--steps", "3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sample 1:" in proc.stdout and "max |ratio - 1| = 0.0e+00" in proc.stdout


def test_demo_rejects_bad_sizes():
    from fastgrpo.demo import run_demo

    with pytest.raises(ValueError, match="batch"):
        run_demo(batch=0)


def test_pyproject_has_no_setuptools_deprecations():
    """`pip install -e .` printed setuptools' "`project.license` as a TOML table is deprecated" warning: the
    license is an SPDX string now. Applies pyproject.toml as the build backend does, deprecations as errors."""
    pytest.importorskip("setuptools", minversion="77")
    import warnings
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), Path(__file__).resolve().parents[1] / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


def test_demo_cli_errors_are_one_line(monkeypatch, capsys):
    """`fastgrpo demo --impl triton` on a CPU without TRITON_INTERPRET=1 printed a traceback after sampling began."""
    from fastgrpo.cli import main

    cases = [(["demo", "--steps", "1"], "steps >= 2")]
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        cases.append((["demo", "--impl", "triton", "--steps", "2"], "triton"))
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
