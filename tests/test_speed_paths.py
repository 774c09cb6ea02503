"""The loop's speed switches (issue 19 Part A): ``model.compile``, ``sample.cuda_graphs``, ``model.impl``, and no host
sync per denoising step or per training chunk.

On the CPU, for every flow family with a tiny preset (`fastgrpo.testing.tiny_flow_families`: a new family is
covered without editing this file): config validation, the CUDA-graph switch's fallback (a warning, eager
sampling), every repeated block compiled in place (same parameter names, LoRA inside), and a compiled round against
an eager one (same rollouts, rewards and gradients; slow tier). On CUDA (the GPU session runs these): the number of device syncs
of a round does not grow with the number of denoising steps or training chunks, and graph replays give the eager
rollouts. The inductor-compiled round is checked against the eager one by ``bench/test_bench_round.py`` (its CPU
case runs in CI).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastgrpo.testing import cuda_syncs, tiny_family_config, tiny_flow_families
from fastgrpo.train.config import resolve_config
from fastgrpo.train.run import make_trainer

CUDA = torch.cuda.is_available()
TINY_FLOW = tiny_flow_families()
LORA = {"lora": {"rank": 4, "alpha": 8}}


def _cfg(*overrides, preset="tiny-flow-grpo"):
    return resolve_config(preset=preset, overrides=["log.progress=false", "log.tensorboard=false", "train.steps=2",
                                                     "sample.num_steps=4", "train.beta=0.01", *overrides])


def _sample_and_grads(trainer, step=0):
    """Rewards of step ``step``'s rollouts and the accumulated gradients of one train pass (no optimizer step)."""
    with ThreadPoolExecutor(1) as pool:
        batches = trainer.sample(step, pool)
    trainer.advantages(batches)
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.train(batches)
    rewards = torch.cat([mb.rewards.float().cpu() for mb in batches])
    latents = torch.cat([mb.data["tree"].transitions[-1]["x_next"].float().cpu() for mb in batches])
    grads = {k: p.grad.detach().float().cpu().clone() for k, p in trainer.named.items() if p.grad is not None}
    return rewards, latents, grads, stats


def _family_trainer(tmp_path, family, name, **sections):
    """Flow-GRPO on the family's tiny model (`tiny_family_config`), ``sections`` merged into the config."""
    return make_trainer(tiny_family_config(family, **sections), tmp_path / name, device="cpu")


def _blocks(adapter, net=None):
    """The repeated blocks of ``net`` (default: the policy's transformer), per the family's ``block_lists``."""
    net = adapter.transformer if net is None else net
    return [b for attr in adapter.block_lists for b in getattr(net, attr)]


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, key", [
    ("model.impl=cuda", "model.impl"),
    ("model.compile=maybe", "model.compile"),
    ("sample.cuda_graphs=1", "sample.cuda_graphs"),
])
def test_bad_speed_keys_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _cfg(override)


def test_cuda_graphs_refused_with_fsdp_and_janus():
    with pytest.raises(ValueError, match=r"sample\.cuda_graphs.*fsdp"):
        _cfg("sample.cuda_graphs=true", "distributed.strategy=fsdp", "model.lora=null")
    with pytest.raises(ValueError, match=r"sample\.cuda_graphs"):
        _cfg("sample.cuda_graphs=true", preset="tiny-eg-grpo")
    with pytest.raises(ValueError, match=r"model\.compile"):
        _cfg("model.compile=true", preset="tiny-eg-grpo")


@pytest.mark.parametrize("family", TINY_FLOW)
def test_cuda_graphs_on_cpu_warn_and_sample_eagerly(tmp_path, family):
    """Every family's config path takes sample.cuda_graphs off CUDA: one warning, no graphs, the eager rollouts."""
    with pytest.warns(RuntimeWarning, match="sample.cuda_graphs needs a CUDA device"):
        trainer = _family_trainer(tmp_path, family, "g", sample={"cuda_graphs": True})
    assert trainer.graphed is None
    plain = _family_trainer(tmp_path, family, "p")
    r1, x1, _, _ = _sample_and_grads(trainer)
    r0, x0, _, _ = _sample_and_grads(plain)
    assert torch.equal(x1, x0) and torch.equal(r1, r0)


# --------------------------------------------------------------------------------- compiled == eager (CPU)


@pytest.mark.parametrize("family", TINY_FLOW)
def test_compile_wraps_every_block_in_place(tmp_path, family):
    """model.compile=true compiles each block of every ``block_lists`` entry in place (nothing traced yet): the
    trainable parameter names stay the eager trainer's, the LoRA layers sit inside the compiled blocks, and full
    fine-tuning compiles the frozen reference copy's blocks too."""
    eager = _family_trainer(tmp_path, family, "e", model=LORA)
    compiled = _family_trainer(tmp_path, family, "c", model={**LORA, "compile": True})
    adapter = compiled.policy
    for attr in adapter.block_lists:
        assert len(getattr(adapter.transformer, attr)) > 0, f"{family}: no {attr}"
    blocks = _blocks(adapter)
    assert adapter.compiled_blocks == len(blocks) == len(_blocks(eager.policy))
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in _blocks(eager.policy))
    assert list(compiled.named) == list(eager.named)  # checkpoints and LoRA names unchanged
    assert all(any("lora_" in n and p.requires_grad for n, p in b.named_parameters()) for b in blocks)

    full = _family_trainer(tmp_path, family, "f", model={"lora": None, "compile": True}, train={"beta": 0.01})
    ref = full.policy.frozen_reference
    assert ref is not None and full.policy.compiled_blocks == 2 * len(blocks)
    assert all(b._compiled_call_impl is not None for b in _blocks(full.policy) + _blocks(full.policy, ref))


@pytest.mark.slow  # Dynamo traces each family's blocks (aot_eager): 5-15 s a family
@pytest.mark.parametrize("family", TINY_FLOW)
def test_compiled_blocks_give_the_eager_round(tmp_path, monkeypatch, family):
    """model.compile=true on every family: the same rollouts (final latents), rewards and LoRA gradients as the
    eager round, with classifier-free guidance (or the guidance embedding) and the KL's reference pass (adapters
    disabled); Dynamo traced every block class of ``block_lists`` whole (no graph break). The backend here is
    aot_eager (tracing + autograd, no code generation) to keep the suite fast; the inductor round is compared in
    bench/test_bench_round.py."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from fastgrpo.diffusion.adapter import FlowAdapter

    original = FlowAdapter.compile_blocks
    monkeypatch.setattr(FlowAdapter, "compile_blocks", lambda self, **kw: original(self, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    sections = dict(sample={"guidance_scale": 2.0}, train={"beta": 0.01})
    eager = _family_trainer(tmp_path, family, "e", model=LORA, **sections)
    compiled = _family_trainer(tmp_path, family, "c", model={**LORA, "compile": True}, **sections)
    for trainer in (eager, compiled):  # non-zero LoRA B (same in both), so every LoRA weight gets a gradient
        with torch.no_grad():
            for n, p in trainer.named.items():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    blocks = _blocks(compiled.policy)
    assert compiled.policy.compiled_blocks == len(blocks) > 0
    assert list(compiled.named) == list(eager.named)
    r0, x0, g0, s0 = _sample_and_grads(eager)
    r1, x1, g1, s1 = _sample_and_grads(compiled)
    for cls in {type(b) for b in blocks}:  # each block class ran compiled code (grad on and off: 2 graphs at least)
        assert len(_debug_get_cache_entry_list(cls.forward.__code__)) >= 2, cls.__name__
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(x1, x0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(r1, r0, rtol=1e-5, atol=1e-7)
    # A parameter whose output the model drops (Qwen-Image's last block's text stream) has no eager gradient and a
    # zero compiled one; one that only feeds dropped outputs (the text queries of SD3's last block) a zero one in both
    assert set(g0) <= set(g1) and all(g1[k].abs().max() == 0 for k in set(g1) - set(g0))
    zero = {k for k in g0 if g0[k].abs().max() == 0}
    assert all(g1[k].abs().max() == 0 for k in zero), sorted(zero)
    assert sum("lora_A" in k for k in set(g0) - zero) > len(g0) // 4 and sum("lora_B" in k for k in g0) > 0
    for k in set(g0) - zero:
        err = ((g1[k] - g0[k]).norm() / g0[k].norm()).item()
        assert err < 1e-4, (k, err)
    assert s1["trained_transitions"] == s0["trained_transitions"]
    assert s1["ratio_dev_max"] == pytest.approx(0.0, abs=1e-5)  # one whole-round update: the sampling policy
    torch._dynamo.reset()


def test_impl_torch_is_the_reference_path(tmp_path, monkeypatch):
    """model.impl=torch sends every sde_step of the round to the plain-PyTorch path, with the same results."""
    import fastgrpo.train.flow as flow

    impls = []
    real = flow.sde_step

    def spy(*a, **kw):
        impls.append(kw.get("impl"))
        return real(*a, **kw)

    monkeypatch.setattr(flow, "sde_step", spy)
    ref = make_trainer(_cfg("model.impl=torch"), tmp_path / "t", device="cpu")
    r0, x0, g0, _ = _sample_and_grads(ref)
    assert impls and set(impls) == {"torch"}
    impls.clear()
    fused = make_trainer(_cfg(), tmp_path / "a", device="cpu")
    r1, x1, g1, _ = _sample_and_grads(fused)
    assert set(impls) == {"auto"}
    assert torch.allclose(x1, x0, rtol=1e-4, atol=1e-5)
    for k in g0:
        assert ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item() < 1e-3, k


def test_nonfinite_loss_still_stops_before_the_step(tmp_path, monkeypatch):
    """The finiteness check moved to the end of the train phase: a NaN chunk still raises, naming its steps, and
    no weight changes."""
    from fastgrpo.train.loop import TrainingDiverged
    import fastgrpo.train.flow as flow

    trainer = make_trainer(_cfg(), tmp_path / "n", device="cpu")
    real = flow.sde_step

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        if kw.get("prev_sample") is not None:
            out = out._replace(log_prob=out.log_prob * float("nan"))
        return out

    monkeypatch.setattr(flow, "sde_step", poisoned)
    before = {k: p.detach().clone() for k, p in trainer.named.items()}
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at denoising steps \["):
        with ThreadPoolExecutor(1) as pool:
            trainer.round(0, pool)
    assert all(torch.equal(before[k], p) for k, p in trainer.named.items())


# --------------------------------------------------------------------------------------------- CUDA only


def _count_syncs(fn) -> int:
    return len(cuda_syncs(fn))


@pytest.mark.skipif(not CUDA, reason="counts CUDA device syncs: needs a CUDA device (runs in the GPU session)")
@pytest.mark.parametrize("graphs", [False, True])
def test_no_sync_per_denoising_step_or_training_chunk(tmp_path, graphs):
    """The syncs of a sampling phase do not grow with the number of denoising steps, those of a train phase not
    with the number of chunks."""
    def phase_syncs(steps, batch):
        trainer = make_trainer(_cfg(f"sample.num_steps={steps}", f"sample.batch_size={batch}",
                                    f"sample.cuda_graphs={str(graphs).lower()}"),
                               tmp_path / f"s{steps}-{batch}-{graphs}", device="cuda")
        with ThreadPoolExecutor(1) as pool:
            trainer.sample(0, pool)  # warm-up: kernels compiled, graphs captured
            out = {}
            out["sample"] = _count_syncs(lambda: out.setdefault("b", trainer.sample(0, pool)))
        trainer.advantages(out["b"])
        out["train"] = _count_syncs(lambda: trainer.train(out["b"]))
        return out["sample"], out["train"]

    s4, _ = phase_syncs(4, 8)  # 16 rollouts in 2 waves of 8, 4 steps
    s8, t8 = phase_syncs(8, 8)  # twice the steps; training chunks of 8
    _, t4 = phase_syncs(8, 4)  # the same transitions in chunks of 4: twice the chunks
    assert s8 == s4, f"sampling syncs grow with the number of steps: {s4} at 4 steps, {s8} at 8"
    assert t4 == t8, f"training syncs grow with the number of chunks: {t8} with chunks of 8, {t4} with 4"


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (runs in the GPU session)")
def test_cuda_graph_rollouts_equal_eager(tmp_path):
    eager = make_trainer(_cfg(), tmp_path / "e", device="cuda")
    graphed = make_trainer(_cfg("sample.cuda_graphs=true"), tmp_path / "g", device="cuda")
    r0, x0, g0, s0 = _sample_and_grads(eager)
    r1, x1, g1, s1 = _sample_and_grads(graphed)
    assert graphed.graphed.graphs and not graphed.graphed.failed, graphed.graphed.failed
    assert graphed.graphed.replays > 0
    assert ((x1 - x0).norm() / x0.norm()).item() < 1e-5
    assert torch.allclose(r1, r0, rtol=1e-5, atol=1e-6)
    for k in g0:
        assert ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item() < 1e-4, k
    assert graphed.policy.model_forwards == eager.policy.model_forwards
