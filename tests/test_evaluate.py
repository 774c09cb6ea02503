"""``fastgrpo eval`` and ``eval.every`` (`fastgrpo.train.evaluate`): fixed prompts and seeds, deterministic sampling,
every reward apart, statistics recomputed here in float64, the grid, and bad input."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastgrpo.cli import main
from fastgrpo.train import resolve_config, train
from fastgrpo.train.evaluate import GRID_FRAMES, _cell, evaluate_run
from fastgrpo.train.metrics import read_metrics
from fastgrpo.train.prompts import BUILTIN_PROMPTS, HELDOUT_PROMPTS

SMALL = ["sample.num_steps=3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=8",
         "log.progress=false", "log.tensorboard=false", "eval.num_prompts=3", "eval.samples_per_prompt=2"]


def small_cfg(*extra):
    return resolve_config(preset="tiny-flow-grpo", overrides=[*SMALL, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps, a checkpoint at each, evaluated in training every 2 steps."""
    return train(small_cfg("train.steps=3", "checkpoint.every=1", "eval.every=2"),
                 tmp_path_factory.mktemp("eval") / "run")


def test_heldout_prompts_are_not_training_prompts():
    assert len(HELDOUT_PROMPTS) == len(set(HELDOUT_PROMPTS)) >= 8
    assert not set(HELDOUT_PROMPTS) & set(BUILTIN_PROMPTS)


def test_eval_report_statistics_and_determinism(run, tmp_path):
    out = evaluate_run(run, progress=False)
    report = json.loads((out / "eval.json").read_text())
    names = [c["name"] for c in report["checkpoints"]]
    assert names == ["base", "step_1", "step_2", "step_3"]
    assert report["prompts"] == HELDOUT_PROMPTS[:3] and report["samples_per_prompt"] == 2
    by = {c["name"]: c["rewards"]["brightness"] for c in report["checkpoints"]}
    base = np.array(by["base"]["values"], dtype=np.float64)
    for name, r in by.items():
        v = np.array(r["values"], dtype=np.float64)
        assert r["n"] == v.size == 6
        assert math.isclose(r["mean"], v.mean(), rel_tol=1e-12)
        assert math.isclose(r["se"], v.std(ddof=1) / math.sqrt(v.size), rel_tol=1e-9)
        if name != "base":
            d = v - base
            assert math.isclose(r["delta"], d.mean(), rel_tol=1e-9, abs_tol=1e-15)
            assert math.isclose(r["delta_se"], d.std(ddof=1) / math.sqrt(d.size), rel_tol=1e-9)
            assert not np.array_equal(v, base)  # the weights moved
    assert "reward" not in report["checkpoints"][0]["rewards"]  # one reward: no separate total
    # One checkpoint alone, by its folder: the same values (the columns do not influence each other).
    alone = evaluate_run(run / "checkpoints/step_2", out=tmp_path / "alone", base=False, progress=False)
    single = json.loads((alone / "eval.json").read_text())["checkpoints"]
    assert [c["name"] for c in single] == ["step_2"]
    assert single[0]["rewards"]["brightness"]["values"] == by["step_2"]["values"]
    table = (out / "eval.md").read_text()
    assert table.splitlines()[0].startswith("| checkpoint | brightness | Δ brightness vs base |")
    assert "| step_3 |" in table


def test_eval_every_logs_what_fastgrpo_eval_measures(run, tmp_path):
    """The in-training evaluation at step 2 equals `fastgrpo eval` of the step-2 checkpoint; steps without an
    evaluation carry no eval fields; and evaluating draws none of the run's randomness."""
    rows = read_metrics(run / "metrics.jsonl")
    assert ["eval_reward_mean" in r for r in rows] == [False, True, False]
    report = json.loads((evaluate_run(run, out=tmp_path / "e", steps=[2], base=False, progress=False)
                         / "eval.json").read_text())
    r = report["checkpoints"][0]["rewards"]["brightness"]
    assert math.isclose(rows[1]["eval_reward_mean"], r["mean"], rel_tol=1e-12)
    assert math.isclose(rows[1]["eval_reward_se"], r["se"], rel_tol=1e-9)
    plain = train(small_cfg("train.steps=3", "checkpoint.every=3"), tmp_path / "plain")
    assert [x["reward_mean"] for x in read_metrics(plain / "metrics.jsonl")] == [x["reward_mean"] for x in rows]
    assert rows[-1]["model_forwards"] == read_metrics(plain / "metrics.jsonl")[-1]["model_forwards"]


def test_several_rewards_are_reported_apart_with_their_total(run, tmp_path):
    out = evaluate_run(run, out=tmp_path / "e", steps=[3], progress=False, overrides=[
        "eval.reward=[{name: brightness, weight: 2.0}, {name: colorfulness, weight: 0.5}, {name: brightness}]"])
    rows = json.loads((out / "eval.json").read_text())["checkpoints"]
    for c in rows:
        r = c["rewards"]
        assert list(r) == ["brightness", "colorfulness", "brightness_2", "reward"]
        assert r["brightness"]["values"] == r["brightness_2"]["values"]
        total = 2.0 * np.array(r["brightness"]["values"]) + 0.5 * np.array(r["colorfulness"]["values"]) \
            + np.array(r["brightness"]["values"])
        np.testing.assert_allclose(r["reward"]["values"], total, rtol=1e-12)


def test_grid_shows_each_prompt_per_checkpoint(run, tmp_path):
    out = evaluate_run(run, out=tmp_path / "e", steps=[1], progress=False)
    grid = np.asarray(Image.open(out / "eval_grid.png").convert("RGB"))
    # 3 prompt rows of 96-px cells (32 px scaled by 3) under a header, 2 columns (base, step 1) after the labels
    assert grid.shape == (24 + 3 * (96 + 4), 160 + 2 * (96 + 4), 3)
    assert grid[24:24 + 96, 160:160 + 96].std() > 0  # an image, not the white canvas


def test_a_video_cell_is_a_strip_of_frames():
    video = torch.rand(9, 3, 4, 5)
    cell = _cell(video)
    assert cell.shape == (4, 5 * GRID_FRAMES, 3)
    idx = torch.linspace(0, 8, GRID_FRAMES).round().long()
    expect = (video[idx[-1]].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(cell[:, -5:], expect)


def test_cli_eval_and_its_errors(run, tmp_path, capsys):
    assert main(["eval", str(run), "--steps", "3", "--out", str(tmp_path / "cli")]) == 0
    assert "| step_3 |" in capsys.readouterr().out
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder or a checkpoint of one" in capsys.readouterr().err
    assert main(["eval", str(run), "--steps", "7"]) == 2
    assert "no checkpoint of step(s) [7]" in capsys.readouterr().err
    assert main(["eval", str(run), "--set", "eval.reward=[{name: sharpness}]"]) == 2
    assert "eval.reward[0].name must be one of" in capsys.readouterr().err
    assert main(["eval", str(run), "--set", "eval.prompts=/nonexistent/p.txt"]) == 2
    assert "eval.prompts: prompt file '/nonexistent/p.txt' does not exist" in capsys.readouterr().err


def test_ema_and_broken_checkpoints_are_refused(tmp_path):
    run = train(small_cfg("train.steps=1", "checkpoint.every=1", "train.ema_decay=null"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"--ema: .*ema.safetensors does not exist"):
        evaluate_run(run, ema=True, progress=False)
    weights = run / "checkpoints/step_1/trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"checkpoint step_1 is broken: .*trainable.safetensors has \d+ bytes, \d+ when saved"):
        evaluate_run(run, progress=False)
