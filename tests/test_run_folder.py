"""The run folder is never lost or silently mixed: an earlier run is refused without --resume / --overwrite,
checkpoints load without executing code and are verified, metrics.jsonl survives a kill, clear one-line errors."""
import os
import subprocess
import sys

import pytest

from fastgrpo.train import make_trainer, resolve_config, train
from fastgrpo.train.metrics import read_metrics

SMALL = ["sample.num_steps=2", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=4",
         "log.progress=false", "log.tensorboard=false"]


def small_cfg(*extra):
    return resolve_config(preset="tiny-flow-grpo", overrides=[*SMALL, *extra])


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_a_folder_holding_a_run_is_refused_untouched(tmp_path):
    out = train(small_cfg("train.steps=2", "checkpoint.every=1"), tmp_path / "run")
    before = _snapshot(out)
    for kw in ({}, {"resume": False}):
        with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
            make_trainer(small_cfg("train.steps=1"), out, **kw)
    with pytest.raises(ValueError, match="already holds a run"):
        train(small_cfg("train.steps=1"), out)
    with pytest.raises(ValueError, match="exclude each other"):
        make_trainer(small_cfg("train.steps=1"), out, resume=True, overwrite=True)
    assert _snapshot(out) == before
    # overwrite: the old run's files go, other files stay, the new run is whole
    (out / "notes.txt").write_text("mine")
    train(small_cfg("train.steps=1", "checkpoint.every=1"), out, overwrite=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert (out / "notes.txt").read_text() == "mine"
    # a fresh or empty folder, and one where a trainer was only built, need nothing
    make_trainer(small_cfg("train.steps=1"), tmp_path / "built")
    make_trainer(small_cfg("train.steps=1"), tmp_path / "built")


def test_cli_refuses_a_used_out_and_overwrite_starts_over(tmp_path):
    args = [sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-flow-grpo", "--out", "run",
            "--set", "train.steps=2", "--set", "checkpoint.every=1", *sum((["--set", s] for s in SMALL), [])]
    run = lambda *extra: subprocess.run([*args, *extra], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                        timeout=600, env=os.environ.copy())
    assert run().returncode == 0
    before = _snapshot(tmp_path / "run")
    proc = run()
    assert proc.returncode != 0
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(tmp_path / "run") == before
    proc = run("--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [1, 2]

