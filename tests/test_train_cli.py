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
    assert "requires torchvision" not in proc.stderr  # transformers' image-processor fallback notice (issue 15)
    png = tmp_path / "run/curves.png"
    png.unlink()
    proc = _run([sys.executable, "-m", "fastgrpo", "plot", "run"], tmp_path)
    assert proc.returncode == 0 and png.stat().st_size > 0


def test_train_errors_are_clear(tmp_path, capsys, monkeypatch):
    """One real interpreter (the exit code of `python -m fastgrpo`), the other cases in process (`main()`)."""
    proc = _run([sys.executable, "-m", "fastgrpo", "train", "--preset", "nope"], tmp_path)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
    monkeypatch.chdir(tmp_path)
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--set", "train.lr=-1")
    assert rc == 2 and "train.lr must be > 0" in err
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--resume", "--out", "x")
    assert rc == 1 and "no checkpoint" in err
    rc, _, err = _main(capsys, "plot", "nowhere")
    assert rc == 2 and "does not exist" in err


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accelerate_launch_two_cpu_processes(tmp_path, strategy):
    """The README's commands with the shipped accelerate configs: torchrun starts 2 processes, gloo on CPU; the FSDP
    config makes distributed.strategy auto shard (tiny-flow-grpo is full fine-tuning)."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{strategy}.yaml"
    proc = _run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m", "fastgrpo",
                 "train", "--preset", "tiny-flow-grpo", "--out", "run", "--set", "train.steps=2",
                 "--set", "sample.prompts_per_step=2", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # one writer (rank 0)
    assert rows[-1]["samples"] == 2 * 2 * 4  # both ranks' samples counted: 2 prompts x 4 per step
    state = json.loads((tmp_path / "run/checkpoints/step_2/state.json").read_text())
    assert (state["world_size"], state["distributed"]) == (2, strategy)


# ------------------------------------------------------------------ issue 15: resume config, one-line errors
# In-process `main()` calls: the same code paths as the command, without a new interpreter per case.

def _main(capsys, *argv):
    from fastgrpo.cli import main

    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_continues_with_the_runs_saved_config(tmp_path, capsys, monkeypatch):
    """An 8-step run resumed without repeating its --set stayed 8 steps only by luck before: --resume took the
    preset's 80. Now the run's config.yaml is the base, --set on top, a preset given too is ignored with a notice."""
    from fastgrpo.train.loop import GRPOTrainer

    out = str(tmp_path / "run")
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", out, "--set", "train.steps=2",
                       "--set", "checkpoint.every=1", *SMALL)
    assert rc == 0, err
    seen = []
    monkeypatch.setattr(GRPOTrainer, "run", lambda self: seen.append(self.cfg) or self.out)
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--resume", "--out", out)
    assert rc == 0, err
    assert (seen[-1].train.steps, seen[-1].sample.num_steps, seen[-1].sample.group_size) == (2, 2, 4)
    assert "--preset tiny-flow-grpo ignored" in _one_line(err)
    monkeypatch.undo()
    rc, _, err = _main(capsys, "train", "--resume", "--out", out, "--set", "train.steps=3")  # no preset needed
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl")] == [1, 2, 3]
    assert "steps: 3" in (Path(out) / "config.yaml").read_text()  # the override is the run's config from now on
    rc, _, err = _main(capsys, "train", "--resume", "--out", str(tmp_path / "nothing"))
    assert rc == 2 and "no run to continue" in _one_line(err)


def test_python_resume_uses_the_given_config_or_the_saved_one(tmp_path):
    from fastgrpo.train import resolve_config, resume_config, train

    small = ["sample.num_steps=2", "sample.group_size=4", "sample.batch_size=4", "log.progress=false",
             "log.tensorboard=false", "checkpoint.every=1"]
    out = train(resolve_config(preset="tiny-flow-grpo", overrides=[*small, "train.steps=1"]), tmp_path / "run")
    out = train(None, out, resume=True)  # the saved config: still one step, nothing to do
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    with pytest.warns(UserWarning, match=r"train.steps: 1 -> 2"):
        train(resume_config(out, ["train.steps=2"]), out, resume=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match="cfg is required"):
        train(None, tmp_path / "new")


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1\n")
    rc, _, err = _main(capsys, "train", str(bad))
    line = _one_line(err)
    assert rc == 2 and "bad.yaml" in line and "line 4" in line and "unicode string" not in line
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--set", "train.steps=[1")
    assert rc == 2 and "--set train.steps" in _one_line(err)


def test_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "run", tmp_path / "file"):
        rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", str(out), "--set", "train.steps=1",
                           *SMALL)
        assert rc == 1 and "not writable" in _one_line(err) and str(out) in err
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", str(ro / "run"), *SMALL)
        ro.chmod(0o700)
        assert rc == 1 and "not writable" in _one_line(err)


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from fastgrpo.train.loop import GRPOTrainer

    real_round = GRPOTrainer.round

    def interrupted(self, step, pool, **kw):
        if step == 1:
            raise KeyboardInterrupt
        return real_round(self, step, pool, **kw)

    monkeypatch.setattr(GRPOTrainer, "round", interrupted)
    out = str(tmp_path / "run")
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", out, "--set", "train.steps=3",
                       "--set", "checkpoint.every=1", *SMALL)
    line = _one_line(err)
    assert rc == 130 and f"--resume --out {out}" in line and "step 1" in line
    monkeypatch.setattr(GRPOTrainer, "round", lambda self, step, pool, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", str(tmp_path / "r2"), *SMALL)
    assert rc == 130 and "before the first checkpoint" in _one_line(err)


def test_errors_print_on_rank_0_only(tmp_path, capsys, monkeypatch):
    """Under `accelerate launch` every process fails the same way: rank 0 prints the one line, the others exit
    quietly with the same code (the launcher still prints its own ChildFailedError summary)."""
    fsdp_lora = ["train", "--preset", "tiny-flow-grpo", "--out", str(tmp_path / "run"),
                 "--set", "distributed.strategy=fsdp", "--set", "model.lora={rank: 4}"]
    monkeypatch.setenv("RANK", "1")
    rc, out, err = _main(capsys, *fsdp_lora)
    assert rc == 2 and out == "" and err == ""
    monkeypatch.setenv("RANK", "0")
    rc, out, err = _main(capsys, *fsdp_lora)
    assert rc == 2 and "fsdp shards full fine-tuning only" in _one_line(err)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("RANK", "1")  # a trainer error (exit 1)
    rc, out, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", str(tmp_path / "file"), *SMALL)
    assert rc == 1 and err == ""


def test_unavailable_reward_model_offline_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    t0 = time.perf_counter()
    rc, _, err = _main(capsys, "train", "--preset", "tiny-flow-grpo", "--out", str(tmp_path / "run"), *SMALL,
                       "--set", "reward=[{name: pickscore}]")
    line = _one_line(err)
    assert rc == 1 and "reward[0].args.model 'yuvalkirstain/PickScore_v1'" in line and "offline" in line
    assert time.perf_counter() - t0 < 60  # no hub retries (minutes before)
    assert not (tmp_path / "run").exists()  # stopped before anything was written


@pytest.mark.slow  # two processes: `make test-slow` (and CI) runs it; test_errors_print_on_rank_0_only is its twin
def test_accelerate_launch_fsdp_refusal_prints_one_line(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    proc = _run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m", "fastgrpo",
                 "train", "--preset", "tiny-flow-grpo", "--out", "run", "--set", "model.lora={rank: 4}", *SMALL],
                tmp_path)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("fastgrpo train:")]
    assert len(ours) == 1 and "shards full fine-tuning only" in ours[0], proc.stderr[-3000:]
