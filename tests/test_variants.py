"""The mechanics of TempFlow-GRPO, Pro-GRPO and BranchGRPO on tiny models, and that each tiny preset learns
(AEGPO's mechanics are in tests/test_aegpo.py; its learning check is here with the others)."""
import math

import numpy as np
import pytest
import torch

from fastgrpo.algos import TempFlowGRPO
from fastgrpo.diffusion import flux_sigmas, sd3_sigmas
from fastgrpo.train import make_trainer, resolve_config, train
from fastgrpo.train.metrics import read_metrics, reward_improvement

QUIET = ["log.progress=false", "log.tensorboard=false"]


def cfg_of(preset, *extra):
    return resolve_config(preset=preset, overrides=[*QUIET, *extra])


def sampled(trainer, step=0):
    """Run the sample phase of one optimizer step; returns the micro-batches."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return trainer.sample(step, pool)


# ---------------------------------------------------------------------------------------------- TempFlow-GRPO


def test_tempflow_weights_are_2252_times_the_std_on_sd35_schedule():
    s = TempFlowGRPO()
    sigmas = sd3_sigmas(10, shift=3.0)
    stds = s.transition_stds(sigmas)
    steps = torch.arange(9)
    w = s.step_weights(stds[steps].float(), steps, sigmas)
    torch.testing.assert_close(w.double(), 2.252 * stds[:9], rtol=2e-4, atol=0)
    assert abs(w.mean().item() - 1) < 1e-6  # normalised to mean 1 over the trained steps
    # Independent: sd_t * sqrt(|dt|) from the Flow-GRPO formula, sigma_max guard at sigma = 1.
    sig = sigmas.double()
    guard = torch.where(sig[:-1] == 1, sig[1], sig[:-1])
    ref = 0.7 * torch.sqrt(sig[:-1] / (1 - guard)) * torch.sqrt(sig[:-1] - sig[1:])
    torch.testing.assert_close(stds, ref)


def test_tempflow_branches_once_per_prompt_and_trains_only_the_branch(tmp_path):
    trainer = make_trainer(cfg_of("tiny-tempflow-grpo", "sample.num_steps=5", "sample.group_size=4",
                                  "sample.batch_size=4", "algo_args.mode=single",
                                  "algo_args.branch_choice=cycle"), tmp_path / "r")
    batches = sampled(trainer)
    for g, mb in enumerate(batches):
        tree = mb.data["tree"]
        assert tree.num_nodes == 1 + 4  # one root (ODE prefix), split into G children at k
        assert [tr["step"] for tr in tree.transitions] == [g]  # cycle: group g branches at step g
        assert tree.transitions[0]["node"].tolist() == tree.leaf_nodes.tolist()
    rows = trainer.train_rows(trainer_advantages(trainer, batches))
    assert rows["step"].tolist() == [0] * 4 + [1] * 4
    s = trainer.strategy
    w = s.step_weights(None, torch.tensor([0, 1]), trainer.sigmas)
    torch.testing.assert_close(rows["weight"], w.repeat_interleave(4))


def test_tempflow_groups_branching_at_different_steps_in_one_wave_all_train(tmp_path):
    """Two groups in one wave (cycle: k = 0 and 1): the second split gives the first group's children new nodes,
    yet both groups' branch transitions train (each node with one leaf below takes its leaf's advantage)."""
    trainer = make_trainer(cfg_of("tiny-tempflow-grpo", "sample.num_steps=5", "sample.group_size=4",
                                  "sample.batch_size=8", "algo_args.mode=single",
                                  "algo_args.branch_choice=cycle"), tmp_path / "r")
    batches = sampled(trainer)
    assert len(batches) == 1 and batches[0].group_sizes == [4, 4]
    rows = trainer.train_rows(trainer_advantages(trainer, batches))
    assert rows["step"].tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(rows["adv"], batches[0].advantages.cpu().float())


def trainer_advantages(trainer, batches):
    trainer.advantages(batches)
    return batches


def test_tempflow_bad_args():
    with pytest.raises(ValueError, match="algo_args.branch_steps"):
        cfg_of("tiny-tempflow-grpo", "algo_args.branch_steps=[9]")
    with pytest.raises(ValueError, match="algo_args.branch_choice"):
        cfg_of("tiny-tempflow-grpo", "algo_args.branch_choice=all")
    with pytest.raises(ValueError, match="algo_args.depth is not a setting of tempflow_grpo"):
        cfg_of("tiny-tempflow-grpo", "algo_args.depth=3")


# TempFlow-GRPO as released (Shredded-Pork/TempFlow-GRPO at e66824e; the stored snapshot has no line numbers, so
# the statements are quoted): scripts/train_sd3_pr.py ``unclipped_loss = - 2.25 * std_dev_t * advantages * ratio``,
# scripts/train_flux_pr.py ``-1.73 * std_dev_t``, both ``kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2)
# .mean(...) / (2 * std_dev_t ** 2)`` with ``std_dev_t`` the transition std (flow_grpo/diffusers_patch/
# sd3_sde_with_logprob.py ``return ... std_dev_t * torch.sqrt(-1*dt)``, sd_t = a sqrt(s / (1 - s)), sigma_max guard
# at s = 1); advantages from flow_grpo/stat_tracking.py ``PerPromptStatTracker.update``: per prompt and column,
# ``(r - np.mean(r, axis=0)) / (np.std(r, axis=0) + 1e-4)`` on the un-gathered rewards (``# seed group``).


def _released_std(sigmas, a):
    """float64 s_t = a sqrt(s / (1 - s')) sqrt(s - s_next), s' = sigma_max where s == 1 (the released formula)."""
    sig = sigmas.double()
    guard = torch.where(sig[:-1] == 1, sig[1], sig[:-1])
    return a * torch.sqrt(sig[:-1] / (1 - guard)) * torch.sqrt(sig[:-1] - sig[1:])


@pytest.mark.parametrize("family, sigmas, a, constant, rtol", [
    ("sd3", sd3_sigmas(10, shift=3.0), 0.7, 2.25, 1e-3),  # 2.2522
    ("flux", flux_sigmas(10, 4096), 0.9, 1.73, 3e-3),  # 1.7260 (1024 px: 4096 packed tokens)
])
def test_tempflow_weights_are_the_released_constants(family, sigmas, a, constant, rtol):
    """Our s_t / mean(s) over the 9 trained (= released branch) steps is the released ``c * s_t``."""
    s = TempFlowGRPO(noise_level=a)
    steps = torch.arange(9)
    w = s.step_weights(None, steps, sigmas).double()
    s_t = _released_std(sigmas, a)[:9]
    torch.testing.assert_close(s.transition_stds(sigmas)[:9], s_t)
    ratio = w / s_t  # = 1 / mean(s) at every step
    torch.testing.assert_close(ratio, ratio[:1].expand(9))
    assert abs(ratio[0].item() / constant - 1) < rtol, ratio[0].item()


def test_kl_conventions_against_the_released_formula():
    """``exact`` is the released KL ``|mu - mu_ref|^2 / (2 s_t^2)``; ``flow_grpo`` divides by ``2 sd_t^2``."""
    from fastgrpo.ops import sde_step

    sig = sd3_sigmas(10, shift=3.0).double()
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for i in (0, 4, 8):
        s, sn = sig[i].item(), sig[i + 1].item()
        dt = sn - s
        sd = 0.7 * math.sqrt(s / (1 - (sig[1].item() if s == 1 else s)))

        def mean(vel):  # the released SDE mean
            return x * (1 + sd ** 2 / (2 * s) * dt) + vel * (1 + sd ** 2 * (1 - s) / (2 * s)) * dt

        sq = ((mean(v) - mean(v_ref)) ** 2).mean(dim=(1, 2, 3))
        for conv, d2 in (("exact", sd ** 2 * -dt), ("flow_grpo", sd ** 2)):
            out = sde_step(x, v, s, sn, kind="flow_grpo", noise_level=0.7, sigma_max=sig[1].item(),
                           prev_sample=x, v_ref=v_ref, kl_convention=conv, impl="torch")
            torch.testing.assert_close(out.kl.double(), sq / (2 * d2), rtol=1e-6, atol=1e-12)


def _released_trainer(tmp_path, *extra):
    return make_trainer(cfg_of("tiny-tempflow-grpo", "sample.num_steps=4", "sample.group_size=3",
                               "sample.batch_size=6", "algo_args.spines=2", *extra), tmp_path / "r")


def test_tempflow_released_plan_layout(tmp_path):
    """Per prompt: ``spines`` ODE spines; per (spine, branch step k) a plan of C children from the spine's latent
    at k, SDE at k only; every branch transition (and only those) trains, weighted s_k / mean(s)."""
    from fastgrpo.ops import sde_step

    trainer = _released_trainer(tmp_path)
    T, C, S, P = 4, 3, 2, 2
    steps = list(range(3))  # floor(0.99 * 4): the trained steps
    f0 = trainer.policy.model_forwards
    batches = sampled(trainer)
    plans_per_prompt = S * len(steps)
    sizes = [n for mb in batches for n in mb.group_sizes]
    assert sizes == [C] * (P * plans_per_prompt)  # each (prompt, spine, branch step) is its own group of C
    # Forwards: the spines run to the last branch step (no CFG pair counted twice here: the tiny SD3 pipeline runs
    # CFG, so a forward counts 2), the children C * (T - k) each.
    per_prompt = S * max(steps) + S * sum(C * (T - k) for k in steps)
    assert trainer.policy.model_forwards - f0 == 2 * P * per_prompt
    # The plans, in order (prompt, spine, k); the spine recomputed here independently of the strategy.
    idx, _ = trainer.sampler.local(0, 0, 1)
    from fastgrpo.train.distributed import group_generators

    gens = group_generators(trainer.cfg.seed, 0, range(P))
    plans = trainer.strategy.plan_groups(trainer.rollout_context(), 0, idx[::C].tolist(), gens)
    assert trainer.strategy.take_log() == {"branch_steps": steps}
    assert len(plans) == P * plans_per_prompt
    gens = group_generators(trainer.cfg.seed, 0, range(P))
    model = trainer.policy
    for n in range(P):
        x = model.initial_latents(S, gens[n])
        emb = model.encode_prompts([trainer.prompts[idx[n * C]]])
        spine = [x]
        for i in range(max(steps)):
            v = model.velocity(x, trainer.sigmas[i].expand(S), {k: t.expand(S, *t.shape[1:]) for k, t in emb.items()})
            x = sde_step(x, v, trainer.sigmas[i].item(), trainer.sigmas[i + 1].item(), kind="ode").prev_sample
            spine.append(x)
        for sp in range(S):
            for j, k in enumerate(steps):
                p = plans[(n * S + sp) * len(steps) + j]
                assert (p.prompt, p.start, p.roots, p.splits, p.leaves()) == (n, k, 1, {k: C}, C)
                assert p.sde.tolist() == [t == k for t in range(T)]
                torch.testing.assert_close(p.x_start, spine[k][sp:sp + 1], rtol=1e-5, atol=1e-6)
    # Transitions: one SDE step per plan, at its k, one per child (leaf); trained rows = all of them.
    for mb in batches:
        tree = mb.data["tree"]
        # Each transition's node has exactly one leaf below (a child; a later split step of another plan in the
        # wave gives it a new node), and every leaf has exactly one transition above it.
        below = [tree.leaves_of(nd) for tr in tree.transitions for nd in tr["node"].tolist()]
        assert all(len(b) == 1 for b in below)
        assert sorted(b[0] for b in below) == list(range(len(tree.leaf_nodes)))
    rows = trainer.train_rows(trainer_advantages(trainer, batches))
    assert sorted(rows["step"].tolist()) == sorted(steps * (P * S * C))
    w = trainer.strategy.step_weights(None, rows["step"], trainer.sigmas)
    torch.testing.assert_close(rows["weight"], w)
    s_t = _released_std(trainer.sigmas, 0.7)
    torch.testing.assert_close(rows["weight"].double(), s_t[rows["step"]] / s_t[steps].mean(), rtol=1e-5, atol=0)


def test_tempflow_released_advantages_per_prompt_and_branch_step(tmp_path):
    """The loop's advantages for a given reward table equal the released stat tracker's, per (spine, step) column
    (float64 reference written from the released formula, clipped at train.adv_clip = 5)."""
    trainer = _released_trainer(tmp_path)
    batches = sampled(trainer)
    T, C, S, P = 4, 3, 2, 2
    K = 3
    g = torch.Generator().manual_seed(1)
    table = torch.randn(P, S, K, C, generator=g, dtype=torch.float64)  # reward of child c of (prompt, spine, k)
    table[0, 1, 2] = torch.tensor([0.5, 0.5, 0.5])  # a column without spread: advantages 0
    flat = table.reshape(-1)
    n = 0
    for mb in batches:
        mb.rewards = flat[n:n + len(mb.prompts)].float()
        n += len(mb.prompts)
    assert n == flat.numel()
    trainer.advantages(batches)
    ours = torch.cat([mb.advantages.cpu() for mb in batches]).double().reshape(P, S, K, C)
    r = table.numpy()
    ref = (r - r.mean(axis=-1, keepdims=True)) / (r.std(axis=-1, keepdims=True) + 1e-4)
    torch.testing.assert_close(ours, torch.from_numpy(np.clip(ref, -5, 5)), rtol=1e-5, atol=1e-5)
    assert ours[0, 1, 2].abs().max() == 0


def test_tempflow_released_plans_do_not_depend_on_the_process_count(tmp_path):
    """A group's plans come from its own generator: planning group 1 alone gives its plans of the whole batch."""
    from fastgrpo.train.distributed import group_generators

    trainer = _released_trainer(tmp_path)
    idx = trainer.sampler.local(0, 0, 1)[0][::3].tolist()
    ctx = trainer.rollout_context()
    both = trainer.strategy.plan_groups(ctx, 0, idx, group_generators(0, 0, [0, 1]))
    alone = trainer.strategy.plan_groups(ctx, 0, idx[1:], group_generators(0, 0, [1]))
    for a, b in zip(both[len(alone):], alone):
        torch.testing.assert_close(a.x_start, b.x_start, rtol=1e-5, atol=1e-6)
        assert a.generator.initial_seed() == b.generator.initial_seed()
        assert (a.start, a.splits) == (b.start, b.splits)


def test_tempflow_released_tiny_run_trains_the_branch_transitions(tmp_path, monkeypatch):
    """Two optimizer steps of the tiny preset (released mode): the trained transitions are the P*S*K*C branch
    transitions, and the training sde_step gets train.kl_convention (exact, with beta > 0 here)."""
    import fastgrpo.train.flow as flow

    seen = []
    real = flow.sde_step

    def spy(*args, **kw):
        if kw.get("prev_sample") is not None:
            seen.append(kw.get("kl_convention"))
        return real(*args, **kw)

    monkeypatch.setattr(flow, "sde_step", spy)
    out = train(cfg_of("tiny-tempflow-grpo", "sample.num_steps=4", "sample.group_size=3", "sample.batch_size=6",
                       "algo_args.spines=2", "train.steps=2", "train.beta=0.01"), tmp_path / "r", device="cpu")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["trained_transitions"] for r in rows] == [2 * 2 * 3 * 3] * 2
    assert rows[-1]["samples"] == 2 * 2 * 2 * 3 * 3
    assert max(r["first_ratio_dev"] for r in rows) < 1e-6
    assert seen and set(seen) == {"exact"}
    assert all(r["kl"] >= 0 and math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("override, match", [
    ("train.kl_convention=gaussian", "train.kl_convention must be one of"),
    ("algo_args.mode=tree", "algo_args.mode must be one of"),
    ("algo_args.spines=0", "algo_args.spines must be an integer"),
    ("algo_args.branch_choice=cycle", "algo_args.branch_choice applies to mode: single"),
])
def test_tempflow_released_bad_config(override, match):
    with pytest.raises(ValueError, match=match):
        cfg_of("tiny-tempflow-grpo", override)
    if override.startswith("train."):
        with pytest.raises(ValueError, match=match):
            cfg_of("tiny-flow-grpo", override)


# ---------------------------------------------------------------------------------------------- Pro-GRPO


def test_pro_grpo_prunes_and_never_steps_pruned_trajectories(tmp_path, monkeypatch):
    trainer = make_trainer(cfg_of("tiny-pro-grpo"), tmp_path / "r")
    rows_per_step = []
    real = trainer.velocity

    def spy(x, steps, emb, group, **kw):
        rows_per_step.append((steps if isinstance(steps, int) else int(steps[0]), x.shape[0]))
        return real(x, steps, emb, group, **kw)

    monkeypatch.setattr(trainer, "velocity", spy)
    batches = sampled(trainer)
    # One wave per group (12 roots > batch 8): 12 rows at steps 0-2 (the checkpoint step 2 still evaluates all 12,
    # whose velocity the preview reuses), 8 at steps 3-4 (checkpoint 4), 4 afterwards.
    assert rows_per_step == [(0, 12), (1, 12), (2, 12), (3, 8), (4, 8), (5, 4)] * 2
    assert trainer.strategy.take_log() == {"survivors": [12, 8, 4]}
    for mb in batches:
        tree = mb.data["tree"]
        assert len(mb.prompts) == 4 and tree.leaf_nodes.numel() == 4
        pruned = set(range(tree.num_nodes)) - set(tree.leaf_nodes.tolist())
        assert len(pruned) == 8
        for tr in tree.transitions:
            stepped = set(tr["node"].tolist())
            assert len(stepped) == trainer.strategy.schedule.survivors_after(tr["step"])
    trainer.advantages(batches)
    rows = trainer.train_rows(batches)
    assert rows["step"].numel() == 2 * 4 * 5  # only survivors' transitions, first floor(0.99*6) steps


def test_pro_grpo_keeps_the_ovf_choice(tmp_path, monkeypatch):
    """The survivors are exactly ovf_select of the preview rewards."""
    from fastgrpo.ops import ovf_select

    trainer = make_trainer(cfg_of("tiny-pro-grpo", "sample.prompts_per_step=1"), tmp_path / "r")
    seen = []
    real_reward = trainer.reward_fn

    def reward(images, prompts):
        out = real_reward(images, prompts)
        seen.append(out[0].clone())
        return out

    trainer.reward_fn = reward
    real_prune = trainer.strategy.prune
    kept = []

    def prune(tr, step, rows):
        k = real_prune(tr, step, rows)
        if k is not None:
            kept.append(k)
        return k

    monkeypatch.setattr(trainer.strategy, "prune", prune)
    sampled(trainer)
    assert torch.equal(kept[0], ovf_select(seen[0].view(1, -1), 8).indices.view(-1))
    assert torch.equal(kept[1], ovf_select(seen[1].view(1, -1), 4).indices.view(-1))


def test_pro_grpo_spends_fewer_forwards_than_flow_grpo(tmp_path):
    pro = train(cfg_of("tiny-pro-grpo", "train.steps=1"), tmp_path / "pro")
    # Flow-GRPO at the settings of tiny-pro-grpo (6 denoising steps, 2 groups of 8, CFG 4.5)
    flow = train(cfg_of("tiny-flow-grpo", "train.steps=1", "sample.num_steps=6", "sample.guidance_scale=4.5",
                        "sample.prompts_per_step=2", "sample.batch_size=8"), tmp_path / "flow")
    f_pro = read_metrics(pro / "metrics.jsonl")[0]["model_forwards"]
    f_flow = read_metrics(flow / "metrics.jsonl")[0]["model_forwards"]
    # 2 groups, CFG pair = 2: Pro 12*3 + 8*2 + 4 sampled rows + 4*5 trained; Flow 8*6 sampled + 8*5 trained
    assert f_pro == 2 * 2 * (12 * 3 + 8 * 2 + 4 + 4 * 5)
    assert f_flow == 2 * 2 * (8 * 6 + 8 * 5)
    assert f_pro < f_flow


def test_pro_grpo_schedule_must_match_the_config():
    with pytest.raises(ValueError, match="sample.group_size must be the schedule's final survivor count"):
        cfg_of("tiny-pro-grpo", "sample.group_size=8")
    with pytest.raises(ValueError, match="algo_args.schedule is for 10 steps"):
        cfg_of("tiny-pro-grpo", "algo_args.schedule=standard")
    with pytest.raises(ValueError, match="algo_args.schedule: survivors must be strictly decreasing"):
        cfg_of("tiny-pro-grpo", "algo_args.schedule={checkpoints: [2], survivors: [8, 8]}")


# ---------------------------------------------------------------------------------------------- BranchGRPO


def test_branch_tree_shape_and_depthwise_advantages(tmp_path):
    trainer = make_trainer(cfg_of("tiny-branch-grpo", "sample.prompts_per_step=1", "sample.num_steps=5",
                                  "algo_args.split_steps=[0, 2, 3]"), tmp_path / "r")
    (mb,) = sampled(trainer)
    tree = mb.data["tree"]
    depth = np.array(tree.depth)
    assert [(depth == d).sum() for d in range(4)] == [1, 2, 4, 8] and tree.leaf_nodes.numel() == 8
    # Stochastic at every step; nodes of one depth step together: the transitions of step i belong to depth(i).
    assert [tr["step"] for tr in tree.transitions] == [0, 1, 2, 3, 4]
    assert [len(tr["node"]) for tr in tree.transitions] == [2, 2, 4, 8, 8]
    trainer.advantages([mb])
    adv = trainer.strategy.node_advantages(tree, mb.rewards, mb.advantages)
    # Independent: value of a node = mean of its leaves; normalise per depth.
    r = mb.rewards.double().numpy()
    leaves = tree.leaf_nodes.tolist()

    def below(n):
        out = []
        for pos, leaf in enumerate(leaves):
            m = leaf
            while m != -1:
                if m == n:
                    out.append(pos)
                    break
                m = tree.parent[m]
        return out

    value = np.array([r[below(n)].mean() for n in range(tree.num_nodes)])
    for d in range(1, 4):  # the released rule: sample std (ddof 1), + 1e-8 (BranchGRPO train_branchgrpo_flux.py:655)
        v = value[depth == d]
        s = v.std(ddof=1)
        want = np.zeros_like(v) if s < 1e-6 else (v - v.mean()) / (s + 1e-8)
        np.testing.assert_allclose(adv.numpy()[depth == d], want, rtol=1e-5, atol=1e-6)
    assert adv[0] == 0  # the root is alone at depth 0
    rows = trainer.train_rows([mb])
    assert rows["step"].numel() == 2 + 2 + 4 + 8 + 8  # every stochastic transition, shared prefixes once


def test_branch_split_noise_scale_keeps_unscaled_log_prob(tmp_path):
    trainer = make_trainer(cfg_of("tiny-branch-grpo", "sample.prompts_per_step=1", "sample.num_steps=4",
                                  "algo_args.split_steps=[0, 1, 2]", "algo_args.split_noise_scale=0.5"),
                           tmp_path / "r")
    (mb,) = sampled(trainer)
    from fastgrpo.ops import sde_step

    tr = mb.data["tree"].transitions[0]
    out = sde_step(tr["x"], torch.zeros_like(tr["x"]), 1.0, 0.5, kind="dance", noise_level=0.3,
                   prev_sample=tr["x_next"])  # just to get the same std formula at another step: std>0 sanity
    assert out.std.min() > 0
    # The draw was scaled by 0.5: |z| = |x_next - mean| / std has RMS ~0.5, and the log-prob is under std.
    s, sn = trainer.sigmas[0].item(), trainer.sigmas[1].item()
    v = trainer.velocity(tr["x"], torch.zeros(tr["x"].shape[0], dtype=torch.long),
                         mb.data["emb"], torch.zeros(tr["x"].shape[0], dtype=torch.long))
    again = sde_step(tr["x"], v, s, sn, kind="dance", noise_level=0.3, prev_sample=tr["x_next"])
    torch.testing.assert_close(again.log_prob, tr["log_prob"])
    z = ((tr["x_next"] - again.mean) / again.std.view(-1, 1, 1)).flatten()
    assert 0.4 < z.pow(2).mean().sqrt().item() < 0.6


def test_branch_group_size_must_match_the_tree():
    with pytest.raises(ValueError, match="sample.group_size must be 2 \\*\\* len"):
        cfg_of("tiny-branch-grpo", "sample.group_size=16")


# ---------------------------------------------------------------------------------------------- learning


LEARNING_SEEDS = (0, 1, 2)


@pytest.mark.slow  # 3 runs of 40 steps per variant: `make test-slow` (and CI)
@pytest.mark.parametrize("preset, extra", [
    ("tiny-tempflow-grpo", []), ("tiny-pro-grpo", []), ("tiny-branch-grpo", []), ("tiny-aegpo", []),
    # Issue 16: two optimizer steps per round; the second sees ratios away from 1 and the clip (1e-4) binds.
    # Half the preset's 40 rounds, like the others. Measured z at seeds 0 / 1 / 2: 8.0 / 3.0 / 5.9 at 20 rounds
    # (8.8 / 15.5 / 13.6 at 40; relative gains 1-2%, against 4-41% with one step per round).
    ("tiny-flow-grpo", ["train.minibatches=2", "train.steps=20"]),
    # Issue 17's families, Flow-GRPO on each at half the presets' 40 steps (bench/results/learning.json holds the
    # full-length runs: z at seeds 0 / 1 / 2 Qwen-Image 38.5 / 8.6 / 4.3, Kontext 7.5 / 29.4 / 7.3, Wan 19.9 / 12.1 /
    # 22.9).
    ("tiny-qwen-image-flow-grpo", ["train.steps=20"]), ("tiny-flux-kontext-flow-grpo", ["train.steps=20"]),
    ("tiny-wan-flow-grpo", ["train.steps=20"]),
])
def test_tiny_variant_learns(tmp_path, preset, extra):
    """The variants' learning claim over seeds 0, 1, 2 (half the presets' steps, on the CPU): the z of each run
    (last quarter of steps against the first, `reward_improvement`) pooled over the seeds (Stouffer: sum / sqrt(n))
    exceeds 2, and no seed's reward clearly falls (z > -2). These presets sample the tiny random VAE, which decodes
    every latent to nearly the same gray, so single runs gain 0.1-1.6% and one seed alone is not a claim
    (measured z at seed 0 / 1: TempFlow 4.9 / 8.1 (released mode, 5.6 at seed 2), Pro 4.8 / -0.8, Branch 7.3 / 16.5, AEGPO 11.2 / -)."""
    zs = []
    for seed in LEARNING_SEEDS:
        out = train(cfg_of(preset, "train.steps=40", f"seed={seed}", *extra), tmp_path / f"run{seed}", device="cpu")
        rows = read_metrics(out / "metrics.jsonl")
        check = reward_improvement(rows)
        assert math.isfinite(check["last_quarter"]) and check["z"] > -2, (seed, check)
        assert max(r["first_ratio_dev"] for r in rows) < 1e-6  # the stored log-probs are the policy's
        if "train.minibatches=2" in extra:  # later updates: the policy moved since sampling
            assert all(r["optimizer_steps"] == 2 and r["ratio_dev_max"] > 1e-4 for r in rows)
            assert sum(r["clip_frac"] for r in rows) / len(rows) > 0.05
        zs.append(check["z"])
    assert sum(zs) / math.sqrt(len(zs)) > 2, dict(zip(LEARNING_SEEDS, zs))
