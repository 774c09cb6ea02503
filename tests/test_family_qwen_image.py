"""The qwen_image family (Qwen-Image, ``QwenImagePipeline``) against diffusers' own pipeline on the tiny model: the
ODE sampler with and without true CFG, the schedule, the decode, the AEGPO collector (against an eager float64
reference from explicit attention maps), LoRA and full fine-tuning, FSDP units, resume, two processes, bad input."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgrpo import sde_step
from fastgrpo.diffusion import AttentionEntropyCollector
from fastgrpo.diffusion.qwen_image import (PROMPT_TEMPLATE_PREFIX, QwenImageAdapter, pack_latents,
                                           tiny_qwen_image_pipeline, unpack_latents)
from fastgrpo.testing import assert_close, rel_err

PROMPTS = ["a red cube on a wooden table", "two cats", "a lighthouse at dusk, oil painting"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_image_pipeline(seed=0, vae_gain=4.0)


def _same(actual, expected, name, tol=1e-5):
    """Two float32 computations of one thing (ours, diffusers'): normwise relative error within float32 rounding
    (`fastgrpo.testing.FP32_RTOL`)."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def _adapter(pipe, **kw):
    args = dict(height=32, width=32, guidance_scale=1.0, max_sequence_length=40)
    return QwenImageAdapter(pipe, **{**args, **kw})


def test_tiny_tokenizer_drops_exactly_the_template_prefix(pipe):
    """The pipeline drops its template's first 34 tokens (``prompt_template_encode_start_idx``): with the tiny
    tokenizer they are the template's prefix, so the encoding starts at the prompt, as with Qwen's tokenizer."""
    tok = pipe.tokenizer
    assert len(tok(PROMPT_TEMPLATE_PREFIX).input_ids) == pipe.prompt_template_encode_start_idx == 34
    full = tok(pipe.prompt_template_encode.format("two cats")).input_ids
    assert tok.decode(full[34:]).startswith("two cats<|im_end|>")
    a = _adapter(pipe)
    emb = a.encode_prompt("two cats")
    n = len(full) - 34
    assert emb["mask"].tolist() == [True] * n + [False] * (40 - n)
    assert emb["embeds"][n:].abs().max() == 0 and emb["embeds"][:n].abs().min() > 0
    # the pipeline's own encoding of one prompt (no mask: every token valid), here unpadded
    pe, pm = pipe.encode_prompt(["two cats"], max_sequence_length=40)
    assert pm is None and torch.equal(emb["embeds"][:n], pe[0])
    # a prompt longer than max_sequence_length is cut there, as in the pipeline
    long = _adapter(pipe, max_sequence_length=12).encode_prompt(PROMPTS[2] * 3)
    assert long["mask"].all() and torch.equal(long["embeds"], pipe.encode_prompt([PROMPTS[2] * 3],
                                                                               max_sequence_length=12)[0][0])


def test_packing_round_trips():
    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 16)
    assert torch.equal(unpack_latents(packed, 6, 10)[:, :, 0], x)
    # the first token holds the top-left 2x2 patch, channel-major (the pipeline's _pack_latents)
    assert torch.equal(packed[0, 0], x[0, :, :2, :2].reshape(4, 4).reshape(-1))


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_ode_sampler_reproduces_the_pipeline(pipe, g):
    """Our velocity (prompts encoded one by one, padded to max_sequence_length with a mask; CFG as one batch with
    the norm rescale) through `sde_step(kind="ode")` over our sigmas == ``QwenImagePipeline.__call__`` with the same
    initial latents (prompts of different lengths: the pipeline pads them to the longest), non-square 48x32."""
    H, W, N, T = 48, 32, 5, 40
    a = _adapter(pipe, height=H, width=W, guidance_scale=g, max_sequence_length=T)
    x0 = torch.randn(a.latent_shape(3), generator=torch.Generator().manual_seed(1))
    cfg = dict(negative_prompt=[" "] * 3, true_cfg_scale=g) if g > 1 else dict(true_cfg_scale=1.0)
    ref = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=N, latents=x0.clone(), output_type="latent",
               max_sequence_length=T, **cfg).images
    sig = a.sigmas(N)
    assert torch.equal(sig, pipe.scheduler.sigmas.float())  # the schedule the pipeline just ran
    emb = a.encode_prompts(PROMPTS)
    x = x0
    with torch.no_grad():
        for i in range(N):
            v = a.velocity(x, sig[i].expand(3), emb)
            x = sde_step(x, v, sig[i].item(), sig[i + 1].item(), kind="ode").prev_sample
    assert rel_err(ref, x0) > 0.1  # the sampler moved the latents: the comparison can fail
    _same(x, ref, "latents")
    assert a.model_forwards == N * 3 * (2 if g > 1 else 1)


def test_cfg_combination_is_the_pipelines_with_norm_rescale(pipe):
    """`predict`'s CFG batch against two separate forwards combined by hand in float64 (the pipeline's formula)."""
    a = _adapter(pipe, guidance_scale=3.0)
    emb = a.encode_prompts(PROMPTS[:2])
    x = torch.randn(a.latent_shape(2), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v = a.velocity(x, sigma, emb)
        kw = dict(hidden_states=x, timestep=sigma, img_shapes=[[a.img_shapes]] * 2)
        vc = a.transformer(encoder_hidden_states=emb["embeds"], encoder_hidden_states_mask=emb["mask"], **kw).sample
        vu = a.transformer(encoder_hidden_states=emb["neg_embeds"], encoder_hidden_states_mask=emb["neg_mask"],
                           **kw).sample
    vc, vu = vc.double(), vu.double()
    comb = vu + 3.0 * (vc - vu)
    ref = comb * vc.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    assert_close(v, ref)
    assert rel_err(ref, comb) > 1e-2  # the rescale matters here
    assert torch.equal(a.conditional_rows(torch.arange(4)), torch.arange(2))


def _reference_sigmas(config, num_steps, seq_len):
    """Written out from the pipeline and FlowMatchEulerDiscreteScheduler: mu = calculate_shift(seq_len), the
    exponential time shift of linspace(1, 1/N, N), then the stretch that ends the schedule at shift_terminal."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = seq_len * m + config.base_shift - m * config.base_image_seq_len
    t = np.linspace(1.0, 1.0 / num_steps, num_steps)
    s = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if config.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    return torch.tensor(np.append(s, 0.0))


@pytest.mark.parametrize("N, H, W", [(2, 32, 32), (7, 48, 32), (10, 64, 96)])
def test_schedule_is_the_pipelines(pipe, N, H, W):
    a = _adapter(pipe, height=H, width=W)
    got = a.sigmas(N)
    assert got.dtype == torch.float32 and got.shape == (N + 1,) and got[-1] == 0
    assert_close(got, _reference_sigmas(pipe.scheduler.config, N, (H // 4) * (W // 4)), name="sigmas")
    assert got[-2].item() == pytest.approx(0.02)  # Qwen-Image's shift_terminal


def test_schedule_at_qwen_image_size():
    """The real model's scheduler config at 512 px (1024 packed tokens) and 10 steps (Flow-GRPO's training)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastgrpo.diffusion.qwen_image import qwen_mu

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=qwen_mu(1024, sched.config))
    assert_close(sched.sigmas.float(), _reference_sigmas(sched.config, 10, 1024))


def test_decode_is_the_pipelines(pipe):
    """Our decode of the final latents == the pipeline's images (``output_type="pt"``) from the same latents."""
    a = _adapter(pipe, height=48, width=32)
    x0 = torch.randn(a.latent_shape(2), generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=PROMPTS[:2], height=48, width=32, num_inference_steps=2, true_cfg_scale=1.0,
              max_sequence_length=40)
    latents = pipe(latents=x0.clone(), output_type="latent", **kw).images
    images = pipe(latents=x0.clone(), output_type="pt", **kw).images
    ours = a.decode(latents)
    assert ours.shape == (2, 3, 48, 32) and ours.dtype == torch.float32
    _same(ours, images, "images")
    assert ours.std() > 0.2  # tiny_vae_gain 4: the images are not flat gray


# ------------------------------------------------------------------------------------------------- AEGPO collector


def _stock_attention_inputs(transformer, monkeypatch):
    """Records (query, key, attn_mask) of every call of the stock processor's attention, in block order."""
    import diffusers.models.transformers.transformer_qwenimage as tq

    calls = []
    original = tq.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **kw):
        calls.append((query.detach(), key.detach(), attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(tq, "dispatch_attention_fn", recording)
    return calls


def _reference_entropy(calls, layers, n_text, mode):
    """Eager float64 AEGPO Entropy(t) (bits, per sample) from the explicit attention maps of the stock processor."""
    maps = []
    for i in layers:
        q, k, mask = (t.double() if t is not None and t.is_floating_point() else t for t in calls[i])
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        maps.append(torch.softmax(s, dim=-1)[:, :, n_text:, :n_text])  # image queries x text keys [B, H, N, T]
    a = torch.stack(maps)  # [layers, B, H, N, T]
    if mode == "mixture":
        p = a.mean(dim=(0, 2))
        p = p / p.sum(-1, keepdim=True)
        return (-torch.special.xlogy(p, p).sum(-1)).mean(-1) / math.log(2)
    p = a / a.sum(-1, keepdim=True)
    return (-torch.special.xlogy(p, p).sum(-1)).mean(dim=(0, 2, 3)) / math.log(2)


@pytest.mark.parametrize("mode", ["mixture", "head_mean"])
@pytest.mark.parametrize("mask", ["padded", "none", "all_valid"])
def test_collector_matches_stock_outputs_and_float64_entropy(pipe, monkeypatch, mode, mask):
    """Collector on blocks 0 and 2 of the tiny transformer: the output equals the stock processors' (padded text:
    the masked path; no mask / an all-valid mask: the kernel path) and Entropy(t) equals the eager float64 entropy
    of the stock processors' explicit attention maps. Odd sizes: 3 samples, 7 text tokens, a 3x5 patch grid."""
    net = pipe.transformer
    g = torch.Generator().manual_seed(4)
    B, T, shape = 3, 7, (1, 3, 5)
    inputs = dict(hidden_states=torch.randn(B, 15, 16, generator=g),
                  encoder_hidden_states=torch.randn(B, T, 32, generator=g), timestep=torch.tensor([0.9, 0.5, 0.1]),
                  img_shapes=[shape] * B)
    if mask == "padded":
        inputs["encoder_hidden_states_mask"] = torch.arange(T)[None] < torch.tensor([[7], [4], [2]])
    elif mask == "all_valid":
        inputs["encoder_hidden_states_mask"] = torch.ones(B, T, dtype=torch.long)
    layers = (0, 2)
    with torch.no_grad():
        stock = net(**inputs).sample
        with AttentionEntropyCollector(net, layers=layers, mode=mode) as col:
            ours = net(**inputs).sample
            entropy = col.pop()
    _same(ours, stock, "transformer output")
    calls = _stock_attention_inputs(net.double(), monkeypatch)
    try:
        with torch.no_grad():
            net(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()})
    finally:
        net.float()
    ref = _reference_entropy(calls, layers, T, mode)
    assert entropy.dtype == torch.float32 and entropy.shape == (B,)
    assert_close(entropy, ref, name="entropy")
    if mask == "padded":  # the padded keys are excluded: counting them changes the entropy
        unmasked = [(q, k, None) for q, k, _ in calls]
        assert rel_err(_reference_entropy(unmasked, layers, T, mode), ref) > 1e-3


def test_collector_grad_pass_with_mask_keeps_outputs_and_gradients(pipe):
    """A training forward (grad on) inside the collector: same output and input gradient as the stock processors,
    and the statistics are still recorded."""
    net = pipe.transformer
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 15, 16, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(2, 5, 32, generator=g), timestep=torch.tensor([0.7, 0.2]),
              encoder_hidden_states_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(),
              img_shapes=[(1, 3, 5)] * 2)
    grads = []
    for use in (False, True):
        xi = x.clone().requires_grad_(True)
        if use:
            with AttentionEntropyCollector(net, layers=(1,)) as col:
                out = net(hidden_states=xi, **kw).sample
                assert col.pop().shape == (2,)
        else:
            out = net(hidden_states=xi, **kw).sample
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad))
    _same(grads[1][0], grads[0][0], "output")
    _same(grads[1][1], grads[0][1], "input gradient")


def test_collector_refuses_other_processors(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    net = tiny_qwen_image_pipeline(seed=1).transformer
    net.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\[1\]\.attn uses AttnProcessor2_0"):
        AttentionEntropyCollector(net, layers=(0, 1))
    with pytest.raises(ValueError, match="layers \\[3\\] do not exist"):
        AttentionEntropyCollector(pipe.transformer, layers=(3,))


# ------------------------------------------------------------------------------------------------- training

SMALL = ["sample.num_steps=3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=4",
         "log.progress=false", "log.tensorboard=false"]
PRESET = "tiny-qwen-image-flow-grpo"


def _cfg(*extra):
    from fastgrpo.train import resolve_config

    return resolve_config(preset=PRESET, overrides=[*SMALL, *extra])


def test_lora_defaults_to_the_adapters_targets_and_trains(tmp_path):
    from fastgrpo.train import make_trainer

    trainer = make_trainer(_cfg("train.steps=1", "model.lora={rank: 4, alpha: 8}", "train.beta=0.01",
                                "sample.guidance_scale=2.0"), tmp_path / "run")
    names = [n for n in trainer.named]
    assert all("lora_" in n for n in names)
    for target in QwenImageAdapter.lora_targets:
        assert sum(f".{target}.lora_A" in n for n in names) == 3, target  # one per block
    before = {k: p.detach().clone() for k, p in trainer.named.items()}
    trainer.run()
    from fastgrpo.train.metrics import read_metrics

    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["first_ratio_dev"] < 1e-6 and row["kl"] >= 0
    # sampling 8 x 3 steps, training 8 x 2 steps with the policy and the reference, each a CFG pair
    assert row["model_forwards"] == 2 * 8 * 3 + 2 * 2 * 8 * 2  # + the reference (adapters off) for the KL
    assert any(not torch.equal(before[k], p) for k, p in trainer.named.items())


def test_full_finetuning_with_reference_and_fsdp_units(tmp_path):
    from fastgrpo.train import make_trainer
    from fastgrpo.train.metrics import read_metrics

    trainer = make_trainer(_cfg("train.steps=1", "train.beta=0.01"), tmp_path / "run")
    model = trainer.policy
    assert model.fsdp_block_classes() == {"QwenImageTransformerBlock"}
    assert {type(b).__name__ for b in model.transformer.transformer_blocks} == model.fsdp_block_classes()
    assert model.frozen_reference is not None
    n = sum(p.numel() for p in model.transformer.parameters())
    assert sum(p.numel() for p in trainer.params) == n
    trainer.run()
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["first_ratio_dev"] < 1e-6 and row["kl"] >= 0 and row["grad_norm"] > 0


def test_save_pretrained_and_load_from_folder(tmp_path, pipe):
    """The tiny pipeline saved with save_pretrained loads back through model.path=<folder> with equal weights and
    the same prompt encoding."""
    from diffusers import QwenImagePipeline

    pipe.save_pretrained(tmp_path / "qwen")
    loaded = QwenImageAdapter.load_pipeline(str(tmp_path / "qwen"), torch.float32)
    assert isinstance(loaded, QwenImagePipeline)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    e1 = _adapter(pipe).encode_prompt(PROMPTS[2])
    e2 = _adapter(loaded).encode_prompt(PROMPTS[2])
    assert torch.equal(e1["mask"], e2["mask"]) and torch.equal(e1["embeds"], e2["embeds"])
    with pytest.raises(ValueError, match="model.path"):
        QwenImageAdapter.load_pipeline(str(tmp_path / "missing"), torch.float32)
    from fastgrpo.train import make_trainer  # the same folder through the config

    trainer = make_trainer(_cfg(f"model.path={tmp_path / 'qwen'}", "train.steps=1"), tmp_path / "run")
    got = trainer.policy.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in pipe.transformer.state_dict().items())


@pytest.mark.parametrize("kw, match", [
    (dict(height=30), "model.height must be a multiple of 4"),
    (dict(width=34), "model.width must be a multiple of 4"),
    (dict(max_sequence_length=1025), "model.max_sequence_length must be <= 1024"),
])
def test_bad_input(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        _adapter(pipe, **kw)


def test_height_must_be_a_multiple_of_16_with_qwen_images_vae(pipe):
    """With Qwen-Image's 8x VAE (three downsampling stages) the 2x2 packing needs multiples of 16."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    pipe8 = QwenImagePipeline(scheduler=pipe.scheduler, vae=vae, text_encoder=pipe.text_encoder,
                              tokenizer=pipe.tokenizer, transformer=pipe.transformer)
    assert _adapter(pipe8, height=64, width=48).latent_shape(1) == (1, 4 * 3, 16)
    with pytest.raises(ValueError, match="model.height must be a multiple of 16"):
        _adapter(pipe8, height=40, width=48)


def test_guidance_distilled_transformer_is_refused(pipe):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from fastgrpo.diffusion.qwen_image import TINY_QWEN_TRANSFORMER

    net = QwenImageTransformer2DModel(**TINY_QWEN_TRANSFORMER, guidance_embeds=True)
    other = QwenImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                              tokenizer=pipe.tokenizer, transformer=net)
    with pytest.raises(ValueError, match="guidance-distilled"):
        _adapter(other)


def test_bad_input_through_the_config(tmp_path):
    from fastgrpo.train import make_trainer

    with pytest.raises(ValueError, match="model.height"):
        make_trainer(_cfg("model.height=30"), tmp_path / "run")


AEGPO_SMALL = ["algo_args={r_high: 4, r_low: 2, warmup_steps: 0, top_k: 2, layers: [0, 2]}", "sample.group_size=3",
               "sample.batch_size=4", "sample.num_steps=4", "train.steps=2", "sample.guidance_scale=2.0"]


@pytest.mark.parametrize("preset, extra", [
    pytest.param("tiny-dance-grpo", [], marks=pytest.mark.slow),
    pytest.param("tiny-tempflow-grpo", [], marks=pytest.mark.slow),
    pytest.param("tiny-pro-grpo", [], marks=pytest.mark.slow),
    pytest.param("tiny-branch-grpo", [], marks=pytest.mark.slow),
    ("tiny-aegpo", AEGPO_SMALL),  # the collector on padded prompts inside the loop, with a CFG batch
])
def test_every_flow_variant_trains_qwen_image(tmp_path, preset, extra):
    """Each variant's tiny preset on the tiny Qwen-Image pipeline (model.family=qwen_image): a finite step that
    moves the weights."""
    from fastgrpo.train import resolve_config, train
    from fastgrpo.train.metrics import read_metrics

    overrides = ["model.family=qwen_image", "sample.guidance_scale=1.0", "train.steps=1", "log.progress=false",
                 "log.tensorboard=false", *extra]

    out = train(resolve_config(preset=preset, overrides=overrides), tmp_path / "run")
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and all(math.isfinite(r["loss"]) and r["model_forwards"] > 0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)


@pytest.mark.slow  # dynamo traces the blocks (aot_eager: no code generation), ~15 s
def test_compiled_blocks_give_the_eager_velocity_and_gradients():
    """model.compile: each QwenImageTransformerBlock compiled in place (complex RoPE, masked SDPA, CFG batch): the
    velocity and the LoRA gradients of the eager blocks."""
    torch._dynamo.reset()
    a = _adapter(tiny_qwen_image_pipeline(seed=2), guidance_scale=3.0, max_sequence_length=24)
    a.add_lora(4, 8, a.lora_targets)
    with torch.no_grad():  # non-zero LoRA B, so every LoRA weight gets a gradient
        for n, p in a.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    emb = a.encode_prompts(PROMPTS[:2])
    x, sigma = torch.randn(a.latent_shape(2), generator=torch.Generator().manual_seed(6)), torch.tensor([0.8, 0.3])

    def run():
        a.transformer.zero_grad()
        v = a.velocity(x, sigma, emb)
        v.square().sum().backward()
        return v.detach(), {n: p.grad.clone() for n, p in a.transformer.named_parameters() if p.grad is not None}

    v0, g0 = run()
    assert a.compile_blocks(backend="aot_eager") == 3
    v1, g1 = run()
    _same(v1, v0, "velocity")
    # eager: no gradient at all for the last block's text output (unused); compiled: a zero one
    assert set(g0) <= set(g1) and len(g0) == 3 * 8 * 2 - 2
    assert all(g1[k].abs().max() == 0 for k in set(g1) - set(g0))
    for k in g0:
        _same(g1[k], g0[k], k, tol=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from fastgrpo.train import train
    from fastgrpo.train.metrics import read_metrics

    lora = "model.lora={rank: 4, alpha: 8}"
    straight = train(_cfg("train.steps=4", "checkpoint.every=2", lora), tmp_path / "a")
    train(_cfg("train.steps=2", "checkpoint.every=2", lora), tmp_path / "b")
    resumed = train(_cfg("train.steps=4", "checkpoint.every=2", lora), tmp_path / "b", resume=True)
    wa = load_file(str(straight / "checkpoints/step_4/trainable.safetensors"))
    wb = load_file(str(resumed / "checkpoints/step_4/trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["reward_mean"] for r in read_metrics(straight / "metrics.jsonl")] == \
        [r["reward_mean"] for r in read_metrics(resumed / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------------- two processes

TWO = ["train.steps=2", "checkpoint.every=2"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir, *extra):
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo.train import make_trainer

    trainer = make_trainer(_cfg(*TWO, *extra), out_dir)
    rewards, rounds = [], trainer.advantages

    def recording(batches):
        r = rounds(batches)
        rewards.append(r.detach().cpu().clone())
        return r

    trainer.advantages = recording
    initial = {k: p.detach().cpu().clone() for k, p in trainer.named.items()}
    with ThreadPoolExecutor(1) as pool:
        for step in range(2):
            trainer.round(step, pool)
    from fastgrpo.train.sharding import is_fsdp_unit

    units = [is_fsdp_unit(b) for b in trainer.policy.transformer.transformer_blocks]
    weights = {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
               for k, p in trainer.named.items()}
    return {"rewards": rewards, "initial": initial, "weights": weights, "units": units}


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        logs = {s: _run(os.path.join(out_dir, f"{s}-{rank}"), f"distributed.strategy={s}") for s in ("ddp", "fsdp")}
        torch.save(logs, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # several processes
def test_two_processes_match_one(tmp_path):
    """2 gloo processes (DDP, and FSDP with every QwenImageTransformerBlock a unit) sample the rollouts one
    process samples (first step's rewards bit-identical) and take the same steps to float32 rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _run(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for strategy in ("ddp", "fsdp"):
        two = [r[strategy] for r in ranks]
        assert torch.equal(two[0]["rewards"][0], one["rewards"][0]), strategy
        if strategy == "fsdp":
            assert all(all(t["units"]) for t in two)
        flat = lambda w: torch.cat([w[k].double().flatten() for k in sorted(w)])  # noqa: E731
        update = (flat(one["weights"]) - flat(one["initial"])).norm()
        for t in two:
            assert update > 0 and (flat(t["weights"]) - flat(one["weights"])).norm() <= 1e-3 * update, strategy


def test_paper_preset_carries_flow_grpos_qwen_image_settings():
    """configs/qwen-image-flow-grpo-pickscore.yaml: Flow-GRPO's pickscore_qwenimage_8gpu (config/grpo.py) and its
    Qwen-Image LoRA (r 64, alpha 128, attention and MLPs of both streams)."""
    from fastgrpo.train import resolve_config

    cfg = resolve_config(preset="qwen-image-flow-grpo-pickscore")
    assert (cfg.model.family, cfg.model.path, cfg.model.height, cfg.model.width) == \
        ("qwen_image", "Qwen/Qwen-Image", 512, 512)
    assert (cfg.sample.num_steps, cfg.sample.guidance_scale, cfg.sample.noise_level) == (10, 4.0, 1.2)
    assert (cfg.sample.prompts_per_step, cfg.sample.group_size, cfg.sample.batch_size) == (32, 16, 4)
    assert (cfg.train.lr, cfg.train.beta, cfg.train.clip_range, cfg.train.adv_clip) == (3e-4, 0.0, 1e-4, 5.0)
    assert (cfg.train.adv_std, cfg.train.ema_decay, cfg.train.minibatches) == ("global", None, 2)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (64, 128)
    assert set(QwenImageAdapter.lora_targets) < set(cfg.model.lora.targets)
    assert {"img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"} < set(cfg.model.lora.targets)


def test_old_diffusers_without_the_text_mask_is_refused(pipe, monkeypatch):
    """diffusers < 0.37 ran the joint attention without the text mask: padded prompts would differ from the
    pipeline's, so the adapter refuses them, naming the version."""
    from diffusers.models.transformers import transformer_qwenimage

    monkeypatch.delattr(transformer_qwenimage, "compute_text_seq_len_from_mask")
    with pytest.raises(ValueError, match=r"qwen_image needs diffusers >= 0\.37"):
        _adapter(pipe)
