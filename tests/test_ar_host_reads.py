"""The autoregressive train phase reads nothing on the host per micro-batch (issue 19): its statistics and every
micro-batch's loss finiteness stay on the device until one read at the end of the phase, as in the flow trainer.

On the CPU: `fastgrpo.testing.host_reads` itself; the phase's host reads do not grow with the number of
micro-batches; the statistics equal a float64 recomputation from the teacher-forced logits (old formulas: host
floats, boolean selections, weights ``len(rows) / n``); a non-finite loss in one micro-batch still stops the run,
naming it, before the optimizer step. On CUDA (the GPU session runs it): the device syncs of the phase do not grow
with the number of micro-batches.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastgrpo.diffusion.schedules import sd3_sigmas
from fastgrpo.testing import HOST_READS, cuda_syncs, host_reads
from fastgrpo.train import TrainingDiverged, make_trainer, resolve_config
from fastgrpo.train.loop import take_rows

CUDA = torch.cuda.is_available()
# 4 prompts x 2 rollouts; sample.batch_size (the training micro-batch too) picks the number of micro-batches
SMALL = ["sample.prompts_per_step=4", "sample.group_size=2", "ar.cot_max_tokens=4", "log.progress=false",
         "log.tensorboard=false", "train.steps=1"]
KEYS = ("loss", "policy_loss", "kl", "ratio_mean", "clip_frac", "approx_kl", "entropy_text", "entropy_image",
        "low_frac_tokens", "high_frac_tokens")


def _trainer(tmp_path, preset="tiny-eg-grpo", batch=4, *extra, device="cpu"):
    cfg = resolve_config(preset=preset, overrides=[*SMALL, f"sample.batch_size={batch}", *extra])
    return make_trainer(cfg, tmp_path / f"{preset}-{batch}", device=device)


def _rollouts(trainer, step=0):
    with ThreadPoolExecutor(1) as pool:
        batches = trainer.sample(step, pool)
    trainer.advantages(batches)
    return batches


# ------------------------------------------------------------------------------------------------ the helper


def test_host_reads_counts_package_reads_only():
    """A read in a fastgrpo module counts (file:line and method); the caller's own reads do not."""
    reads = host_reads(lambda: (sd3_sigmas(4), torch.ones(3).sum().item(), bool(torch.ones(()))))
    assert reads == ["fastgrpo/diffusion/schedules.py:37 item"] * 2, reads
    assert host_reads(lambda: torch.arange(5).tolist()) == []


def test_host_reads_restores_the_methods_when_fn_raises():
    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def boom():
        sd3_sigmas(2)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        host_reads(boom)
    assert {name: torch.Tensor.__dict__.get(name) for name in HOST_READS} == own
    t = torch.tensor([2.5])
    assert (t.item(), t.tolist(), bool(t), int(t), float(t), t.cpu().numpy().tolist()) == (2.5, [2.5], True, 2, 2.5,
                                                                                           [2.5])


# ------------------------------------------------------------------------------------- reads per micro-batch


@pytest.mark.parametrize("preset", ["tiny-eg-grpo", "tiny-t2i-r1"])
def test_ar_train_reads_do_not_grow_with_micro_batches(tmp_path, preset):
    """The same 8 rollouts in 2 and in 4 micro-batches: the train phase (reference log-probs included) reads the
    same number of values on the host, all of them in the phase's one final read and its CPU row bookkeeping; also
    for a minibatch taking some rows of each micro-batch, clipped (``train.minibatches`` > 1)."""
    counts = {}
    for batch in (4, 2):
        trainer = _trainer(tmp_path, preset, batch)
        batches = _rollouts(trainer)
        trainer.optimizer.zero_grad(set_to_none=True)
        whole = host_reads(lambda: trainer.train(batches))
        rows = trainer.train_rows(batches)
        rows.pop("group")
        idx = torch.arange(0, 8, 2)  # half of every micro-batch
        some = host_reads(lambda: trainer.train(batches, take_rows(rows, idx), n_all=4, first=False, several=True))
        assert all(r.startswith("fastgrpo/train/ar.py:") for r in whole + some), whole + some
        counts[batch] = (len(whole), len(some))
    assert counts[2] == counts[4], f"host reads grow with the micro-batches: {counts}"


def test_ar_sampling_reads_nothing_per_image_token(tmp_path):
    """Sampling reads on the host per CoT token (the early stop), per micro-batch (the CoTs' text, the rewards),
    never per image token: no read from transformers' mask construction, which read the padding mask per forward
    (64 per micro-batch here) until the policy handed SDPA its 4-D mask."""
    trainer = _trainer(tmp_path, "tiny-eg-grpo", 4)
    with ThreadPoolExecutor(1) as pool:
        reads = host_reads(lambda: trainer.sample(0, pool))
    assert not [r for r in reads if " via " in r], reads
    per_mb = len(reads) / 2  # measured 12: 4 CoT steps, 4 CoT texts, the rewards; a read per image token: >= 64
    assert per_mb < trainer.cfg.ar.image_tokens / 2, reads


# ---------------------------------------------------------------------------------------------- statistics


def _reference_stats(trainer, batches, per_mb, clip):
    """The logged statistics the old way, in float64 from the teacher-forced logits: each micro-batch's token
    means over its valid tokens (boolean selections, host floats), weighted by len(rows) / n; the token
    advantages and masks from the strategy."""
    policy, strat, T = trainer.policy, trainer.strategy, trainer.cfg.ar.temperature
    beta = strat.beta
    n = sum(len(r) for r in per_mb.values())
    out, dev = dict.fromkeys(KEYS, 0.0), 0.0
    with torch.no_grad():
        for b, rws in per_mb.items():
            mb, idx = batches[b], torch.tensor(rws)
            data = {k: v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == len(mb.prompts) else v
                    for k, v in mb.data.items()}
            adv = mb.advantages[idx]
            logits = policy.teacher_forced_logits(data)
            with policy.reference() as parts:
                ref_logits = policy.teacher_forced_logits(data, parts)
            cot = torch.where(data["cot_mask"], data["cot_ids"], torch.full_like(data["cot_ids"], -100))
            targets, valid = (cot, data["image_ids"]), (data["cot_mask"], torch.ones_like(data["image_ids"]).bool())
            lp, lp_ref, ent, terms = [], [], [], []
            for m, (lg, rlg, tg) in enumerate(zip(logits, ref_logits, targets)):
                ls = torch.log_softmax(lg.double() / T, -1)
                lp.append(ls.gather(-1, tg.clamp(min=0)[..., None])[..., 0])
                lp_ref.append(torch.log_softmax(rlg.double() / T, -1).gather(-1, tg.clamp(min=0)[..., None])[..., 0])
                ent.append(-(ls.exp() * ls).sum(-1) / math.log(lg.shape[-1]))
                terms.append(strat.token_terms(lg, tg, m, adv, temperature=T))
            mask = torch.cat(valid, 1)
            logp, ref = torch.cat(lp, 1)[mask], torch.cat(lp_ref, 1)[mask]
            old = torch.cat([data["cot_old_logp"], data["image_old_logp"]], 1).double()[mask]
            A = torch.cat([t.token_adv for t in terms], 1).double()[mask]
            ratio = torch.exp(logp - old) if clip else torch.ones_like(logp)
            if clip:
                surrogate = -torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
                clipped = ((ratio < 1 - clip) & (A < 0)) | ((ratio > 1 + clip) & (A > 0))
            else:
                surrogate, clipped = -A, torch.zeros_like(A, dtype=torch.bool)
            kl = (torch.exp(ref - logp) - (ref - logp) - 1).mean().item()
            policy_loss = surrogate.mean().item()
            log_ratio = logp - old
            row = {"loss": policy_loss + beta * kl, "policy_loss": policy_loss, "kl": kl,
                   "ratio_mean": ratio.mean().item(), "clip_frac": clipped.double().mean().item(),
                   "approx_kl": 0.5 * (log_ratio ** 2).mean().item()}
            for name, h, v in (("text", ent[0], valid[0]), ("image", ent[1], valid[1])):
                row[f"entropy_{name}"] = h[v].mean().item() if v.any() else 0.0
            shaped = [(t, v) for m, (t, v) in enumerate(zip(terms, valid)) if strat.shapes(m)]
            n_shaped = max(1, sum(int(v.sum()) for _, v in shaped))
            row["low_frac_tokens"] = sum(int(t.low.sum()) for t, _ in shaped) / n_shaped
            row["high_frac_tokens"] = sum(int(t.high.sum()) for t, _ in shaped) / n_shaped
            for k in KEYS:
                out[k] += row[k] * len(rws) / n
            dev = max(dev, (log_ratio.exp() - 1).abs().max().item())
    out["ratio_dev_max"] = dev
    return out


@pytest.mark.parametrize("preset, clip", [("tiny-eg-grpo", None), ("tiny-eg-grpo", 0.2), ("tiny-t2i-r1", 0.2)])
def test_ar_statistics_equal_a_float64_recomputation(tmp_path, preset, clip):
    """Micro-batches of 4 rollouts; the minibatch takes 3 rows of one and 2 of the other (unequal weights). The
    sampling log-probs are perturbed (as after an earlier update) so that ratios, clipping and approx_kl are not
    float noise; the reference policy is moved off the policy so that the KL is not 0; one CoT is cut short and
    one micro-batch has no CoT token (text statistics over valid tokens only, 0 without any)."""
    trainer = _trainer(tmp_path, preset, 4, f"train.clip_range={clip or 0.2}")
    batches = _rollouts(trainer)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for mb in batches:
        for key in ("cot_old_logp", "image_old_logp"):
            mb.data[key] = mb.data[key] + 0.15 * torch.randn(mb.data[key].shape, generator=g)
    batches[0].data["cot_mask"][2, 1:] = False  # a CoT that ended after one token
    batches[1].data["cot_mask"][:] = False  # no CoT token in the micro-batch: its text entropy counts as 0
    with torch.no_grad():
        for p in trainer.named.values():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    rows = trainer.train_rows(batches)
    rows.pop("group")
    idx = torch.tensor([0, 2, 3, 5, 6])  # micro-batch 0: rows 0, 2, 3; micro-batch 1: rows 1, 2
    trainer.optimizer.zero_grad(set_to_none=True)
    got = trainer.train(batches, take_rows(rows, idx), n_all=5, several=clip is not None)
    want = _reference_stats(trainer, batches, {0: [0, 2, 3], 1: [1, 2]}, clip)
    assert got["trained_rollouts"] == 5
    assert got["cot_tokens"] == sum(mb.data["cot_mask"].sum().item() for mb in batches) / 8
    for k in (*KEYS, "ratio_dev_max"):
        assert got[k] == pytest.approx(want[k], rel=2e-5, abs=1e-7), (k, got[k], want[k])
    assert want["kl"] > 1e-6 and want["approx_kl"] > 1e-3 and want["ratio_dev_max"] > 0.1
    if clip:
        assert 0 < want["clip_frac"] < 1
    shaped = want["low_frac_tokens"] + want["high_frac_tokens"]
    assert (shaped == 0) if preset == "tiny-t2i-r1" else (0 < shaped < 1)


# ---------------------------------------------------------------------------------------- non-finite loss


def test_nonfinite_micro_batch_loss_stops_before_the_step(tmp_path, monkeypatch):
    """A NaN loss in the second of two micro-batches: the phase still raises TrainingDiverged, naming that
    micro-batch and its prompts, and the optimizer never steps (every parameter of the model unchanged)."""
    trainer = _trainer(tmp_path, "tiny-eg-grpo", 4)
    strat, real, calls = trainer.strategy, trainer.strategy.token_terms, []

    def poisoned(logits, *a, **kw):
        terms = real(logits, *a, **kw)
        calls.append(1)
        if len(calls) == 3:  # micro-batch 1's text terms
            terms = terms._replace(logp=terms.logp * float("nan"))
        return terms

    monkeypatch.setattr(strat, "token_terms", poisoned)
    model = trainer.policy.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"the loss became nan in micro-batch 1 \(prompts \['") as err:
        with ThreadPoolExecutor(1) as pool:
            trainer.round(0, pool)
    assert len(calls) == 4  # both micro-batches ran: the check is at the end of the phase
    assert "weights not updated" in str(err.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.optimizer.state  # no step taken


@pytest.mark.parametrize("preset", ["tiny-eg-grpo", "tiny-t2i-r1"])
def test_bad_target_without_validation_stops_at_the_loss_check(tmp_path, monkeypatch, preset):
    """The trainer calls the token ops with validate=False (no host read): an out-of-range image token in
    micro-batch 1 gives NaN log-probs instead of a ValueError, and the loss check names that micro-batch before
    any optimizer step (torch path; the C++ path raises its ValueError either way)."""
    trainer = _trainer(tmp_path, preset, 4, "ar.impl=torch")
    batches = _rollouts(trainer)
    real = trainer._targets

    def targets(data):
        cot, image = real(data)
        if data is batches[1].data:
            image = image.clone()
            image[0, 3] = 10**6
        return cot, image

    monkeypatch.setattr(trainer, "_targets", targets)
    before = {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}
    trainer.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan in micro-batch 1 \(prompts"):
        trainer.train(batches)
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.model.state_dict().items())


# --------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="counts CUDA device syncs: needs a CUDA device (runs in the GPU session)")
@pytest.mark.parametrize("preset", ["tiny-eg-grpo", "tiny-t2i-r1"])
def test_no_sync_per_ar_training_micro_batch(tmp_path, preset):
    """The device syncs of the AR train phase (reference log-probs included) do not grow with the number of
    micro-batches: the same prompts in micro-batches of 4 and of 2."""
    syncs = {}
    for batch in (4, 2):
        trainer = _trainer(tmp_path, preset, batch, device="cuda")
        batches = _rollouts(trainer)
        trainer.train(batches)  # warm-up: kernels compiled
        trainer.optimizer.zero_grad(set_to_none=True)
        syncs[batch] = cuda_syncs(lambda: trainer.train(batches))
    assert len(syncs[2]) == len(syncs[4]), f"AR training syncs grow with the micro-batches: {syncs}"


@pytest.mark.skipif(not CUDA, reason="counts CUDA device syncs: needs a CUDA device (runs in the GPU session)")
def test_no_sync_per_ar_image_token(tmp_path):
    """AR sampling waits for the device per CoT token (the early stop) and per micro-batch, not per image token
    (64 per micro-batch here)."""
    trainer = _trainer(tmp_path, "tiny-eg-grpo", 4, device="cuda")
    with ThreadPoolExecutor(1) as pool:
        trainer.sample(0, pool)  # warm-up
        syncs = cuda_syncs(lambda: trainer.sample(0, pool))
    per_mb = len(syncs) / 2  # two micro-batches; a sync per image token alone would make 64 per micro-batch
    assert per_mb < trainer.cfg.ar.image_tokens, syncs


@pytest.mark.parametrize("q_length", [1, 3, 9])
def test_attention_mask_is_the_one_transformers_builds(q_length):
    """The Janus policy's 4-D SDPA mask (which spares transformers its host read of the padding) equals the mask
    transformers builds from the 2-D padding mask, for a whole sequence (q = K) and for cached steps (q < K), and
    the language model's outputs on the real tokens agree."""
    from transformers.masking_utils import sdpa_mask

    from fastgrpo.ar.janus import _attention_mask, _positions, load_janus

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    B, K = 5, 9
    lengths = torch.randint(1, K + 1, (B,), generator=g)
    lengths[0] = K  # one row without padding
    mask = (torch.arange(K)[None, :] >= K - lengths[:, None]).long()  # left padding
    lm = load_janus("tiny")[0].model.language_model
    got = _attention_mask(lm, mask, q_length)
    want = sdpa_mask(batch_size=B, q_length=q_length, kv_length=K, q_offset=K - q_length, kv_offset=0,
                     attention_mask=mask.bool(), allow_is_causal_skip=False)
    assert got.dtype == torch.bool and torch.equal(got, want.expand_as(got))
    if q_length == K:
        emb = torch.randn(B, K, lm.config.hidden_size, generator=g)
        with torch.no_grad():
            ours = lm(inputs_embeds=emb, attention_mask=got, position_ids=_positions(mask)).last_hidden_state
            theirs = lm(inputs_embeds=emb, attention_mask=mask, position_ids=_positions(mask)).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
