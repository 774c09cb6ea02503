"""AEGPO on tiny models: the median split and the warm-up, TopK entropy peaks, tree factors, the cached base entropy
(counted reference forwards, kept across --resume), the probe reused as the shared prefix, groups of different
sizes through the advantages phase, the logged fields, bad settings, two processes allocating as one, and
model.compile (the eager rounds' results; the probes add no Dynamo graphs, also at FLUX.1-dev's block count)."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.algos.aegpo import AEGPO, allocate_rollouts, entropy_peaks, split_factors
from fastgrpo.train import make_trainer, resolve_config, train
from fastgrpo.train.distributed import group_generators
from fastgrpo.train.metrics import read_metrics

QUIET = ["log.progress=false", "log.tensorboard=false"]
# 4 denoising steps, TopK 2, 4 / 2 rollouts (mean 3): the mechanics of the preset at a fraction of its cost.
SMALL = [*QUIET, "sample.num_steps=4", "sample.group_size=3", "sample.batch_size=4",
         "algo_args={r_high: 4, r_low: 2, warmup_steps: 0, top_k: 2, layers: [0, 1]}"]


def cfg_of(*extra, small=True):
    return resolve_config(preset="tiny-aegpo", overrides=[*(SMALL if small else QUIET), *extra])


def prompt_file(tmp_path, n):
    f = tmp_path / "prompts.txt"
    f.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    return f"prompts.source={f}"


def sampled(trainer, step=0):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return trainer.sample(step, pool)


# ---------------------------------------------------------------------------------------------- global allocation


def test_median_split_exact_tiers():
    # Even batch: the median is the mean of the two middle values; nobody sits on it.
    assert allocate_rollouts([0.3, 0.1, 0.4, 0.2], 8, 16) == [16, 8, 16, 8]
    # Odd batches: the middle prompt is the median and gets the mean budget, so the total stays P * 12.
    assert allocate_rollouts([5.0, 1.0, 3.0], 8, 16) == [16, 8, 12]
    assert allocate_rollouts([0.5, 0.1, 0.9, 0.3, 0.7], 8, 16) == [12, 8, 16, 8, 16]
    assert allocate_rollouts([2.5], 8, 16) == [12]
    # Ties at the median get the mean budget; all equal (e.g. all 0 at step 0) is the uniform allocation.
    assert allocate_rollouts([1.0, 2.0, 2.0, 2.0, 3.0], 8, 16) == [8, 12, 12, 12, 16]
    assert allocate_rollouts([2.0, 2.0, 1.0, 3.0], 8, 16) == [12, 12, 8, 16]
    assert allocate_rollouts([1.0, 2.0, 2.0, 3.0, 3.0], 8, 16) == [8, 12, 12, 16, 16]  # budget +4: documented
    assert allocate_rollouts([0.0] * 3, 8, 16) == [12] * 3
    assert allocate_rollouts([0.2, 0.1, 0.3], 4, 10) == [7, 4, 10]


@pytest.mark.parametrize("n", [2, 3, 7, 10, 33])
def test_median_split_against_numpy(n):
    v = np.random.default_rng(n).random(n)
    got = np.array(allocate_rollouts(v.tolist(), 8, 16))
    m = np.median(v)
    want = np.where(v > m, 16, np.where(v < m, 8, 12))
    assert (got == want).all()
    assert got.sum() == 12 * n and (got == 16).sum() == n // 2  # distinct values: the budget is exact


def test_warmup_then_median_tiers_and_peak_splits(tmp_path, monkeypatch):
    """Constructed entropies (5 prompts, an odd batch, two tied on the median): uniform 12 during the warm-up, then
    16 / 12 / 8 by the median of v = mean_t |E_theta(t) - E_base(t)|; each tree splits at its curve's peaks with the
    largest factor at the highest peak, and starts there from the probe's latent."""
    T = 8
    theta = {  # E_base = 1 everywhere; binary fractions, so every v is exact and the tie is a tie
        "prompt number 0": [1.125] * 7 + [1.375],                               # v 0.15625; peak 7, fill 0, 1, 2
        "prompt number 1": [1.5, 1.25, 1.75, 1.25, 1.5, 1.25, 1.375, 1.375],   # v 0.40625; peaks 2, 0, 4, 6
        "prompt number 2": [1.25, 1.5, 1.25, 1.25, 1.25, 1.0, 1.5, 1.5],       # v 0.3125; peaks 1, 6, fill 7, 0
        "prompt number 3": [0.6875] * 8,                                        # v 0.3125; peak 0, fill 1, 2, 3
        "prompt number 4": [1.875] * 4 + [1.75, 1.875, 2.0, 1.875],             # v 0.875; peaks 6, 0, fill 1, 2
    }
    v = {"prompt number 0": 0.15625, "prompt number 1": 0.40625, "prompt number 2": 0.3125,
         "prompt number 3": 0.3125, "prompt number 4": 0.875}
    peaks = {"prompt number 0": [7, 0, 1, 2], "prompt number 1": [2, 0, 4, 6], "prompt number 2": [1, 6, 7, 0],
             "prompt number 3": [0, 1, 2, 3], "prompt number 4": [6, 0, 1, 2]}
    tiers = {"prompt number 0": 8, "prompt number 1": 16, "prompt number 2": 12, "prompt number 3": 12,
             "prompt number 4": 16}  # median 0.3125 (prompts 2 and 3 on it)
    factors = {8: [2, 2, 2], 12: [3, 2, 2], 16: [2, 2, 2, 2]}

    trainer = make_trainer(cfg_of(prompt_file(tmp_path, 5), "sample.prompts_per_step=5", "sample.num_steps=8",
                                  "sample.group_size=12", "algo_args={warmup_steps: 2, layers: [0, 1]}"),
                           tmp_path / "r")
    s = trainer.strategy

    def probe(self, ctx, x, emb, transformer=None):  # the policy's probe: latents = the step index
        assert transformer is None
        entropy = torch.tensor([theta[p] for p in self._probe_prompts])
        return torch.arange(T + 1.0).view(-1, 1, 1, 1).expand(T + 1, *x.shape).clone(), entropy

    monkeypatch.setattr(AEGPO, "probe", probe)
    monkeypatch.setattr(AEGPO, "base_entropies", lambda self, ctx, keys, x, emb: torch.ones(len(keys), T))
    for step in range(3):
        idx = trainer.sampler.groups(step).tolist()
        prompts = [trainer.prompts[i] for i in idx]
        s._probe_prompts = prompts
        plans = s.plan_groups(trainer.rollout_context(), step, idx, group_generators(0, step, range(len(idx))))
        log = s.take_log()
        assert list(log) == ["entropy_t", "entropy_delta", "rollouts_per_prompt", "branch_steps"]
        want = [12] * 5 if step < 2 else [tiers[p] for p in prompts]
        assert [p.leaves() for p in plans] == want
        assert log["rollouts_per_prompt"] == want
        assert log["entropy_delta"] == [v[p] for p in prompts]
        for p, plan, r in zip(prompts, plans, want):
            f = factors[r]
            assert plan.splits == dict(zip(peaks[p][:len(f)], f))
            assert plan.start == min(plan.splits) and plan.roots == 1
            assert plan.sde.tolist() == [t >= plan.start for t in range(T)]
            assert torch.equal(plan.x_start, torch.full_like(plan.x_start, float(plan.start)))
        assert log["branch_steps"] == [sorted(pl.splits) for pl in plans]
        assert s.take_log() == {}  # taken: cleared


def test_entropy_peaks_on_constructed_curves():
    e = [1, 5, 2, 6, 3, 7, 4, 2, 8, 1]
    assert entropy_peaks(e, 4) == [8, 5, 3, 1]  # interior local maxima by height
    assert entropy_peaks(e, 2) == [8, 5]
    assert entropy_peaks([1, 2, 3, 4, 5], 4) == [4, 3, 2, 1]  # last step is a peak; the rest fills by height
    assert entropy_peaks([5, 4, 3, 2, 1], 2) == [0, 1]  # first step is a peak
    assert entropy_peaks([1, 3, 3, 2, 4, 4, 4, 0], 4) == [4, 1, 5, 6]  # plateaus count once, at their first step
    assert entropy_peaks([2, 1, 2, 1, 2], 2) == [0, 2]  # equal peaks: the earlier first
    assert entropy_peaks([3, 3, 3, 3], 3) == [0, 1, 2]  # constant: one peak, then fill in step order
    assert entropy_peaks([5, 5, 1], 1) == [0]  # a plateau at the edge
    assert entropy_peaks(torch.tensor([0.1, 0.3, 0.2, 0.4]), 4) == [3, 1, 2, 0]
    with pytest.raises(ValueError, match="k must be in \\[1, 3\\]"):
        entropy_peaks([1, 2, 3], 4)


def test_split_factors():
    assert split_factors(16, 4) == [2, 2, 2, 2]
    assert split_factors(8, 4) == [2, 2, 2]
    assert split_factors(12, 4) == [3, 2, 2]
    assert split_factors(32, 4) == [4, 2, 2, 2]
    assert split_factors(7, 4) == [7]
    assert split_factors(24, 2) == [6, 4]
    for r in range(2, 70):
        for k in (1, 2, 4):
            f = split_factors(r, k)
            assert math.prod(f) == r and 1 <= len(f) <= k and all(x >= 2 for x in f)


# ---------------------------------------------------------------------------------------------- probes and cache


def test_base_entropy_is_computed_once_per_prompt_and_seed(tmp_path):
    """Reference forwards are counted: each (prompt, probe noise) costs one probe of T forwards, ever; the cache
    survives --resume (no reference forward after it) and the resumed run is bit-identical."""
    T = 4
    extra = [prompt_file(tmp_path, 2), "sample.prompts_per_step=2", "checkpoint.every=2"]

    def counted(trainer):
        rows = []
        trainer.policy._ref_transformer.register_forward_pre_hook(
            lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        return rows

    straight = make_trainer(cfg_of(*extra, "train.steps=4"), tmp_path / "a")
    ref_rows = counted(straight)
    straight.run()
    assert sum(ref_rows) == 2 * T  # two prompts, one probe noise each, once
    assert len(straight.strategy.base_entropy) == 2

    # The cached value is the reference network's probe, and at step 1 (policy == base) the delta is exactly 0.
    s, tr = straight.strategy, straight
    (key, cached), = [(k, v) for k, v in s.base_entropy.items() if k[0] == "prompt number 0"]
    x = tr.policy.initial_latents(1, torch.Generator().manual_seed(key[1]))
    with torch.no_grad(), tr.policy.reference() as ref:
        _, again = s.probe(tr.rollout_context(), x, tr.policy.encode_prompts([key[0]]), transformer=ref)
    torch.testing.assert_close(again[0], cached, rtol=1e-5, atol=1e-5)
    assert read_metrics(tmp_path / "a/metrics.jsonl")[0]["entropy_delta"] == [0.0, 0.0]

    first = make_trainer(cfg_of(*extra, "train.steps=2"), tmp_path / "b")
    first.run()
    resumed = make_trainer(cfg_of(*extra, "train.steps=4"), tmp_path / "b", resume=True)
    assert resumed.strategy.base_entropy.keys() == straight.strategy.base_entropy.keys()
    after = counted(resumed)
    resumed.run()
    assert after == []  # the checkpoint carried the cache
    for name in ("trainable", "ema"):
        wa = load_file(str(tmp_path / f"a/checkpoints/step_4/{name}.safetensors"))
        wb = load_file(str(tmp_path / f"b/checkpoints/step_4/{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = read_metrics(tmp_path / "a/metrics.jsonl"), read_metrics(tmp_path / "b/metrics.jsonl")
    for key in ("reward_mean", "model_forwards", "samples", "rollouts_per_prompt", "branch_steps", "entropy_t"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


def test_more_probe_noises_more_cache_entries(tmp_path):
    trainer = make_trainer(cfg_of(prompt_file(tmp_path, 2), "sample.prompts_per_step=2", "train.steps=6",
                                  "algo_args.probe_noises=3"), tmp_path / "r")
    rows = []
    trainer.policy._ref_transformer.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    trainer.run()
    keys = trainer.strategy.base_entropy
    assert 2 < len(keys) <= 6 and {k[0] for k in keys} == {"prompt number 0", "prompt number 1"}
    assert sum(rows) == 4 * len(keys)  # T forwards per distinct (prompt, seed)


def test_probe_is_the_shared_prefix(tmp_path, monkeypatch):
    """The rollouts start at the first branch step from the probe's latent there; the steps before it are never
    sampled again, so the step's forwards are the probes' plus one per tree row from the first split on."""
    trainer = make_trainer(cfg_of("sample.prompts_per_step=3"), tmp_path / "r")
    s = trainer.strategy
    real = AEGPO.probe
    seen = []

    def probe(self, ctx, x, emb, transformer=None):
        out = real(self, ctx, x, emb, transformer=transformer)
        if transformer is None:
            seen.append(out)
        return out

    monkeypatch.setattr(AEGPO, "probe", probe)
    before = trainer.policy.model_forwards
    batches = sampled(trainer)
    (latents, entropy), = seen
    plans_rows = 0
    g = 0
    for mb in batches:
        tree = mb.data["tree"]
        for local, size in enumerate(mb.group_sizes):
            peaks = entropy_peaks(entropy[g], s.top_k)
            splits = dict(zip(peaks, split_factors(size, s.top_k)))
            start = min(splits)
            roots = [n for n in range(tree.num_nodes) if tree.parent[n] == -1 and tree.group[n] == local]
            assert len(roots) == 1
            first = next(tr for tr in tree.transitions if tr["step"] == start)
            rows = [i for i, n in enumerate(first["node"].tolist()) if tree.group[n] == local]
            assert len(rows) == splits[start]  # split right at the start
            for i in rows:
                assert torch.equal(first["x"][i], latents[start, g])
            assert all(tr["step"] >= start for tr in tree.transitions
                       if any(tree.group[n] == local for n in tr["node"].tolist()))
            g += 1
        plans_rows += sum(len(tr["node"]) for tr in tree.transitions)
    T = trainer.cfg.sample.num_steps
    # FLUX: one forward per row. Probes: 3 prompts x T for the policy and again for the reference (first step).
    assert trainer.policy.model_forwards - before == 2 * 3 * T + plans_rows


def test_sd3_lora_probe_conditional_rows_and_adapters_disabled_reference(tmp_path):
    """SD3 runs CFG as [uncond, cond]: the probe's entropy is the conditional rows'. With LoRA the base is the
    transformer with its adapters disabled: identical to the policy before the first update (delta exactly 0)."""
    from fastgrpo.diffusion import AttentionEntropyCollector

    trainer = make_trainer(cfg_of("model.family=sd3", "sample.guidance_scale=4.5", "model.lora={rank: 4, alpha: 8}",
                                  "train.lr=1e-2", "train.steps=2"), tmp_path / "r")
    s, policy = trainer.strategy, trainer.policy
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    emb = policy.encode_prompts(["a red apple on a table", "a purple flower"])
    with torch.no_grad():
        _, entropy = s.probe(trainer.rollout_context(), x, emb)
        sigma = trainer.sigmas[:1].expand(2)
        for cond, want_close in ((True, True), (False, False)):
            e = {k: v for k, v in emb.items()}
            if not cond:  # the unconditional half: the empty prompt's embeddings
                e["embeds"], e["pooled"] = e["neg_embeds"], e["neg_pooled"]
            with AttentionEntropyCollector(policy.transformer, s.layers) as col:
                policy.velocity(x, sigma, e, cfg=False)
                single = col.pop()
            assert torch.allclose(single, entropy[:, 0], rtol=1e-4, atol=1e-5) == want_close
    trainer.run()
    rows = read_metrics(tmp_path / "r/metrics.jsonl")
    assert rows[0]["entropy_delta"] == [0.0, 0.0] and min(rows[1]["entropy_delta"]) > 0


# ---------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("exploration", ["branch", "tempflow"])
def test_groups_of_different_sizes_get_per_group_advantages(tmp_path, monkeypatch, exploration):
    """Three prompts (odd) with zero base entropy -> v = mean Entropy_theta, all distinct -> 4 / 3 / 2 rollouts;
    the advantages phase normalises each group by its own statistics (float64 reference in numpy)."""
    trainer = make_trainer(cfg_of("sample.prompts_per_step=3", f"algo_args.exploration={exploration}"),
                           tmp_path / "r")
    monkeypatch.setattr(AEGPO, "base_entropies", lambda self, ctx, keys, x, emb: torch.zeros(len(keys), 4))
    batches = sampled(trainer)
    log = trainer.strategy.take_log()
    sizes = [n for mb in batches for n in mb.group_sizes]
    assert sorted(sizes) == [2, 3, 4] and sizes == log["rollouts_per_prompt"]
    trainer.advantages(batches)
    rewards = torch.cat([mb.rewards for mb in batches]).double().numpy()
    got = torch.cat([mb.advantages.cpu() for mb in batches]).double().numpy()
    want, start = [], 0
    for n in sizes:
        r = rewards[start:start + n]
        want.append(np.clip((r - r.mean()) / (r.std() + 1e-4), -5, 5))  # group std, ddof 0, +1e-4, clip 5
        start += n
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-5)
    rows = trainer.train_rows(batches)
    if exploration == "branch":  # each group its own tree, the released BranchGRPO rule (fastgrpo.tree_advantages)
        from fastgrpo import tree_advantages
        from fastgrpo.algos.branch_grpo import tree_layout

        for mb in batches:
            tree = mb.data["tree"]
            adv = trainer.strategy.node_advantages(tree, mb.rewards, mb.advantages.cpu())
            for g, (pos, branching, nodes) in tree_layout(tree).items():
                assert math.prod(branching) == len(pos) == mb.group_sizes[g] and adv[nodes[0]] == 0
                want = tree_advantages(mb.rewards.cpu()[pos].double(), branching)  # ddof 1, eps 1e-8, min std 1e-6
                for d, a in enumerate(want, start=1):
                    torch.testing.assert_close(adv[nodes[d]].double(), a, rtol=1e-6, atol=1e-6)
    if exploration == "tempflow":  # one branch transition per group, at one of its peaks, weighted by TempFlow's rule
        assert rows["step"].numel() == sum(sizes)
        branch = log["branch_steps"]
        assert all(len(b) == 1 for b in branch)
        assert sorted(rows["step"].tolist()) == sorted(b[0] for b, n in zip(branch, sizes) for _ in range(n))
        s = trainer.strategy
        std = s._explorer.transition_stds(trainer.sigmas)
        torch.testing.assert_close(rows["weight"].double(), std[rows["step"]] / std.mean(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- log and config


def test_metrics_fields(tmp_path):
    out = train(cfg_of("train.steps=2", "sample.prompts_per_step=3"), tmp_path / "run")
    rows = read_metrics(out / "metrics.jsonl")
    for row in rows:
        assert len(row["entropy_t"]) == 4 and all(math.isfinite(x) and 0 < x < 5 for x in row["entropy_t"])
        assert len(row["rollouts_per_prompt"]) == 3 and len(row["entropy_delta"]) == 3
        assert len(row["branch_steps"]) == 3
        for b in row["branch_steps"]:
            assert b == sorted(set(b)) and 1 <= len(b) <= 2 and all(0 <= t < 4 for t in b)
    assert rows[-1]["samples"] == sum(sum(r["rollouts_per_prompt"]) for r in rows)
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("override, key", [
    ("algo_args.r_low=1", "algo_args.r_low"),
    ("algo_args.r_high=1", "algo_args.r_high"),
    ("algo_args.r_high=5", "algo_args.r_high \\+ algo_args.r_low must be even"),
    ("sample.group_size=4", "sample.group_size must be r_mean"),
    ("algo_args.warmup_steps=-1", "algo_args.warmup_steps"),
    ("algo_args.top_k=0", "algo_args.top_k"),
    ("algo_args.top_k=5", "algo_args.top_k must be an integer in \\[1, 4\\]"),
    ("algo_args.layers=[]", "algo_args.layers"),
    ("algo_args.layers=[1, 1]", "algo_args.layers"),
    ("algo_args.layers=[true]", "algo_args.layers"),
    ("algo_args.entropy_mode=max", "algo_args.entropy_mode"),
    ("algo_args.exploration=tree", "algo_args.exploration"),
    ("algo_args.probe_noises=0", "algo_args.probe_noises"),
    ("algo_args.split_noise_scale=0", "algo_args.split_noise_scale"),
    ("algo_args={exploration: tempflow, split_noise_scale: 2.0, r_high: 4, r_low: 2, top_k: 2}",
     "algo_args.split_noise_scale applies to exploration: branch only"),
    ("algo_args.depth=3", "algo_args.depth is not a setting of aegpo"),
])
def test_bad_algo_args_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        cfg_of(override)


def test_layers_the_model_lacks(tmp_path):
    trainer = make_trainer(cfg_of("algo_args.layers=[5]"), tmp_path / "r")
    with pytest.raises(ValueError, match="algo_args.layers: layers \\[5\\] do not exist"):
        sampled(trainer)


@pytest.mark.slow  # several processes: `make test-slow` (and CI) runs it
def test_two_processes_split_by_the_gathered_median(tmp_path):
    """One prompt per process: a per-process median would give each the mean budget; the gathered one gives one
    prompt 4 rollouts and the other 2. Each process caches the base entropies of both."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    args = [accelerate, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "fastgrpo", "train", "--preset", "tiny-aegpo", "--out", "run"]
    for o in [*SMALL, "train.steps=2", "sample.prompts_per_step=2", prompt_file(tmp_path, 2)]:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert rows[0]["rollouts_per_prompt"] == [3, 3] and rows[0]["entropy_delta"] == [0.0, 0.0]
    assert sorted(rows[1]["rollouts_per_prompt"]) == [2, 4]
    assert rows[1]["samples"] == 6 + 6
    state = torch.load(tmp_path / "run/checkpoints/step_2/strategy.pt", weights_only=False)
    assert {k[0] for k in state["base_entropy"]} == {"prompt number 0", "prompt number 1"}


# ---------------------------------------------------------------------------------------------- compiled blocks


@pytest.mark.slow  # Dynamo traces the tiny FLUX blocks (aot_eager), eager and compiled rounds: ~20 s
def test_compiled_blocks_give_the_eager_rounds(tmp_path, monkeypatch):
    """model.compile=true with AEGPO: two rounds (the second after an update: non-zero entropy deltas, a 4 / 2
    median split) give the eager rounds' probe entropies, allocation, rollouts, rewards and gradients. The collector
    runs the blocks of its layers uncompiled (`fastgrpo.diffusion.attention`, "Compiled blocks"): its processors are
    never traced, the blocks are compiled again after each probe, and the double-stream block's graphs stay within
    Dynamo's default limit of 8 (traced processors made 10 here: graphs per layer, policy and frozen reference)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    from fastgrpo.diffusion.adapter import FlowAdapter
    from fastgrpo.diffusion.attention import FluxEntropyAttnProcessor

    original = FlowAdapter.compile_blocks
    monkeypatch.setattr(FlowAdapter, "compile_blocks", lambda self, **kw: original(self, backend="aot_eager"))
    traced = []
    real_call = FluxEntropyAttnProcessor.__call__

    def spy(self, *args, **kwargs):
        traced.append(torch.compiler.is_compiling())
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(FluxEntropyAttnProcessor, "__call__", spy)
    torch._dynamo.reset()
    extra = [prompt_file(tmp_path, 2), "sample.prompts_per_step=2", "train.lr=1e-2"]
    eager = make_trainer(cfg_of(*extra), tmp_path / "e")
    compiled = make_trainer(cfg_of(*extra, "model.compile=true"), tmp_path / "c")
    blocks = [*compiled.policy.transformer.transformer_blocks, *compiled.policy.transformer.single_transformer_blocks,
              *compiled.policy.frozen_reference.transformer_blocks,
              *compiled.policy.frozen_reference.single_transformer_blocks]
    assert compiled.policy.compiled_blocks == len(blocks) == 2 * (2 + 1)

    def round_and_grads(trainer, step):
        batches = sampled(trainer, step)
        log = trainer.strategy.take_log()
        trainer.advantages(batches)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.train(batches)
        x = torch.cat([mb.data["tree"].transitions[-1]["x_next"] for mb in batches])
        rewards = torch.cat([mb.rewards for mb in batches])
        grads = {k: p.grad.clone() for k, p in trainer.named.items() if p.grad is not None}
        trainer.optimizer.step()
        return log, x, rewards, grads

    for step in range(2):
        l0, x0, r0, g0 = round_and_grads(eager, step)
        l1, x1, r1, g1 = round_and_grads(compiled, step)
        assert all(b._compiled_call_impl is not None for b in blocks)  # compiled again after the probes
        torch.testing.assert_close(torch.tensor(l1["entropy_t"]), torch.tensor(l0["entropy_t"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(l1["entropy_delta"]), torch.tensor(l0["entropy_delta"]),
                                   rtol=1e-3, atol=1e-6)  # a difference of two nearly equal entropies
        assert l1["rollouts_per_prompt"] == l0["rollouts_per_prompt"] and l1["branch_steps"] == l0["branch_steps"]
        torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-7)
        assert g1.keys() == g0.keys() and g0
        for k in g0:
            assert ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item() < 1e-4, k
    assert min(l0["entropy_delta"]) > 0 and sorted(l0["rollouts_per_prompt"]) == [2, 4]
    assert traced and not any(traced)  # the processors ran, never under Dynamo
    assert 2 <= len(_debug_get_cache_entry_list(FluxTransformerBlock.forward.__code__)) <= 8
    torch._dynamo.reset()


@pytest.mark.slow  # a FLUX.1-dev block count (19 + 38 blocks, tiny widths) traced by Dynamo: ~30 s
def test_compiled_probes_at_flux_dev_block_count_stay_within_the_recompile_limit(tmp_path, monkeypatch):
    """AEGPO's paper layers (5, 10, 15) on a transformer with FLUX.1-dev's 19 double- and 38 single-stream blocks,
    full fine-tuning (the frozen reference compiled too): one round compiles at most 8 graphs per block code (Dynamo's
    default ``recompile_limit``), and the next round none. Measured: 6 double-stream graphs (14 when the processors
    were traced) and 8 single-stream ones (contiguous vs strided input x policy / reference / dynamic batch / grad)."""
    from concurrent.futures import ThreadPoolExecutor

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from fastgrpo.diffusion.adapter import FlowAdapter
    from fastgrpo.diffusion.tiny import tiny_flux_pipeline, tiny_flux_transformer

    original = FlowAdapter.compile_blocks
    monkeypatch.setattr(FlowAdapter, "compile_blocks", lambda self, **kw: original(self, backend="aot_eager"))
    torch._dynamo.reset()
    pipe = tiny_flux_pipeline(0)
    pipe.transformer = tiny_flux_transformer(0, num_layers=19, num_single_layers=38, guidance_embeds=True)
    cfg = cfg_of("algo_args.layers=[5, 10, 15]", "model.compile=true", "train.steps=2")
    trainer = make_trainer(cfg, tmp_path / "r", pipeline=pipe)
    assert trainer.policy.compiled_blocks == 2 * (19 + 38)

    def graphs():
        return [len(_debug_get_cache_entry_list(c.forward.__code__))
                for c in (FluxTransformerBlock, FluxSingleTransformerBlock)]

    with ThreadPoolExecutor(1) as pool:
        trainer.round(0, pool)
        first = graphs()
        trainer.round(1, pool)
    assert all(1 <= n <= 8 for n in first), first
    assert graphs() == first
    torch._dynamo.reset()
