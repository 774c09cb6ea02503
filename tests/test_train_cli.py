"""`fastgrpo train | presets | plot` as a user runs them, including `accelerate launch` with 2 CPU processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrpo.train.metrics import read_metrics

SMALL = ["--set", "sample.num_steps=2", "--set", "sample.group_size=4", "--set", "sample.batch_size=4",
         "--set", "log.progress=false", "--set", "log.tensorboard=false"]


def _run(args, cwd, timeout=600):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_presets_lists_every_preset(tmp_path):
    proc = _run([sys.executable, "-m", "fastgrpo", "presets"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("tiny-flow-grpo", "tiny-dance-grpo", "sd35m-flow-grpo-pickscore", "flux-dance-grpo-hps"):
        assert name in proc.stdout


def test_train_then_plot(tmp_path):
    proc = _run([sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-dance-grpo", "--out", "run",
                 "--set", "train.steps=2", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "curves: run/curves.png" in proc.stdout
    png = tmp_path / "run/curves.png"
    png.unlink()
    proc = _run([sys.executable, "-m", "fastgrpo", "plot", "run"], tmp_path)
    assert proc.returncode == 0 and png.stat().st_size > 0


def test_train_errors_are_clear(tmp_path):
    proc = _run([sys.executable, "-m", "fastgrpo", "train", "--preset", "nope"], tmp_path)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
    proc = _run([sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-flow-grpo", "--set", "train.lr=-1"],
                tmp_path)
    assert proc.returncode == 2 and "train.lr must be > 0" in proc.stderr
    proc = _run([sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-flow-grpo", "--resume", "--out", "x"],
                tmp_path)
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr
    proc = _run([sys.executable, "-m", "fastgrpo", "plot", "nowhere"], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accelerate_launch_two_cpu_processes(tmp_path, strategy):
    """The README's commands with the shipped accelerate configs: torchrun starts 2 processes, gloo on CPU; the FSDP
    config makes distributed.strategy auto shard (tiny-flow-grpo is full fine-tuning)."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{strategy}.yaml"
    proc = _run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m", "fastgrpo",
                 "train", "--preset", "tiny-flow-grpo", "--out", "run", "--set", "train.steps=2", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # one writer (rank 0)
    assert rows[-1]["samples"] == 2 * 2 * 4  # both ranks' samples counted: 2 prompts x 4 per step
    state = json.loads((tmp_path / "run/checkpoints/step_2/state.json").read_text())
    assert (state["world_size"], state["distributed"]) == (2, strategy)
