"""Issue 16: the released trainers' procedure around the ops -- update cadence (several optimizer steps per sampling
round), Flow-GRPO's per-prompt pooling of advantages, DanceGRPO's trained-step count -- each against an independent
float64 reference written here from the released code's formulas."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fastgrpo.train import make_trainer, resolve_config
from fastgrpo.train.distributed import gathered_advantages, minibatch_split
from fastgrpo.train.strategy import random_train_steps

QUIET = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=100"]


# ----------------------------------------------------------------------------------------- minibatch split
@pytest.mark.parametrize("sizes, M", [([8, 8], 2), ([5, 3, 7], 3), ([24] * 3, 2), ([2, 9], 4), ([1, 1, 4], 2)])
def test_minibatch_split_spreads_every_group_evenly(sizes, M):
    groups = torch.cat([torch.full((k,), 10 + 3 * g) for g, k in enumerate(sizes)])  # global ids, not 0..P-1
    part = minibatch_split(5, 7, 0, groups, M)
    assert part.min() >= 0 and part.max() < M
    for g, k in enumerate(sizes):
        counts = torch.bincount(part[groups == 10 + 3 * g], minlength=M)
        # Dealt as evenly as possible: k // M or k // M + 1 units of the group in each minibatch.
        assert counts.sum() == k and counts.max() - counts.min() <= 1 and counts.min() == k // M
    # A process holding only some of the groups assigns them the same minibatches (no dependence on the others).
    keep = groups != 10
    assert torch.equal(minibatch_split(5, 7, 0, groups[keep], M), part[keep])
    # Another pass (or step, or seed) reorders: over 8 passes the assignment is not always the same.
    others = [minibatch_split(5, 7, e, groups, M) for e in range(1, 9)]
    if max(sizes) >= 3:
        assert any(not torch.equal(o, part) for o in others)


def _recording(trainer):
    """Record the units, groups and transition steps each update of the trainer trains."""
    log = []
    train = trainer.train

    def wrapped(batches, rows, **kw):
        log.append({k: rows[k].cpu().clone() for k in ("unit", "step") if k in rows} | kw)
        return train(batches, rows, **kw)

    trainer.train = wrapped
    return log


def _round(trainer):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return trainer.round(0, pool)


@pytest.mark.parametrize("preset, unit", [("tiny-flow-grpo", "trajectory"), ("tiny-branch-grpo", "transition")])
def test_minibatches_partition_the_round_by_unit(tmp_path, preset, unit):
    """train.minibatches=3, inner_epochs=2: 6 optimizer steps; each pass trains every transition exactly once; a
    Flow-GRPO trajectory's trained steps stay in one minibatch (the released trainer shuffles samples, each with
    all its timesteps), BranchGRPO's transitions are dealt one by one (it shuffles the tree's edges)."""
    cfg = resolve_config(preset=preset, overrides=["train.steps=1", "train.minibatches=3", "train.inner_epochs=2",
                                                   "sample.num_steps=4" if "flow" in preset else "sample.num_steps=5",
                                                   *QUIET])
    trainer = make_trainer(cfg, tmp_path / "r")
    log = _recording(trainer)
    row = _round(trainer)
    assert row["optimizer_steps"] == 6 == len(log)
    assert {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {6}
    assert [u["first"] for u in log] == [True] + [False] * 5 and all(u["several"] for u in log)
    for epoch in range(2):
        updates = log[3 * epoch:3 * epoch + 3]
        units = torch.cat([u["unit"] for u in updates])
        if unit == "transition":  # every row its own unit, each trained once per pass
            assert torch.equal(units.sort().values, torch.arange(units.numel()))
        owner = {}
        for m, u in enumerate(updates):
            for x in u["unit"].tolist():
                assert owner.setdefault(x, m) == m  # a unit never spans two minibatches
        assert units.numel() == row["trained_transitions"]
        shares = [torch.unique(u["unit"]).numel() for u in updates]  # each group's units split within one
        assert max(shares) - min(shares) <= cfg.sample.prompts_per_step
    assert not torch.equal(log[0]["unit"], log[3]["unit"])  # the second pass is reshuffled
    assert row["first_ratio_dev"] < 1e-6  # the first update is taken by the sampling policy
    assert row["ratio_dev_max"] > 1e-4 and row["clip_frac"] > 0  # later ones are not: the clip (1e-4) binds


def test_one_minibatch_is_the_whole_round(tmp_path):
    """Default cadence (1 x 1): one optimizer step over every trained transition, ratios exactly 1 on CPU."""
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=["train.steps=1", "sample.num_steps=3", *QUIET])
    trainer = make_trainer(cfg, tmp_path / "r")
    log = _recording(trainer)
    row = _round(trainer)
    assert row["optimizer_steps"] == 1 and len(log) == 1 and not log[0]["several"]
    assert row["first_ratio_dev"] == row["ratio_dev_max"] == 0.0 and row["clip_frac"] == 0.0


def test_too_many_minibatches_is_refused(tmp_path):
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=["train.steps=1", "sample.num_steps=2",
                                                              "sample.prompts_per_step=1", "sample.group_size=2",
                                                              "train.minibatches=3", *QUIET])
    trainer = make_trainer(cfg, tmp_path / "r")
    with pytest.raises(ValueError, match=r"train.minibatches \(3\) exceeds the 2 training units of this round"):
        _round(trainer)


@pytest.mark.parametrize("key, value, match", [
    ("train.minibatches", 0, "train.minibatches must be > 0"),
    ("train.inner_epochs", -1, "train.inner_epochs must be > 0"),
    ("train.minibatches", 1.5, "train.minibatches must be an integer"),
    ("train.group_by", "text", r"train.group_by must be one of \['group', 'prompt'\]"),
])
def test_bad_cadence_keys_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(preset="tiny-flow-grpo", overrides=[f"{key}={value}"])


# ------------------------------------------------------------------------------------ released cadences
# Optimizer steps per sampling round of the released trainers, from their configs / launch scripts:
# * Flow-GRPO (yifan123/flow_grpo @ac4c86e config/grpo.py lines 118-126, pickscore_sd3): 32 GPUs x 9 images per
#   batch, num_batches_per_epoch = 48 / (32 * 9 / 24) = 4, gradient_accumulation_steps = 4 // 2 = 2, one inner
#   epoch (scripts/train_sd3.py lines 827-838: shuffle, num_batches_per_epoch batches; accelerate steps every
#   gradient_accumulation_steps of them): 4 / 2 = 2 steps.
# * DanceGRPO (XueZeyue/DanceGRPO @15cc71d scripts/finetune/finetune_flux_grpo_8gpus.sh lines 26-49: 8 GPUs,
#   train_batch_size 2 prompts x num_generations 12, gradient_accumulation_steps 12; fastvideo/train_grpo_flux.py
#   lines 571-612: one sample per backward, a step every 12): 2 * 12 / 12 = 2 steps.
# * BranchGRPO (Fredreic1849/BranchGRPO @19fbb9f scripts/finetune/finetune_flux_branchgrpo_8gpus.sh: 8 GPUs,
#   train_batch_size 2 trees, split points 0,3,6,9 of 20 steps, gradient_accumulation_steps 12;
#   fastvideo/train_branchgrpo_flux.py lines 1481-1607: shuffled edges, a step every 12 and one for the rest).
FLOW_GRPO_STEPS = (48 // (32 * 9 // 24)) // ((48 // (32 * 9 // 24)) // 2)
DANCE_STEPS = 2 * 12 // 12


def _branch_edges(splits, T):
    """Edges of one BranchGRPO tree: the active width summed over the T steps (binary splits)."""
    return sum(2 ** sum(1 for s in splits if s <= t) for t in range(T))


BRANCH_STEPS = math.ceil(2 * _branch_edges((0, 3, 6, 9), 20) / 12)


@pytest.mark.parametrize("preset, steps, group_by", [
    ("sd35m-flow-grpo-pickscore", FLOW_GRPO_STEPS, "prompt"),
    ("qwen-image-flow-grpo-pickscore", FLOW_GRPO_STEPS, "prompt"),
    ("sd35m-pro-grpo-pickscore", FLOW_GRPO_STEPS, "prompt"),
    ("sd35m-pro-grpo-flash-pickscore", FLOW_GRPO_STEPS, "prompt"),
    ("sd35m-tempflow-grpo-pickscore", FLOW_GRPO_STEPS, "group"),  # per (spine, step), per process as released
    ("flux-dance-grpo-hps", DANCE_STEPS, "group"),
    ("flux-branch-grpo-hps", BRANCH_STEPS, "group"),
    ("janus-pro-eg-grpo", 1, "group"),
])
def test_paper_presets_take_the_released_cadence(preset, steps, group_by):
    cfg = resolve_config(preset=preset)
    assert cfg.train.minibatches * cfg.train.inner_epochs == steps and cfg.train.inner_epochs == 1
    assert cfg.train.group_by == group_by
    assert BRANCH_STEPS == 37 and FLOW_GRPO_STEPS == 2  # the arithmetic above, spelled out


# ------------------------------------------------------------------------------ group_by: prompt
def _tracker_ref(prompts, rewards, global_std, eps=1e-4):
    """Flow-GRPO's PerPromptStatTracker.update (yifan123/flow_grpo @ac4c86e flow_grpo/stat_tracking.py lines
    11-33) from its formulas: per prompt string, (r - mean of that prompt's rewards) / (std + 1e-4), the std
    (numpy's, ddof 0) of every reward of the round (global_std) or of the prompt's; float64 loops."""
    out = [0.0] * len(rewards)
    every = [float(r) for r in rewards]
    for p in set(prompts):
        mine = [float(r) for q, r in zip(prompts, rewards) if q == p]
        pool = every if global_std else mine
        mean = sum(mine) / len(mine)
        mu = sum(pool) / len(pool)
        std = math.sqrt(sum((x - mu) ** 2 for x in pool) / len(pool))
        for i, q in enumerate(prompts):
            if q == p:
                out[i] = (float(rewards[i]) - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("global_std", [True, False])
@pytest.mark.parametrize("sizes", [[4, 4, 4, 4, 4], [3, 5, 2, 6, 3]])
def test_group_by_prompt_pools_a_prompts_groups_like_the_tracker(global_std, sizes):
    g = torch.Generator().manual_seed(sum(sizes) + global_std)
    texts = ["a cat", "a dog", "a cat", "a boat", "a dog"]  # two prompts drawn twice in the round
    keys = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    rewards = torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 3 + 1
    prompts = [t for t, n in zip(texts, sizes) for _ in range(n)]
    group_sizes = sizes[0] if len(set(sizes)) == 1 else sizes
    adv, _ = gathered_advantages(rewards.float(), group_sizes, std="global" if global_std else "group", ddof=0,
                                 eps=1e-4, clip=None, keys=[keys[t] for t in texts])
    ref = _tracker_ref(prompts, rewards.float().double(), global_std)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
    apart, _ = gathered_advantages(rewards.float(), group_sizes, std="global" if global_std else "group", ddof=0,
                                   eps=1e-4, clip=None)
    assert (apart.double() - ref).abs().max() > 1e-3  # without pooling the repeated prompts differ


def test_group_keys_follow_the_prompt_text_and_labels(tmp_path):
    """The loop's keys: the same text at two indices of the prompt list is one prompt; ``group_labels`` keep
    groups of one text apart."""
    from fastgrpo.train.loop import GRPOTrainer, MicroBatch

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.prompts = ["x", "y", "x", "z"]
    trainer.cfg = resolve_config(preset="tiny-flow-grpo", overrides=["sample.group_size=2"])
    mb1 = MicroBatch(["x", "x", "y", "y"], {})
    mb2 = MicroBatch(["x", "x", "z", "z", "x"], {}, group_sizes=[2, 2, 1], group_labels=[0, 0, 1])
    keys = trainer.group_keys([mb1, mb2])
    assert keys[0] == keys[2] and len({keys[0], keys[1], keys[3], keys[4]}) == 4


def test_group_by_prompt_in_a_round(tmp_path):
    """A round of tiny-flow-grpo whose 4 groups draw only 2 prompts: pooled advantages equal the tracker's."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=[
        "train.steps=1", "sample.num_steps=2", "train.group_by=prompt", f"prompts.source={prompts}",
        "train.adv_std=global", *QUIET])
    trainer = make_trainer(cfg, tmp_path / "r")
    seen = {}
    advantages = trainer.advantages

    def recording(batches):
        out = advantages(batches)
        seen["prompts"] = [p for mb in batches for p in mb.prompts]
        seen["rewards"] = torch.cat([mb.rewards for mb in batches])
        seen["adv"] = torch.cat([mb.advantages.cpu() for mb in batches])
        return out

    trainer.advantages = recording
    _round(trainer)
    assert len(set(seen["prompts"])) == 2 and len(seen["prompts"]) == 32
    ref = _tracker_ref(seen["prompts"], seen["rewards"].double(), global_std=True).clamp(-5, 5)
    torch.testing.assert_close(seen["adv"].double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ DanceGRPO steps
def test_dance_trains_int_of_t_minus_1_times_fraction():
    """DanceGRPO stores the T - 1 transitions before the last and trains int(len * timestep_fraction) of them
    (XueZeyue/DanceGRPO @15cc71d fastvideo/train_grpo_flux.py lines 511-519 and 570)."""
    rng = random.Random(0)
    for _ in range(60):
        T, f = rng.randint(2, 40), rng.choice([0.1, 0.25, 0.5, 0.6, 0.7, 0.99, 1.0, rng.random()])
        steps = random_train_steps(T, 3, f, torch.Generator().manual_seed(T))
        released = int(len(range(T - 1)) * f)
        assert steps.shape == (3, max(1, released)), (T, f)  # released 0 would train nothing: we train 1
        assert int(steps.max()) < T - 1 and all(len(set(r.tolist())) == steps.shape[1] for r in steps)
    assert random_train_steps(20, 1, 0.6, torch.Generator()).shape[1] == 11  # floor(20 * 0.6) = 12 before
