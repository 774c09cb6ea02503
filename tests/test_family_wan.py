"""The ``wan`` family (Wan2.1 text-to-video, `fastgrpo.diffusion.wan`) against diffusers' ``WanPipeline``.

* our ODE sampler (``sde_step(kind="ode")`` over the adapter's velocity and sigmas, CFG batched) reproduces
  ``WanPipeline.__call__`` with the Euler scheduler (``output_type="latent"``, same initial latents), and our sigmas
  are its scheduler's; decoded videos equal the pipeline's ``output_type="pt"`` frames;
* a hub-style pipeline folder with the UniPC scheduler loads with the Euler scheduler at its flow shift;
* ``model.num_frames`` and the sizes are checked (ValueError naming the key);
* rewards over frames (an image reward averages its per-frame scores; ``temporal_consistency`` against a float64
  loop), preview videos (frame strip PNG, GIF, MP4 when a writer exists);
* the AEGPO collector on the cross-attention ``blocks[i].attn2``: outputs equal the stock processors', Entropy(t)
  equals a float64 eager computation from explicit attention maps of the q, k diffusers' processor produces;
* 2-process DDP (slow) samples what one process samples.
LoRA / full fine-tuning steps and bit-identical resume run for every family in tests/test_families.py (-k wan).
"""
import contextlib
import math
import os
import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgrpo import sde_step
from fastgrpo.diffusion.wan import WanAdapter
from fastgrpo.testing import assert_close

F_FRAMES, SIZE, STEPS = 5, 32, 4


@pytest.fixture(scope="module")
def pipe():
    return WanAdapter.tiny_pipeline(seed=3, vae_gain=4.0)


def _adapter(pipe, guidance, **kw):
    return WanAdapter(pipe, height=SIZE, width=SIZE, guidance_scale=guidance, max_sequence_length=32,
                      num_frames=kw.pop("num_frames", F_FRAMES), **kw)


def ode_sample(model, prompts, x, num_steps):
    emb = model.encode_prompts(prompts)
    sigmas = model.sigmas(num_steps)
    for i in range(num_steps):
        v = model.velocity(x, sigmas[i:i + 1].expand(x.shape[0]), emb, cfg=True)
        x = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), kind="ode", impl="torch").prev_sample
    return x


# ----------------------------------------------------------------------------- parity with diffusers' pipeline
@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_ode_sampler_reproduces_the_pipeline(pipe, guidance):
    """Same initial latents: our CFG rollout ends where ``WanPipeline.__call__`` (Euler scheduler) ends; our schedule
    is its scheduler's; the decoded frames are its ``output_type="pt"`` frames."""
    model = _adapter(pipe, guidance)
    prompts = ["a red apple on a table", "  a cat &amp; a dog\n running  "]  # the second needs prompt_clean
    x = model.initial_latents(2, torch.Generator().manual_seed(11))
    assert x.shape == (2, 16, 2, 4, 4)  # (5 - 1) / 4 + 1 latent frames, 32 / 8 px
    ours = ode_sample(model, prompts, x.clone(), STEPS)
    kwargs = dict(prompt=prompts, negative_prompt=[""] * 2, num_inference_steps=STEPS, guidance_scale=guidance,
                  height=SIZE, width=SIZE, num_frames=F_FRAMES, latents=x.clone(), max_sequence_length=32)
    with torch.no_grad():
        theirs = pipe(output_type="latent", **kwargs).frames
        video = pipe(output_type="pt", **kwargs).frames
    torch.testing.assert_close(model.sigmas(STEPS), pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    assert (ours - x).abs().mean() > 0.1  # the rollout moved
    decoded = model.decode(ours)
    assert decoded.shape == (2, F_FRAMES, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, video.float(), rtol=0, atol=1e-4)
    exact = model.decode(theirs)  # the same latents: the pipeline's decoding arithmetic, bit for bit
    torch.testing.assert_close(exact, video.float(), rtol=0, atol=0)


def test_prompt_embeddings_are_the_pipelines(pipe):
    """UMT5 embeddings padded with zeros past the prompt's tokens (and its ``</s>``) to max_sequence_length."""
    model = _adapter(pipe, 4.5)
    emb = model.encode_prompt("a  lighthouse")
    assert emb["embeds"].shape == (32, 32) and emb["neg_embeds"].shape == (32, 32)
    n = len("a lighthouse") + 1  # characters after whitespace cleaning, plus </s>
    assert emb["embeds"][:n].abs().sum(-1).gt(0).all() and emb["embeds"][n:].eq(0).all()
    assert emb["neg_embeds"][1:].eq(0).all() and emb["neg_embeds"][0].abs().sum() > 0  # "" -> </s> only
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(["a lighthouse"], negative_prompt=[""], max_sequence_length=32)
    assert torch.equal(emb["embeds"], pe[0]) and torch.equal(emb["neg_embeds"], npe[0])


def test_hub_folder_with_unipc_loads_with_the_euler_scheduler(tmp_path):
    """The hub's Wan pipelines ship UniPCMultistepScheduler (flow_shift 3 at 480p, 5 at 720p): loading swaps in
    FlowMatchEulerDiscreteScheduler at that shift, so ``pipe()`` and the trainer take the same Euler steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from fastgrpo.diffusion.schedules import sd3_sigmas

    src = WanAdapter.tiny_pipeline(seed=0)
    src.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    src.save_pretrained(tmp_path / "pipe")
    pipe = WanAdapter.load_pipeline(str(tmp_path / "pipe"), torch.float32)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 5.0
    model = _adapter(pipe, 1.0)
    assert model.flow_shift == 5.0 and torch.equal(model.sigmas(7), sd3_sigmas(7, shift=5.0))
    pipe.scheduler.set_timesteps(7)
    assert torch.equal(model.sigmas(7), pipe.scheduler.sigmas.float())
    bf16 = WanAdapter.load_pipeline(str(tmp_path / "pipe"), torch.bfloat16)
    assert bf16.transformer.dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32  # the VAE stays float32
    # the folder holds the in-code weights and tokenizer: the same embeddings
    assert torch.equal(model.encode_prompt("a cat")["embeds"], _adapter(src, 1.0).encode_prompt("a cat")["embeds"])


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, match", [
    (["model.num_frames=6"], "model.num_frames must be 1 \\+ a multiple of 4"),
    (["model.num_frames=0"], "model.num_frames must be > 0"),
    (["model.height=40"], "model.height must be a multiple of 16"),
    (["model.width=24"], "model.width must be a multiple of 16"),
])
def test_bad_wan_config_names_the_key(overrides, match):
    from fastgrpo.train import resolve_config

    with pytest.raises(ValueError, match=match):
        resolve_config(preset="tiny-wan-flow-grpo", overrides=overrides)


def test_num_frames_defaults_to_wans_and_image_families_refuse_it(pipe):
    from fastgrpo.train import resolve_config

    cfg = resolve_config(preset="tiny-wan-flow-grpo", overrides=["model.num_frames=null"])
    assert WanAdapter.options_from_config(cfg) == {"num_frames": 81}
    with pytest.raises(ValueError, match="model.num_frames is for the video families"):
        resolve_config(preset="tiny-flow-grpo", overrides=["model.num_frames=7"])
    with pytest.raises(ValueError, match="model.num_frames must be 1 \\+ a multiple of 4 for this VAE"):
        _adapter(pipe, 1.0, num_frames=8)
    assert _adapter(pipe, 1.0, num_frames=9).latent_shape(3) == (3, 16, 3, 4, 4)


# ------------------------------------------------------------------------------------------------ rewards
def _videos(B=3, F=4, seed=0):
    return torch.rand(B, F, 3, 8, 6, generator=torch.Generator().manual_seed(seed))


def test_image_rewards_average_their_frame_scores():
    from fastgrpo.rewards import build_reward

    videos, prompts = _videos(), ["a", "b", "c"]
    seen = []

    def recording(images, ps):
        seen.append((tuple(images.shape), list(ps)))
        return images.double().mean(dim=(1, 2, 3)) * 2  # a per-image score

    from fastgrpo.rewards import WeightedReward

    total, parts = WeightedReward([("rec", 0.5, recording)])(videos, prompts)
    assert seen == [((12, 3, 8, 6), ["a"] * 4 + ["b"] * 4 + ["c"] * 4)]  # each frame with its video's prompt
    want = torch.tensor([[2 * videos[b, f].double().mean().item() for f in range(4)] for b in range(3)],
                        dtype=torch.float64).mean(1)
    assert_close(parts["rec"], want)
    assert_close(total, 0.5 * want)
    # the built-in ones, against per-frame loops
    reward = build_reward([{"name": "brightness"}, {"name": "colorfulness", "weight": 2.0}])
    total, parts = reward(videos, prompts)
    from fastgrpo.rewards import brightness, colorfulness

    for name, fn in (("brightness", brightness), ("colorfulness", colorfulness)):
        loop = torch.stack([torch.stack([fn(videos[b, f:f + 1].double())[0] for f in range(4)]).double().mean()
                            for b in range(3)])
        assert_close(parts[name], loop)
    torch.testing.assert_close(total, parts["brightness"] + 2 * parts["colorfulness"])


def test_temporal_consistency_against_a_float64_loop():
    from fastgrpo.rewards import build_reward, temporal_consistency

    videos = _videos(B=4, F=5, seed=1)
    want = torch.tensor([1 - sum((videos[b, f + 1].double() - videos[b, f].double()).abs().mean().item()
                                 for f in range(4)) / 4 for b in range(4)], dtype=torch.float64)
    assert_close(temporal_consistency(videos), want)
    still = videos[:, :1].expand(-1, 5, -1, -1, -1)
    assert torch.equal(temporal_consistency(still), torch.ones(4))  # a still video: 1
    flicker = torch.zeros(2, 6, 3, 4, 4)
    flicker[:, 1::2] = 1.0
    assert torch.equal(temporal_consistency(flicker), torch.zeros(2))  # every pixel flips every frame: 0
    assert torch.equal(temporal_consistency(videos[:, :1]), torch.ones(4))  # one frame: no change
    total, parts = build_reward([{"name": "temporal_consistency"}])(videos, list("abcd"))
    assert_close(total, want)  # given the whole videos, not frame by frame
    with pytest.raises(ValueError, match="reward 'temporal_consistency' scores videos"):
        build_reward([{"name": "temporal_consistency"}])(videos[:, 0], list("abcd"))
    with pytest.raises(ValueError, match=r"videos must be a tensor \[B, F, 3, H, W\]"):
        temporal_consistency(videos[:, 0])


# ------------------------------------------------------------------------------------------------ previews
def test_preview_videos_are_written_as_strips_and_gifs(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from fastgrpo.train import samples

    monkeypatch.setattr(samples, "_warned_mp4", False)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # no MP4 writer on this machine (or pretend so)
    videos = _videos(B=2, F=11, seed=2)
    with pytest.warns(RuntimeWarning, match="no MP4 writer"):
        samples.save_row(tmp_path, 3, videos, ["p0", "p1"])
    d = tmp_path / "samples"
    strip = np.asarray(Image.open(d / "step_000003.png"))
    idx = samples.strip_frames(11)
    assert idx == [0, 1, 3, 4, 6, 7, 9, 10] and samples.strip_frames(5) == [0, 1, 2, 3, 4]
    assert strip.shape == (8, 2 * len(idx) * 6, 3)
    u8 = (videos.clamp(0, 1) * 255).round().to(torch.uint8)
    for j in range(2):
        for n, f in enumerate(idx):
            cell = strip[:, (j * len(idx) + n) * 6:(j * len(idx) + n + 1) * 6]
            assert np.array_equal(cell, u8[j, f].permute(1, 2, 0).numpy())
    for j in range(2):
        gif = Image.open(d / f"step_000003_{j}.gif")
        assert gif.n_frames == 11 and gif.size == (6, 8) and gif.info["duration"] == samples.gif_frame_ms() == 60
    assert not list(d.glob("*.mp4"))
    assert samples.draw_samples(tmp_path) == tmp_path / "samples.png"  # the grid takes strip cells
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        samples.save_row(tmp_path, 4, videos, ["p0", "p1"])  # warned once per process


def test_mp4_written_when_a_writer_is_importable(tmp_path, monkeypatch):
    from fastgrpo.train import samples

    calls = []
    fake = types.ModuleType("imageio.v2")
    fake.mimsave = lambda path, frames, **kw: calls.append((path, len(frames), frames[0].shape, kw)) or \
        open(path, "wb").close()
    pkg = types.ModuleType("imageio")
    pkg.v2 = fake
    monkeypatch.setitem(sys.modules, "imageio", pkg)
    monkeypatch.setitem(sys.modules, "imageio.v2", fake)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", types.ModuleType("imageio_ffmpeg"))
    samples.save_row(tmp_path, 0, _videos(B=2, F=5), ["a", "b"])
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.mp4")) == ["step_000000_0.mp4", "step_000000_1.mp4"]
    assert [c[1:3] for c in calls] == [(5, (8, 6, 3))] * 2 and calls[0][3]["fps"] == samples.FPS


# ------------------------------------------------------------------------------------------------ AEGPO collector
@contextlib.contextmanager
def capture_cross_qk(model, layers):
    """The q, k that diffusers' stock WanAttnProcessor passes to its attention function in ``blocks[i].attn2``."""
    import diffusers.models.transformers.transformer_wan as wan_mod

    captured, current, hooks = {}, [], []
    for i in layers:
        attn = model.blocks[i].attn2
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        hooks.append(attn.register_forward_hook(lambda m, a, o: current.clear()))
    real = wan_mod.dispatch_attention_fn

    def recording(q, k, v, *a, **kw):
        if current:
            captured[current[-1]] = (q.detach().clone(), k.detach().clone())
        return real(q, k, v, *a, **kw)

    mp_ = pytest.MonkeyPatch()
    mp_.setattr(wan_mod, "dispatch_attention_fn", recording)
    try:
        yield captured
    finally:
        mp_.undo()
        for h in hooks:
            h.remove()


def eager_cross_entropy_bits(captured, mode):
    """AEGPO eq. 1-4 in float64 from materialised cross-attention maps [B, H, N, T] (every key a text key)."""
    maps = []
    for q, k in captured.values():
        qh, kh = q.double().transpose(1, 2), k.double().transpose(1, 2)  # [B, H, L, D]
        maps.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1))
    A = torch.stack(maps)  # [layers, B, H, N, T]
    if mode == "mixture":
        prob = A.mean(dim=(0, 2))
        prob = prob / prob.sum(-1, keepdim=True)
        return -(torch.special.xlogy(prob, prob) / math.log(2)).sum(-1).mean(-1)
    return -(torch.special.xlogy(A, A) / math.log(2)).sum(-1).mean(dim=(0, 2, 3))


def _wan_inputs(seed=0, B=2, T=7):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 16, 3, 6, 4, generator=g), timestep=torch.tensor([500.0, 830.0]),
                encoder_hidden_states=torch.randn(B, T, 32, generator=g))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cross_attention_plan_against_float64(layout):
    """`TextEntropyPlan(cross=True)`: q with N queries, k and v with their own T keys (odd sizes), a text range
    inside the keys: out, lse, the text entropy and the head-summed text probabilities against float64 maps."""
    from fastgrpo.ops.attention import TextEntropyPlan

    g = torch.Generator().manual_seed(7)
    B, H, N, T, D = 2, 3, 11, 7, 5
    q, k, v = (torch.randn(B, H, L, D, generator=g) * 2 for L in (N, T, T))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    plan = TextEntropyPlan(q, k, v, layout=layout, text_start=2, text_len=4, query_start=1, query_len=9, cross=True)
    assert plan.backend == "torch"
    out, lse, ent = plan.attention(q, k, v, None)
    probs = plan.new_probs()
    plan.probs(q, k, lse, probs, accumulate=True)
    bh = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    qd, kd, vd = (bh(t).double() for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D)  # [B, H, N, T]
    P = torch.softmax(s, -1)
    assert_close(bh(out), P @ vd, name="out")
    assert_close(lse, torch.logsumexp(s, -1), name="lse")
    pt = torch.softmax(s[..., 2:6], -1)
    assert_close(ent, -(pt * pt.log()).sum(-1), name="text entropy")
    assert_close(probs, P[:, :, 1:10, 2:6].sum(1), name="head-summed text probabilities")


@pytest.mark.parametrize("change, match", [
    (dict(impl="triton"), "cross-attention runs the torch path"),
    (dict(k=torch.zeros(2, 4, 7, 5)), "k and v must be \\[B, H, T, D\\] with q's B=2, H=3, D=5"),
    (dict(v=torch.zeros(2, 3, 6, 5)), "k and v must be"),
    (dict(k=torch.zeros(2, 3, 7, 5, dtype=torch.float64)), "k must have the dtype of q"),
    (dict(text_len=8), "text_len must be in \\[1, 7\\]"),
    (dict(text_start=7), "text_start must be in \\[0, 6\\]"),
    (dict(query_len=12), "query_len must be in \\[0, 11\\]"),
])
def test_cross_attention_plan_rejects_bad_inputs(change, match):
    from fastgrpo.ops.attention import TextEntropyPlan

    args = dict(q=torch.zeros(2, 3, 11, 5), k=torch.zeros(2, 3, 7, 5), v=torch.zeros(2, 3, 7, 5), layout="bhsd",
                text_start=0, text_len=7, query_start=0, query_len=11, impl="auto", cross=True)
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        TextEntropyPlan(q, k, v, **args)
    with pytest.raises(ValueError, match="must have the shape of q"):  # the joint plan still refuses other lengths
        TextEntropyPlan(torch.zeros(2, 3, 11, 5), torch.zeros(2, 3, 7, 5), torch.zeros(2, 3, 7, 5), layout="bhsd",
                        text_start=0, text_len=7, query_start=0, query_len=11)


@pytest.mark.parametrize("mode", ["mixture", "head_mean"])
def test_collector_on_cross_attention_matches_eager_and_keeps_outputs(mode):
    from fastgrpo.diffusion import AttentionEntropyCollector
    from fastgrpo.diffusion.tiny import tiny_wan_transformer

    model = tiny_wan_transformer(seed=1)
    inputs, layers = _wan_inputs(), (0, 2)
    before = dict(model.attn_processors)
    with torch.no_grad(), capture_cross_qk(model, layers) as captured:
        plain = model(**inputs).sample
    assert sorted(captured) == [0, 2] and captured[0][0].shape[1] == 3 * 3 * 2 and captured[0][1].shape[1] == 7
    want = eager_cross_entropy_bits(captured, mode)
    with torch.no_grad(), AttentionEntropyCollector(model, layers=layers, mode=mode) as collector:
        during = dict(model.attn_processors)
        out = model(**inputs).sample
        got = collector.pop()
    assert got.shape == (2,) and got.dtype == torch.float32
    assert_close(got, want, name=f"Entropy(t) wan/{mode}")
    assert 0 < float(got.min()) and float(got.max()) <= math.log2(7) + 1e-6
    assert torch.equal(out, plain)  # same SDPA on the same q, k, v: the stock output, bit for bit on the CPU
    assert {n for n in before if during[n] is not before[n]} == {f"blocks.{i}.attn2.processor" for i in layers}
    after = dict(model.attn_processors)
    assert all(after[n] is before[n] for n in before)


def test_collector_cross_attention_training_pass_and_lora():
    """With grad: the block output from SDPA, gradients as without the collector; a peft LoRA adapter is
    honoured (the projections run it); impl="triton" is refused for cross-attention."""
    from peft import LoraConfig

    from fastgrpo.diffusion import AttentionEntropyCollector
    from fastgrpo.diffusion.tiny import tiny_wan_transformer

    model = tiny_wan_transformer(seed=2)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(
        WanAdapter.lora_targets)))
    inputs = _wan_inputs(seed=3)
    x = inputs["hidden_states"].requires_grad_(True)
    plain = model(**inputs).sample
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    with AttentionEntropyCollector(model, layers=(1,)) as collector:
        out = model(**inputs).sample
        (g,) = torch.autograd.grad(out.square().sum(), x)
        entropy = collector.pop()
    assert_close(out, plain.double(), name="output with LoRA through the collector")
    assert_close(g, g_plain.double(), name="input gradient through the collector")
    assert torch.isfinite(entropy).all() and entropy.shape == (2,)
    with torch.no_grad(), AttentionEntropyCollector(model, layers=(1,), impl="triton") as collector:
        with pytest.raises(ValueError, match="cross-attention runs the torch path"):
            model(**_wan_inputs())


def test_adapter_collector_rows_with_cfg(pipe):
    """Through the adapter with CFG: one forward of [uncond, cond] per velocity, the conditional rows are the last
    half, and the velocity is unchanged by the collector."""
    from fastgrpo.diffusion import AttentionEntropyCollector

    model = _adapter(pipe, 4.5)
    emb = model.encode_prompts(["a", "b c"])
    x = model.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.velocity(x, torch.tensor([0.9, 0.3]), emb)
        with AttentionEntropyCollector(model.transformer, layers=(0, 1, 2)) as collector:
            v = model.velocity(x, torch.tensor([0.9, 0.3]), emb)
            rows = collector.pop()
    assert torch.equal(v, plain) and rows.shape == (4,)
    assert torch.equal(model.conditional_rows(rows), rows[2:])


# ------------------------------------------------------------------------------------------------ 2-process DDP
DDP = ["sample.num_steps=3", "sample.group_size=4", "sample.batch_size=4", "sample.prompts_per_step=2",
       "train.steps=2", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
       "distributed.strategy=ddp", "train.minibatches=2"]


def _record(out_dir):
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo.train import make_trainer, resolve_config

    trainer = make_trainer(resolve_config(preset="tiny-wan-flow-grpo", overrides=DDP), out_dir)
    log = {"rewards": [], "initial": {k: p.detach().clone() for k, p in trainer.named.items()}}
    advantages = trainer.advantages

    def recording(batches):
        rewards = advantages(batches)
        log["rewards"].append(rewards.detach().clone())
        return rewards

    trainer.advantages = recording
    with ThreadPoolExecutor(1) as pool:
        for step in range(2):
            trainer.round(step, pool)
    log["weights"] = {k: p.detach().clone() for k, p in trainer.named.items()}
    return log


def _ddp_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_record(os.path.join(out_dir, f"run-{rank}")), os.path.join(out_dir, f"wan_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_processes_train_as_one(tmp_path):
    """2 gloo processes: the first round's rewards (gathered) are one process's, bit for bit; the weights after two
    rounds agree to float32 rounding of the gradient average."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _record(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    two = [torch.load(tmp_path / f"wan_{r}.pt") for r in range(2)]
    assert torch.equal(two[0]["rewards"][0], one["rewards"][0]) and torch.equal(two[1]["rewards"][0],
                                                                                  one["rewards"][0])
    flat = {n: torch.cat([w[k].double().flatten() for k in sorted(w)])
            for n, w in (("one", one["weights"]), ("two", two[0]["weights"]), ("init", one["initial"]))}
    update, diff = (flat["one"] - flat["init"]).norm(), (flat["two"] - flat["one"]).norm()
    assert update > 0 and diff <= 1e-4 * update, (diff.item(), update.item())
    assert all(torch.equal(two[0]["weights"][k], two[1]["weights"][k]) for k in two[0]["weights"])
