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


@pytest.mark.slow  # several CLI processes: `make test-slow` (and CI) runs it; the API twin runs in make test
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


def _write_marker(path):  # what a crafted pickle would run on load
    open(path, "w").write("code ran")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "strategy.pt"])
def test_resume_refuses_a_crafted_pickle_without_running_it(tmp_path, name):
    import torch

    out = train(small_cfg("train.steps=1", "checkpoint.every=1"), tmp_path / "run")
    marker = tmp_path / "marker"
    ckpt = out / "checkpoints/step_1"
    torch.save({"state": _Evil(str(marker))}, ckpt / name)
    if (ckpt / "manifest.json").exists():  # a forged manifest: the checksum passes, loading must still refuse
        import hashlib
        import json

        m = json.loads((ckpt / "manifest.json").read_text())
        m["files"][name] = {"bytes": (ckpt / name).stat().st_size,
                            "sha256": hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}
        (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{name}: refused to load.*could run code"):
        make_trainer(small_cfg("train.steps=2"), out, resume=True)
    assert not marker.exists()


def test_checkpoint_files_round_trip_without_pickled_objects(tmp_path):
    """rng.pt and an AEGPO-like strategy state (tuple keys, tensors) load with weights_only=True; a truncated file
    is a ValueError naming it."""
    import random

    import numpy as np
    import torch

    from fastgrpo.train.checkpoint import _rng_state, _set_rng_state, load_pt

    torch.save(_rng_state(), tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(load_pt(tmp_path / "rng.pt"), tmp_path / "rng.pt")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    state = {"base_entropy": {("a prompt", 7): torch.ones(3)}}
    torch.save(state, tmp_path / "strategy.pt")
    assert torch.equal(load_pt(tmp_path / "strategy.pt")["base_entropy"][("a prompt", 7)], torch.ones(3))
    data = (tmp_path / "rng.pt").read_bytes()
    (tmp_path / "rng.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"rng.pt is unreadable"):
        load_pt(tmp_path / "rng.pt")


def test_metrics_survive_a_torn_line_and_a_kill_during_the_resume_rewrite(tmp_path, monkeypatch):
    import fastgrpo.train.metrics as metrics

    out = train(small_cfg("train.steps=2", "checkpoint.every=1"), tmp_path / "run")
    path = out / "metrics.jsonl"
    good = path.read_text()
    # a kill while --resume rewrites metrics.jsonl: the old file stays whole (temp file + os.replace)
    monkeypatch.setattr(metrics.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        make_trainer(small_cfg("train.steps=3"), out, resume=True)
    monkeypatch.undo()
    assert path.read_text() == good
    # a kill during an append leaves a torn last line: dropped with a warning, the resume goes on
    path.write_text(good + '{"step": 3, "reward_mean": 0.')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped its torn last line 3"):
        train(small_cfg("train.steps=3", "checkpoint.every=1"), out, resume=True)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    # a bad line elsewhere names the file and the line
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics row"):
        read_metrics(path)


@pytest.mark.parametrize("name", ["trainable.safetensors", "ema.safetensors", "state.json"])
def test_unreadable_checkpoint_files_are_named(tmp_path, name):
    from fastgrpo.train.checkpoint import load_checkpoint

    out = train(small_cfg("train.steps=1", "checkpoint.every=1"), tmp_path / "run")
    f = out / "checkpoints/step_1" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    trainer = make_trainer(small_cfg("train.steps=1"), tmp_path / "other")
    with pytest.raises(ValueError, match=rf"{name} is (unreadable|not valid JSON)"):
        load_checkpoint(f.parent, trainable=trainer.named, ema=trainer.ema.shadow, optimizer=trainer.optimizer)


def test_resume_verifies_checkpoints_and_falls_back_to_the_newest_good_one(tmp_path):
    import json

    from fastgrpo.train.checkpoint import verify_checkpoint

    out = train(small_cfg("train.steps=2", "checkpoint.every=1"), tmp_path / "run")
    manifest = json.loads((out / "checkpoints/step_2/manifest.json").read_text())
    assert {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= set(manifest["files"])
    f = out / "checkpoints/step_2/trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the checksum sees it
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"resuming from step_1.*step_2/trainable.safetensors does not match its "
                                         r"sha256"):
        train(small_cfg("train.steps=3", "checkpoint.every=1"), out, resume=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert verify_checkpoint(out / "checkpoints/step_2")  # step 2 rewritten whole by the rerun


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_stops_naming_the_broken_file_when_none_verifies(tmp_path, damage):
    out = train(small_cfg("train.steps=1", "checkpoint.every=1"), tmp_path / "run")
    f = out / "checkpoints/step_1/optimizer.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        f.unlink()
    match = "has 100 bytes" if damage == "truncate" else "is missing"
    with pytest.raises(ValueError, match=rf"no checkpoint under .* verifies.*step_1/optimizer.pt {match}"):
        make_trainer(small_cfg("train.steps=2"), out, resume=True)


def _unwritable(tmp_path):
    """A folder this process cannot write: a chmod 555 one, or (root ignores modes) one under /sys."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d / "run"
    d = "/sys/fastgrpo-test-run"
    try:
        os.mkdir(d)
        os.rmdir(d)
        pytest.skip("root and /sys is writable: no unwritable folder to test with")
    except OSError:
        return d


def test_an_unwritable_run_folder_is_one_clear_error(tmp_path):
    out = _unwritable(tmp_path)
    with pytest.raises(ValueError, match=rf"run folder {out} is not writable"):
        make_trainer(small_cfg("train.steps=1"), out)
    proc = subprocess.run([sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-flow-grpo", "--out", str(out),
                           "--set", "train.steps=1", *sum((["--set", s] for s in SMALL), [])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"run folder {out} is not writable" in proc.stderr.strip().splitlines()[-1]


def test_a_failing_write_mid_run_names_the_folder(tmp_path, monkeypatch):
    """A write that fails during the run (disk full) is a ValueError naming the folder, not a raw OSError."""
    import fastgrpo.train.loop as loop

    def full(*a, **k):
        raise OSError(28, "No space left on device", "checkpoints/.tmp_step_1")

    monkeypatch.setattr(loop, "save_checkpoint", full)
    trainer = make_trainer(small_cfg("train.steps=1"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"cannot write to run folder .*run \(No space left on device"):
        trainer.run()
