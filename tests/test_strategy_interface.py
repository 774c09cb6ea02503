"""The strategy interface (`fastgrpo.algos.base`): hooks get a `RolloutContext`, never the trainer, and log fields
are recorded on the strategy and taken by the loop after the sample phase."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgrpo.algos import STRATEGIES, FlowGRPO
from fastgrpo.algos.base import RolloutContext
from fastgrpo.train import make_trainer, resolve_config
from fastgrpo.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycle():
    """Each side imports first into a fresh set of fastgrpo modules (a cycle shows as an ImportError on a partially
    initialised module); one subprocess, torch loaded once."""
    code = """
import sys
for first in ("fastgrpo.algos.base", "fastgrpo.algos.aegpo", "fastgrpo.train", "fastgrpo.train.flow",
              "fastgrpo.train.ar"):
    for name in [m for m in sys.modules if m == "fastgrpo" or m.startswith("fastgrpo.")]:
        del sys.modules[name]
    __import__(first)
    import fastgrpo.algos, fastgrpo.train.flow, fastgrpo.train.ar
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_record_and_take_log():
    s = FlowGRPO()
    assert s.take_log() == {}
    s.record(a=[1], b=[2])
    s.record(a=[3])  # a later record of a name replaces it, in its first place
    assert list(s.take_log().items()) == [("a", [3]), ("b", [2])]
    assert s.take_log() == {}
    assert FlowGRPO() == FlowGRPO() and "_log" not in repr(s)  # the records are not part of the settings


@dataclasses.dataclass
class Spy(FlowGRPO):
    """Flow-GRPO that checks what its hooks get and records per step and per wave."""

    seen: list = dataclasses.field(default_factory=list)

    def plan_groups(self, ctx, step, prompt_idx, generators):
        self.seen.append(ctx)
        self.record(planned=[step, *prompt_idx])
        return super().plan_groups(ctx, step, prompt_idx, generators)

    def prune(self, ctx, step, rows):
        assert isinstance(ctx, RolloutContext) and ctx is self.seen[-1]
        if step == 0:  # a wave starts
            self.waves = getattr(self, "waves", 0) + 1
            self.record(wave=[self.waves, rows["x"].shape[0]])
        return None


def test_hooks_get_the_context_and_records_reach_the_log(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "flow_grpo", Spy)
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=[
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=100", "train.steps=2",
        "sample.prompts_per_step=3", "sample.group_size=4", "sample.batch_size=8", "train.minibatches=2",
        "model.lora={rank: 4, alpha: 8}"])
    trainer = make_trainer(cfg, tmp_path / "r")
    s = trainer.strategy
    s.record(stale=[0])  # outside a round: not logged
    trainer.run()
    ctx = s.seen[0]
    assert isinstance(ctx, RolloutContext) and len(s.seen) == 2
    assert ctx.prompts is trainer.prompts and ctx.sigmas is trainer.sigmas and ctx.policy is trainer.policy
    assert ctx.reward is trainer.reward_fn
    assert (ctx.num_steps, ctx.group_size, ctx.batch_size) == (4, 4, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.num_steps = 5
    # The context's velocity is the trainer's chunked one (3 rows in chunks of 8; another transformer too).
    g = torch.Generator().manual_seed(3)
    x = trainer.policy.initial_latents(3, g)
    emb = trainer.policy.encode_prompts(["a", "b"])
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(ctx.velocity(x, 2, emb, rows), trainer.velocity(x, 2, emb, rows), rtol=0, atol=0)
        with trainer.policy.reference() as ref:
            want = trainer.velocity(x, torch.tensor([0, 1, 2]), emb, rows, transformer=ref)
            got = ctx.velocity(x, torch.tensor([0, 1, 2]), emb, rows, transformer=ref)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    metrics = read_metrics(tmp_path / "r/metrics.jsonl")
    for step, row in enumerate(metrics):
        idx = trainer.sampler.groups(step).tolist()
        assert row["planned"] == [step, *idx]
        # Two groups of 4 per wave (batch 8): waves of 8 and 4 rows; the last wave's record is the step's.
        assert row["wave"] == [2 * step + 2, 4]
        assert "stale" not in row and row["optimizer_steps"] == 2
        assert list(row)[list(row).index("trained_transitions") + 1:][:3] == ["planned", "wave", "grad_norm"]
    assert s.take_log() == {}
