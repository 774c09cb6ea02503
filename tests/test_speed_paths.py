"""The loop's speed switches (issue 19 Part A): ``model.compile``, ``sample.cuda_graphs``, ``model.impl``, and no host
sync per denoising step or per training chunk.

On the CPU: config validation, the CUDA-graph switch's fallback, and a compiled round against an eager one (same
rollouts, same gradients, same parameter names). On CUDA (the GPU session runs these): the number of device syncs
of a round does not grow with the number of denoising steps or training chunks, and graph replays give the eager
rollouts. The inductor-compiled round is checked against the eager one by ``bench/test_bench_round.py`` (its CPU
case runs in CI).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastgrpo.testing import cuda_syncs
from fastgrpo.train.config import resolve_config
from fastgrpo.train.run import make_trainer

CUDA = torch.cuda.is_available()


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
    grads = {k: p.grad.detach().float().cpu().clone() for k, p in trainer.named.items()}
    return rewards, latents, grads, stats


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


def test_cuda_graphs_on_cpu_warn_and_sample_eagerly(tmp_path):
    with pytest.warns(RuntimeWarning, match="sample.cuda_graphs needs a CUDA device"):
        trainer = make_trainer(_cfg("sample.cuda_graphs=true"), tmp_path / "g", device="cpu")
    assert trainer.graphed is None
    plain = make_trainer(_cfg(), tmp_path / "p", device="cpu")
    r1, x1, _, _ = _sample_and_grads(trainer)
    r0, x0, _, _ = _sample_and_grads(plain)
    assert torch.equal(x1, x0) and torch.equal(r1, r0)


# --------------------------------------------------------------------------------- compiled == eager (CPU)


@pytest.mark.slow  # inductor compiles the tiny blocks on the CPU: ~25 s
def test_compiled_blocks_give_the_eager_round(tmp_path, monkeypatch):
    """model.compile=true: every block compiled in place (same parameter names), the same rollouts and gradients.
    Dynamo traces each block; the backend here is aot_eager (tracing + autograd, no code generation) to keep the
    suite fast; the inductor round is compared in bench/test_bench_round.py."""
    from fastgrpo.diffusion.adapter import FlowAdapter

    original = FlowAdapter.compile_blocks
    monkeypatch.setattr(FlowAdapter, "compile_blocks", lambda self, **kw: original(self, backend="aot_eager"))
    torch._dynamo.reset()
    lora = ["model.lora={rank: 4, alpha: 8}"]
    eager = make_trainer(_cfg(*lora), tmp_path / "e", device="cpu")
    compiled = make_trainer(_cfg(*lora, "model.compile=true"), tmp_path / "c", device="cpu")
    blocks = compiled.policy.transformer.transformer_blocks
    assert compiled.policy.compiled_blocks == len(blocks) > 0
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert list(compiled.named) == list(eager.named)  # checkpoints and LoRA names unchanged
    r0, x0, g0, s0 = _sample_and_grads(eager)
    r1, x1, g1, s1 = _sample_and_grads(compiled)
    assert torch.allclose(x1, x0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(r1, r0, rtol=1e-5, atol=1e-7)
    for k in g0:
        err = ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item()
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
