"""The training loop on a tiny Janus (EG-GRPO, T2I-R1): run folder, ratio 1, reference, resume, inner epochs,
token terms against a float64 reference, config errors (learning: tests/test_train_loop.py)."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.algos import EGGRPO, T2IR1
from fastgrpo.train import TrainingDiverged, make_trainer, resolve_config, train
from fastgrpo.train.config import config_from_dict, load_preset
from fastgrpo.train.metrics import read_metrics

SMALL = ["sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=4", "ar.cot_max_tokens=4",
         "log.progress=false", "log.tensorboard=false"]
LORA = "model.lora={rank: 4, alpha: 8}"


def small_cfg(preset="tiny-eg-grpo", *extra):
    return resolve_config(preset=preset, overrides=[*SMALL, *extra])


@pytest.mark.parametrize("preset, extra", [("tiny-eg-grpo", []), ("tiny-t2i-r1", [LORA])])
def test_run_folder_metrics_and_ratio_one(tmp_path, preset, extra):
    out = train(small_cfg(preset, "train.steps=2", "checkpoint.every=1", *extra), tmp_path / "run")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss", "kl", "time_s", "samples", "model_forwards", "entropy_text",
                "entropy_image", "cot_tokens", "first_ratio_dev"):
        assert math.isfinite(rows[0][key]), key
    assert rows[-1]["samples"] == 2 * 8
    # The stored sampling log-probs are the conditional ones the training forward recomputes: ratio 1.
    seen = [(r["first_ratio_dev"], r["kl"], r["ratio_mean"]) for r in rows]
    # (k3 KL is >= 0 in exact arithmetic; a GPU's rounding gave -1.1e-10 at the first step)
    assert all(dev < 1e-5 and kl >= -1e-8 and ratio == 1.0 for dev, kl, ratio in seen), seen
    assert rows[0]["kl"] < 1e-12  # the policy equals its reference before the first update
    # T2I-R1 shapes nothing; EG-GRPO's masks cover part of the tokens.
    shaped = rows[0]["high_frac_tokens"] + rows[0]["low_frac_tokens"]
    assert (shaped == 0) if preset == "tiny-t2i-r1" else (0 < shaped < 1)
    # Forwards per sample and step: CoT (prompt + up to 3 cached steps), image (64 cached steps) x CFG pair 2,
    # training text + image, reference text + image.
    cot = rows[0]["cot_tokens"]
    assert rows[0]["model_forwards"] == pytest.approx(8 * (cot + 64 * 2 + 2 + 2), abs=8 * 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]
    assert (out / "curves.png").stat().st_size > 0


def test_full_finetuning_trains_the_language_model_only(tmp_path):
    """Trainable: the language model and lm_head; vision, aligner, VQ and generation heads frozen; the reference
    is a frozen copy."""
    trainer = make_trainer(small_cfg("tiny-eg-grpo", "train.steps=1", "train.lr=1e-2"), tmp_path / "r")
    model = trainer.policy.model
    assert trainer.named and all(k.startswith(("model.language_model.", "lm_head.")) for k in trainer.named)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = {k: v.clone() for k, v in trainer.policy._ref.language_model.state_dict().items()}
    trainer.run()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.language_model.", "lm_head.")) for k in moved)
    assert any(k.startswith("lm_head.") for k in moved)
    assert all(torch.equal(ref[k], v) for k, v in trainer.policy._ref.language_model.state_dict().items())


def test_resume_is_bit_identical(tmp_path):
    straight = train(small_cfg("tiny-eg-grpo", "train.steps=4", "checkpoint.every=2"), tmp_path / "a")
    train(small_cfg("tiny-eg-grpo", "train.steps=2", "checkpoint.every=2"), tmp_path / "b")
    resumed = train(small_cfg("tiny-eg-grpo", "train.steps=4", "checkpoint.every=2"), tmp_path / "b", resume=True)
    for name in ("trainable", "ema"):
        wa = load_file(str(straight / f"checkpoints/step_4/{name}.safetensors"))
        wb = load_file(str(resumed / f"checkpoints/step_4/{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["reward_mean"] for r in ra] == [r["reward_mean"] for r in rb]


def test_inner_epochs_take_several_clipped_steps(tmp_path):
    """train.inner_epochs=3 x train.minibatches=2: six optimizer steps per round, PPO-clipped against the sampling
    log-probs; the first update's ratios are 1, later ones are not."""
    trainer = make_trainer(small_cfg("tiny-eg-grpo", "train.steps=2", "train.inner_epochs=3", "train.minibatches=2",
                                     "train.clip_range=0.2", "train.lr=3e-3"), tmp_path / "r")
    trainer.run()
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {12}
    row = read_metrics(tmp_path / "r/metrics.jsonl")[-1]
    cfg = trainer.cfg
    assert row["optimizer_steps"] == 6 and row["trained_rollouts"] == cfg.sample.prompts_per_step * cfg.sample.group_size
    assert row["first_ratio_dev"] < 1e-5 and 0 <= row["clip_frac"] <= 1
    assert row["ratio_dev_max"] > 1e-3 and row["approx_kl"] > 0  # later updates see the moved policy


def test_ar_inner_epochs_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="ar.inner_epochs is deprecated: use train.inner_epochs"):
        cfg = resolve_config(preset="tiny-eg-grpo", overrides=["ar.inner_epochs=3"])
    assert cfg.train.inner_epochs == 3 and cfg.ar.inner_epochs is None
    assert resolve_config(preset="tiny-eg-grpo", overrides=["ar.inner_epochs=1"]).train.inner_epochs == 1
    with pytest.raises(ValueError, match=r"ar.inner_epochs \(2\) and train.inner_epochs \(3\) disagree"):
        resolve_config(preset="tiny-eg-grpo", overrides=["ar.inner_epochs=2", "train.inner_epochs=3"])


def test_nan_loss_stops_before_the_update(tmp_path, monkeypatch):
    import fastgrpo.train.ar as ar

    real = ar.grpo_token_loss
    monkeypatch.setattr(ar, "grpo_token_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    trainer = make_trainer(small_cfg("tiny-eg-grpo", "train.steps=1"), tmp_path / "r")
    before = {k: v.detach().clone() for k, v in trainer.named.items()}
    with pytest.raises(TrainingDiverged, match="loss"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in trainer.named.items())


# ------------------------------------------------------------------------------------------ token terms


def _np_released(entropy, valid, adv, low_frac, high_frac, bonus, modality):
    """numpy float64: EG-GRPO's released rule per row (DESIGN.md §3.2), written independently of the ops, per
    modality as in minebetter/EG-GRPO @b0bdd65 src/eg-grpo/src/open_r1/eg_trainer/eg_grpo_trainer.py: text lines
    876-884 (tau_hi at n - max(1, floor(0.5 n)), tau_lo at max(1, floor(0.2 n))), image lines 888-891 (tau_hi at
    floor(0.5 n), tau_lo at floor(0.2 n)); 0.5 -> high_frac (text) / 1 - high_frac (image), 0.2 -> low_frac."""
    token_adv = np.zeros_like(entropy)
    for b in range(entropy.shape[0]):
        h = entropy[b][valid[b]]
        s, n = np.sort(h), h.size
        if modality == 0:
            tau_hi = s[n - max(1, int(np.floor(high_frac * n)))]
            tau_lo = s[min(n - 1, max(1, int(np.floor(low_frac * n))))]
        else:
            tau_hi = s[min(n - 1, int(np.floor((1 - high_frac) * n)))]
            tau_lo = s[min(n - 1, int(np.floor(low_frac * n)))]
        bonus_b = np.minimum(bonus * abs(adv[b]), bonus * h) * (h > tau_hi)
        token_adv[b, valid[b]] = (adv[b] + bonus_b) * (1 - (h < tau_lo))
    return token_adv


@pytest.mark.parametrize("shape_text, shape_image", [(True, True), (True, False), (False, True), (False, False)])
def test_token_terms_follow_the_ablation_flags(shape_text, shape_image):
    """Per modality: shaped -> EG-GRPO's released rule on that modality's tokens, unshaped -> the sequence
    advantage on every valid token; logp = log_softmax over the vocabulary (float64 references)."""
    strategy = EGGRPO(shape_text=shape_text, shape_image=shape_image)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    adv = torch.randn(3, generator=g)
    for modality, V, shaped in ((0, 50, shape_text), (1, 33, shape_image)):
        logits = torch.randn(3, 11, V, generator=g) * 2
        targets = torch.randint(0, V, (3, 11), generator=g)
        targets[1, 7:] = -100  # a CoT that ended early
        valid = targets != -100
        terms = strategy.token_terms(logits, targets, modality, adv)
        lp64 = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
        p64 = torch.softmax(logits.double(), -1)
        h64 = -(p64 * torch.log(p64)).sum(-1) / math.log(V) * valid
        torch.testing.assert_close(terms.logp.double(), lp64, rtol=0, atol=1e-5)
        torch.testing.assert_close(terms.entropy.double(), h64, rtol=0, atol=1e-5)
        if shaped:
            want = _np_released(terms.entropy.double().numpy(), valid.numpy(), adv.double().numpy(), 0.2, 0.5, 0.3,
                                modality)
        else:
            want = (adv.double()[:, None] * valid).numpy()
            assert not terms.low.any() and not terms.high.any()
        np.testing.assert_allclose(terms.token_adv.double().numpy(), want, rtol=1e-6, atol=1e-7)


def test_strategies_defaults_and_overrides():
    cfg = load_preset("tiny-eg-grpo")
    s = EGGRPO.from_config(config_from_dict(cfg))
    assert (s.beta, s.adv_std, s.adv_ddof, s.adv_eps, s.shape_text, s.shape_image) == (0.01, "group", 1, 1e-4, True,
                                                                                      True)
    t = T2IR1.from_config(config_from_dict(load_preset("tiny-t2i-r1")))
    assert (t.shape_text, t.shape_image, t.beta) == (False, False, 0.01)
    ablation = resolve_config(preset="tiny-eg-grpo", overrides=["ar.shape_text=false"])
    assert EGGRPO.from_config(ablation).shape_text is False and EGGRPO.from_config(ablation).shape_image is True


@pytest.mark.parametrize("overrides, match", [
    (["sample.guidance_scale=1.0"], "sample.guidance_scale must be > 1 for model.family janus"),
    (["model.family=sd3"], "model.family 'sd3' does not fit algo 'eg_grpo'"),
    (["ar.image_tokens=0"], "ar.image_tokens must be > 0"),
    (["ar.low_frac=1.5"], r"ar.low_frac must be in \(0, 1\)"),
    (["ar.rule=median"], "ar.rule must be one of"),
    (["ar.impl=cuda"], "ar.impl must be one of"),
    (["ar.cot_template=no field"], "ar.cot_template must contain {prompt}"),
    (["train.inner_epochs=2", "train.clip_range=1.5"], r"train.clip_range must be in \(0, 1\)"),
    (["train.minibatches=17"], r"train.minibatches \(17\) must be at most the rollouts of a round"),
    (["ar.shape_text=maybe"], "ar.shape_text must be true or false"),
])
def test_bad_config_raises_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(preset="tiny-eg-grpo", overrides=overrides)
    with pytest.raises(ValueError, match="model.family 'janus' does not fit algo 'flow_grpo'"):
        resolve_config(preset="tiny-flow-grpo", overrides=["model.family=janus"])


def test_trainer_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"ar.image_tokens=576 does not match the model's config"):
        make_trainer(small_cfg("tiny-eg-grpo", "ar.image_tokens=576"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"model.path '/no/such/janus' does not exist"):
        make_trainer(small_cfg("tiny-eg-grpo", "model.path=/no/such/janus"), tmp_path / "b")
    with pytest.raises(ValueError, match="model.lora.targets"):
        make_trainer(small_cfg("tiny-eg-grpo", "model.lora={rank: 4, alpha: 8, targets: [no_such_proj]}"),
                     tmp_path / "c")


def test_janus_pro_preset_carries_the_papers_hyperparameters():
    cfg = config_from_dict(load_preset("janus-pro-eg-grpo"))
    s = EGGRPO.from_config(cfg)
    assert (cfg.algo, cfg.model.family, cfg.train.lr, s.beta, cfg.train.steps, cfg.sample.group_size,
            cfg.sample.guidance_scale) == ("eg_grpo", "janus", 1e-6, 0.01, 1600, 8, 5.0)
    assert (s.low_frac, s.high_frac, s.bonus, cfg.ar.image_tokens, cfg.ar.temperature) == (0.2, 0.5, 0.3, 576, 1.0)
