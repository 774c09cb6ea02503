"""The ``flux_kontext`` family (FLUX.1-Kontext image editing) on its tiny pipeline: our ODE sampler reproduces
diffusers' ``FluxKontextPipeline.__call__`` with the same source image and initial latents, the schedule is the
pipeline's, editing prompts load (JSONL, captioned folder, built-in) and bad ones are refused naming
``prompts.source``, the file and the line, the ``source_similarity`` reward, training (LoRA, full, resume, 2
processes) and the AEGPO collector with source tokens."""
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastgrpo import sde_step
from fastgrpo.diffusion.flux_kontext import FluxKontextAdapter, tiny_flux_kontext_pipeline
from fastgrpo.testing import rel_err
from fastgrpo.train import make_trainer, resolve_config, train
from fastgrpo.train.metrics import read_metrics
from fastgrpo.train.prompts import EditPrompt, builtin_edits, load_prompts

PRESET = "tiny-flux-kontext-flow-grpo"
SMALL = ["sample.num_steps=3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=4",
         "log.progress=false", "log.tensorboard=false"]


def _random_image(path: Path, size, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _adapter(height, width, guidance=2.5, seed=0):
    pipe = tiny_flux_kontext_pipeline(seed)
    return pipe, FluxKontextAdapter(pipe, height=height, width=width, guidance_scale=guidance, max_sequence_length=32)


# ------------------------------------------------------------------------------------- pipeline parity
@pytest.mark.parametrize("steps", [5, 2])
def test_ode_matches_the_kontext_pipeline(tmp_path, steps):
    """Our ODE (``sde_step(kind="ode")`` over the adapter's velocity and sigmas) == ``FluxKontextPipeline(image=...,
    output_type="latent", latents=...)`` for a batch of two edits, non-square odd-token size (24 x 40 px -> 6 x 10
    packed tokens), guidance embedding 2.5; the sources are 50 x 30 and 24 x 40 px files: ours resizes them to the
    generated size (Lanczos), so the pipeline gets them at that size (with ``_auto_resize=False``, ``max_area=H*W``
    it keeps both sizes as given). The schedule equals ``pipe.scheduler.sigmas`` after the call."""
    H, W = 24, 40
    pipe, model = _adapter(H, W)
    prompts = [EditPrompt("make it red", str(_random_image(tmp_path / "a.png", (50, 30), 1))),
               EditPrompt("add a hat!", str(_random_image(tmp_path / "b.png", (W, H), 2)))]
    x = model.initial_latents(2, torch.Generator().manual_seed(3))
    assert x.shape == (2, (H // 4) * (W // 4), 16)
    emb = model.encode_prompts(prompts)
    sigmas = model.sigmas(steps)
    ours = x.clone()
    for i in range(steps):
        v = model.velocity(ours, sigmas[i].expand(2), emb)
        ours = sde_step(ours, v, sigmas[i].item(), sigmas[i + 1].item(), kind="ode").prev_sample

    sources = [p.load().resize((W, H), resample=Image.LANCZOS) for p in prompts]
    ref = pipe(image=sources, prompt=[str(p) for p in prompts], height=H, width=W, max_area=H * W,
               _auto_resize=False, num_inference_steps=steps, guidance_scale=2.5, latents=x.clone(),
               output_type="latent", max_sequence_length=32).images
    assert ref.shape == ours.shape
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)
    assert torch.equal(pipe.scheduler.sigmas.float(), sigmas)
    # The source matters: another source image changes the edit.
    other = model.encode_prompts([EditPrompt("make it red", str(_random_image(tmp_path / "c.png", (W, H), 4)))])
    v0 = model.velocity(x[:1], sigmas[:1], {k: t[:1] for k, t in emb.items()})
    assert (model.velocity(x[:1], sigmas[:1], other) - v0).abs().max() > 1e-4


def test_source_latents_and_position_ids(tmp_path):
    """The cached source tokens are the pipeline's ``prepare_latents`` image latents (VAE mode, shift and scale,
    2x2 packing), and the ids are the generated grid (index 0) then the source grid (index 1)."""
    H, W = 16, 28
    pipe, model = _adapter(H, W)
    p = EditPrompt("x", str(_random_image(tmp_path / "s.png", (W, H), 5)))
    emb = model.encode_prompts([p])
    image = pipe.image_processor.preprocess(p.load(), H, W)
    _, want, latent_ids, image_ids = pipe.prepare_latents(image, 1, 4, H, W, torch.float32, "cpu", None)
    assert torch.equal(emb["source"], want)
    _, ids = model.position_ids(torch.float32, 32)
    assert torch.equal(ids, torch.cat([latent_ids, image_ids]))
    assert ids[:28, 0].eq(0).all() and ids[28:, 0].eq(1).all()
    # cached per (text, image): the same text over another image is another entry
    q = EditPrompt("x", str(_random_image(tmp_path / "t.png", (W, H), 6)))
    both = model.encode_prompts([p, q, p])
    assert len(model._cache) == 2 and torch.equal(both["source"][0], both["source"][2])
    assert not torch.equal(both["source"][0], both["source"][1])
    with pytest.raises(ValueError, match="no source image"):
        model.encode_prompts(["a plain text prompt"])


@pytest.mark.parametrize("H, W, steps", [(32, 32, 4), (1024, 1024, 28), (512, 768, 6)])
def test_schedule_uses_the_generated_sequence_length(H, W, steps):
    """Kontext shifts its sigmas by the generated tokens only (``image_seq_len = latents.shape[1]``), not the source
    tokens appended to them: the scheduler's own ``set_timesteps`` with that mu (the pipeline's
    ``calculate_shift``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    L = (H // 16) * (W // 16)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(L))
    from fastgrpo.diffusion.schedules import flux_sigmas

    assert torch.equal(flux_sigmas(steps, L), sched.sigmas.float())
    pipe = tiny_flux_kontext_pipeline()
    if H == 32:  # the adapter (tiny VAE: 2x) at 32 px has 64 generated tokens
        model = FluxKontextAdapter(pipe, height=H, width=W, guidance_scale=2.5, max_sequence_length=32)
        assert torch.equal(model.sigmas(steps), flux_sigmas(steps, 64))


# ------------------------------------------------------------------------------------------- prompts
def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_folder_and_builtin_edit_prompts(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    a = _random_image(tmp_path / "img/a.png", (8, 8), 0)
    b = _random_image(tmp_path / "b.jpg", (9, 7), 1)
    monkeypatch.setenv("HOME", str(tmp_path))
    f = _jsonl(tmp_path / "edits.jsonl", [{"prompt": " make it blue ", "image": "img/a.png", "tag": 3}, "",
                                          {"prompt": "add snow", "image": str(b)},
                                          {"prompt": "again", "image": "~/img/a.png"}])
    got = load_prompts(str(f), edit=True)
    assert got == [EditPrompt("make it blue", str(a.resolve())), EditPrompt("add snow", str(b.resolve())),
                   EditPrompt("again", str(a.resolve()))]
    assert [str(p) for p in got] == ["make it blue", "add snow", "again"]
    # a JSONL of text-only rows is a text prompt list for a text-to-image family
    t = _jsonl(tmp_path / "text.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "meta": 1}])
    from fastgrpo.rewards.geneval import MetaPrompt

    texts = load_prompts(str(t))
    assert texts == ["a cat", "a dog"] and all(type(p) is MetaPrompt for p in texts)
    # every row is kept as .meta (the geneval reward reads GenEval clauses there, e.g. Flow-GRPO's counting edits)
    assert got[0].meta == {"prompt": " make it blue ", "image": "img/a.png", "tag": 3}
    assert pickle.loads(pickle.dumps(got[0])).meta == got[0].meta
    assert load_prompts(str(f)) == got  # without a family: what the source holds

    folder = tmp_path / "folder"
    folder.mkdir()
    _random_image(folder / "2.png", (8, 8), 2)
    (folder / "2.txt").write_text("second\n")
    _random_image(folder / "1.webp", (8, 8), 3)
    (folder / "1.txt").write_text("  first edit  ")
    (folder / "notes.md").write_text("ignored")
    got = load_prompts(str(folder), edit=True)
    assert [(str(p), Path(p.image).name) for p in got] == [("first edit", "1.webp"), ("second", "2.png")]

    assert load_prompts(str(folder)) == got
    one, two = builtin_edits(), builtin_edits()
    assert one == two and len(one) == 4
    assert load_prompts("builtin_edit", edit=True) == one == load_prompts("builtin_edit")
    held = load_prompts("heldout", edit=True)  # evaluation: other instructions over other images
    assert len(held) == 4 and not set(held) & set(one) and not {p.image for p in held} & {p.image for p in one}
    assert len({p.source_pixels(16, 16).mean().item() for p in held}) == 4
    assert all(torch.equal(p.source_pixels(32, 32), q.source_pixels(32, 32)) for p, q in zip(one, two))
    assert len({p.source_pixels(16, 16).mean().item() for p in one}) == 4  # four different images


def test_bad_edit_prompt_sources_name_the_key_file_and_line(tmp_path):
    img = _random_image(tmp_path / "ok.png", (8, 8), 0)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    cases = [
        ([{"prompt": "a", "image": "ok.png"}, {"prompt": "b", "image": "missing.png"}], "2: image 'missing.png'.*"
         "does not exist"),
        ([{"prompt": "a", "image": "garbage.png"}], "1: image 'garbage.png'.*cannot be read"),
        ([{"prompt": "a", "image": "ok.png"}, "", {"image": "ok.png"}], "3: each line must be a JSON object with a "
         "non-empty \"prompt\""),
        ([{"prompt": "", "image": "ok.png"}], "1: each line must be a JSON object with a non-empty \"prompt\""),
        (["{not json"], "1: not valid JSON"),
        (['["a", "b"]'], "1: each line must be a JSON object"),
        ([{"prompt": "a", "image": "ok.png"}, {"prompt": "b"}], "2: a prompt without a source image"),
        ([{"prompt": "a", "image": "ok.png", "include": [{"class": "cat", "count": 0}]}], "1: include\\[0\\]: count"),
    ]
    for n, (rows, match) in enumerate(cases):
        f = _jsonl(tmp_path / f"bad{n}.jsonl", rows)
        with pytest.raises(ValueError, match=f"^prompts.source: .*bad{n}.jsonl:{match}"):
            load_prompts(str(f), edit=True)
    # families that generate from text refuse prompts with images, and the other way round
    f = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": "b", "image": str(img)}])
    with pytest.raises(ValueError, match="mixed.jsonl:2: a prompt with a source image, but model.family "
                                         "'flux' generates from text alone"):
        load_prompts(str(f), edit=False, family="flux")
    with pytest.raises(ValueError, match="mixed.jsonl:2: a prompt without a source image after prompts with "
                                         "one \\(or the other way round\\)"):
        load_prompts(str(f))  # no family given: the first row says which kind of list it is
    txt = tmp_path / "p.txt"
    txt.write_text("\n a cat\n")
    with pytest.raises(ValueError, match="p.txt:2: a prompt without a source image, but model.family "
                                         "'flux_kontext' edits images"):
        load_prompts(str(txt), edit=True, family="flux_kontext")
    with pytest.raises(ValueError, match="prompts.source 'builtin': a prompt without a source image"):
        load_prompts("builtin", edit=True)
    with pytest.raises(ValueError, match="prompts.source 'builtin_edit': a prompt with a source image"):
        load_prompts("builtin_edit", edit=False)
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_prompts(str(folder), edit=True)
    _random_image(folder / "x.png", (8, 8), 1)
    with pytest.raises(ValueError, match="a folder of images.*generates from text alone"):
        load_prompts(str(folder), edit=False)
    with pytest.raises(ValueError, match="image x.png has no caption file x.txt"):
        load_prompts(str(folder), edit=True)
    (folder / "x.txt").write_text("  \n")
    with pytest.raises(ValueError, match="x.txt:1: the caption is empty"):
        load_prompts(str(folder), edit=True)
    shutil.copy(tmp_path / "garbage.png", folder / "y.png")
    (folder / "x.txt").write_text("fine")
    (folder / "y.txt").write_text("fine too")
    with pytest.raises(ValueError, match="image y.png cannot be read"):
        load_prompts(str(folder), edit=True)


def test_the_run_refuses_mismatched_prompts_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match="prompts.source 'builtin' holds text prompts"):
        resolve_config(preset=PRESET, overrides=["prompts.source=builtin"])
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n")
    with pytest.raises(ValueError, match="p.txt:1: a prompt without a source image, but model.family "
                                         "'flux_kontext' edits images"):
        make_trainer(resolve_config(preset=PRESET, overrides=[*SMALL, f"prompts.source={txt}"]), tmp_path / "a")
    with pytest.raises(ValueError, match="prompts.source 'builtin_edit': a prompt with a source image, but "
                                         "model.family 'flux' generates"):
        make_trainer(resolve_config(preset="tiny-dance-grpo", overrides=[*SMALL, "prompts.source=builtin_edit"]),
                     tmp_path / "b")
    with pytest.raises(ValueError, match="prompts.source: prompt file '/no/such.jsonl' does not exist"):
        resolve_config(preset=PRESET, overrides=["prompts.source=/no/such.jsonl"])


def test_edit_prompt_is_a_str_keyed_by_text_and_image(tmp_path):
    from fastgrpo.train.checkpoint import load_pt

    p, q = EditPrompt("make it red", "/a.png"), EditPrompt("make it red", "/b.png")
    assert isinstance(p, str) and p != q and p != "make it red" and hash(p) != hash(q)
    assert p == EditPrompt("make it red", "/a.png") and not (p != EditPrompt("make it red", "/a.png"))
    assert len({p, q, EditPrompt("make it red", "/a.png")}) == 2
    assert p[:4] == "make" and type(p + "!") is str and f"{p}" == "make it red" and json.dumps([p]) == '["make it red"]'
    r = pickle.loads(pickle.dumps(p))
    assert type(r) is EditPrompt and r == p and r.image == "/a.png"
    torch.save({"cache": {(p, 3): torch.ones(2)}}, tmp_path / "s.pt")
    loaded = load_pt(tmp_path / "s.pt")  # weights_only: the class is allowed, nothing else
    assert list(loaded["cache"]) == [(p, 3)] and type(list(loaded["cache"])[0][0]) is EditPrompt
    with pytest.raises(ValueError, match="source image '/a.png' does not exist"):
        p.load()


# ------------------------------------------------------------------------------------------- reward
def test_source_similarity_reward(tmp_path):
    """1 - mean |x - s| against a float64 reference computed from the files (PIL Lanczos resize to the image size);
    an image equal to its source scores 1; text-only prompts are refused."""
    from fastgrpo.rewards import build_reward, source_similarity

    H, W = 13, 21
    prompts = [EditPrompt("a", str(_random_image(tmp_path / "a.png", (30, 17), 0))), *builtin_edits()[:2]]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, H, W, generator=g)

    def source(p):
        im = Image.open(p.image).convert("RGB") if not p.image.startswith("builtin:") else p.load()
        arr = np.asarray(im.resize((W, H), Image.LANCZOS), dtype=np.float64) / 255
        return torch.from_numpy(arr).permute(2, 0, 1)

    want = torch.stack([1 - (images[i].double() - source(p)).abs().mean() for i, p in enumerate(prompts)])
    got = source_similarity(images, prompts)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-6
    same = torch.stack([source(p).float() for p in prompts])
    assert torch.allclose(source_similarity(same, prompts), torch.ones(3), atol=1e-6)
    total, parts = build_reward([{"name": "brightness", "weight": 1.0}, {"name": "source_similarity", "weight": 0.5}])(
        images, prompts)
    assert torch.allclose(total, images.mean(dim=(1, 2, 3)) + 0.5 * got)
    with pytest.raises(ValueError, match="source_similarity needs prompts with source images.*'a cat'"):
        source_similarity(images[:1], ["a cat"])


# ------------------------------------------------------------------------------------------- training
def _cfg(*extra):
    return resolve_config(preset=PRESET, overrides=[*SMALL, *extra])


@pytest.mark.parametrize("lora", [True, False])
def test_lora_and_full_finetuning_train(tmp_path, lora):
    """A step trains (weights move), the first update's ratio is 1 and the KL to the reference is finite."""
    extra = ["model.lora={rank: 4, alpha: 8}"] if lora else []
    trainer = make_trainer(_cfg("train.steps=2", "train.beta=0.01", "train.lr=1e-2", *extra), tmp_path / "r")
    before = {k: v.detach().clone() for k, v in trainer.named.items()}
    assert all("lora" in k for k in before) == lora and before
    trainer.run()
    rows = read_metrics(tmp_path / "r/metrics.jsonl")
    assert all(r["first_ratio_dev"] < 1e-6 and math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    assert "reward_source_similarity" in rows[0] and "reward_brightness" in rows[0]
    assert any(not torch.equal(before[k], v) for k, v in trainer.named.items())


@pytest.mark.slow  # tests/test_families.py resumes every tiny family (this one too) in the fast tier, at 1 + 1 steps
def test_resume_is_bit_identical(tmp_path):
    """4 steps straight == 2 steps, then --resume to 4: weights and every step's reward."""
    straight = train(_cfg("train.steps=4", "checkpoint.every=2"), tmp_path / "a")
    train(_cfg("train.steps=2", "checkpoint.every=2"), tmp_path / "b")
    resumed = train(_cfg("train.steps=4", "checkpoint.every=2"), tmp_path / "b", resume=True)
    wa = load_file(str(straight / "checkpoints/step_4/trainable.safetensors"))
    wb = load_file(str(resumed / "checkpoints/step_4/trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["reward_mean"] for r in ra] == [r["reward_mean"] for r in rb]


def test_loading_a_saved_kontext_pipeline_folder(tmp_path):
    """``model.path`` a saved FluxKontextPipeline folder: from_pretrained gives the in-code tiny pipeline's run."""
    gain = _cfg().model.tiny_vae_gain
    tiny_flux_kontext_pipeline(0, vae_gain=gain).save_pretrained(tmp_path / "pipe")
    a = train(_cfg("train.steps=1", f"model.path={tmp_path / 'pipe'}"), tmp_path / "a")
    b = train(_cfg("train.steps=1"), tmp_path / "b")
    assert read_metrics(a / "metrics.jsonl")[0]["reward_mean"] == read_metrics(b / "metrics.jsonl")[0]["reward_mean"]


@pytest.mark.slow  # two processes
def test_two_processes_match_one(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo, DDP) samples the same edits as one process: the same rewards
    at every step (each rank holds one whole group), and weights equal to float rounding."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
    args = ["train", "--preset", PRESET, "--set", "train.steps=2", *[a for s in SMALL for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m",
                          "fastgrpo", *args, "--out", "two"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "fastgrpo", *args, "--out", "one"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    r2, r1 = read_metrics(tmp_path / "two/metrics.jsonl"), read_metrics(tmp_path / "one/metrics.jsonl")
    # the first step's rollouts are the same bits; after one update the weights differ by the rounding of the
    # gradient average (a sum over 2 processes / 2 vs one process's sum), and so do later rewards, slightly
    assert r2[0]["reward_mean"] == r1[0]["reward_mean"]
    assert all(abs(a["reward_mean"] - b["reward_mean"]) < 1e-5 for a, b in zip(r2, r1)) and len(r2) == len(r1) == 2
    assert r2[-1]["samples"] == r1[-1]["samples"] == 2 * 2 * 4
    w2 = load_file(str(tmp_path / "two/checkpoints/step_2/trainable.safetensors"))
    w1 = load_file(str(tmp_path / "one/checkpoints/step_2/trainable.safetensors"))
    # Adam divides by sqrt(v) + 1e-8: entries whose gradient is near 0 turn rounding into visible update differences
    errs = [rel_err(w2[k], w1[k]) for k in w1]
    assert w2.keys() == w1.keys() and max(errs) < 1e-3 and sorted(errs)[len(errs) // 2] < 1e-5


# ------------------------------------------------------------------------------------------- AEGPO
def test_collector_reads_generated_queries_only(tmp_path):
    """The collector on Kontext's transformer (found through the ``flux`` adapter: the same class and processors)
    leaves the velocity unchanged and reports the entropy of the *generated* tokens' text attention (float64
    eager reference from the q, k diffusers' processor computes), not that of every image token."""
    import diffusers.models.transformers.transformer_flux as flux_mod

    from fastgrpo.diffusion import AttentionEntropyCollector
    from fastgrpo.families import adapter_for_transformer

    H, W = 16, 20  # 20 generated + 20 source tokens
    _, model = _adapter(H, W)
    assert adapter_for_transformer(model.transformer).family == "flux"
    prompts = [EditPrompt("make it red", str(_random_image(tmp_path / "a.png", (W, H), 0))), builtin_edits()[1]]
    emb = model.encode_prompts(prompts)
    x = model.initial_latents(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    layers = (0, 1)
    captured, current = {}, []
    real = flux_mod.dispatch_attention_fn

    def recording(q, k, v, *a, **kw):
        if current:
            captured[current[-1]] = (q.detach().clone(), k.detach().clone())
        return real(q, k, v, *a, **kw)

    hooks = []
    for i in layers:
        attn = model.transformer.transformer_blocks[i].attn
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        hooks.append(attn.register_forward_hook(lambda m, a, o: current.clear()))
    with torch.no_grad(), pytest.MonkeyPatch().context() as mp:
        mp.setattr(flux_mod, "dispatch_attention_fn", recording)
        plain = model.velocity(x, sigma, emb)
    for h in hooks:
        h.remove()
    T, L = emb["embeds"].shape[1], x.shape[1]
    maps = []
    for i in layers:
        q, k = (t.double().transpose(1, 2) for t in captured[i])  # [B, H, S, D]
        P = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        maps.append(P[:, :, T:, :T])  # every image query x text keys
    A = torch.stack(maps).mean(dim=(0, 2))  # [B, 2L, T]
    A = A / A.sum(-1, keepdim=True)
    per_query = -(torch.special.xlogy(A, A) / math.log(2)).sum(-1)
    want, every = per_query[:, :L].mean(-1), per_query.mean(-1)

    with torch.no_grad(), AttentionEntropyCollector(model.transformer, layers=layers, impl="torch") as collector:
        out = model.velocity(x, sigma, emb)
        got = collector.pop()
        model.velocity(x, sigma, emb)  # the same ids tensor: read once, the same answer
        again = collector.pop()
    assert torch.equal(out, plain)
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max() and torch.equal(got, again)
    assert (want - every).abs().max() > 1e-4  # the distinction is visible at this size


def test_clip_image_similarity_reward(tmp_path):
    """Cosine of the CLIP image embeddings of each edit and its source (Flow-GRPO's image_similarity), against an
    independent computation with the same tiny CLIP; an edit equal to its source scores 1."""
    from fastgrpo.rewards import REWARDS
    from fastgrpo.rewards.pixel import as_pil_images
    from fastgrpo.testing import tiny_clip_folder

    folder, model, proc = tiny_clip_folder(tmp_path / "clip")
    fn = REWARDS["clip_image_similarity"](model=folder, device="cpu")
    prompts = [EditPrompt("a", str(_random_image(tmp_path / "a.png", (40, 24), 0))), builtin_edits()[3]]
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    got = fn(images, prompts)
    with torch.no_grad():
        def embed(pils):
            f = model.get_image_features(pixel_values=proc(images=pils, return_tensors="pt")["pixel_values"])
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            return f.double() / f.double().norm(dim=-1, keepdim=True)
        sources = [p.load().resize((40, 24), Image.LANCZOS) for p in prompts]
        want = (embed(as_pil_images(images)) * embed(sources)).sum(-1)
    assert (got.double() - want).abs().max() < 1e-5
    same = torch.stack([p.source_pixels(24, 40) for p in prompts])
    assert torch.allclose(fn(same, prompts), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="clip_image_similarity needs prompts with source images"):
        fn(images[:1], ["a cat"])


def test_paper_preset_lora_targets_exist_on_the_transformer():
    """The paper preset's LoRA targets (Flow-GRPO's Kontext list) all match modules of a FLUX transformer."""
    cfg = resolve_config(preset="flux-kontext-flow-grpo-geneval")
    _, model = _adapter(32, 32)
    names = [n for n, _ in model.transformer.named_modules()]
    for t in cfg.model.lora.targets:
        assert any(n == t or n.endswith("." + t) for n in names), t
    assert model.add_lora(4, 8, cfg.model.lora.targets)


def test_evaluation_uses_held_out_edits(tmp_path):
    """``eval.every`` on an editing run evaluates the held-out edits (other instructions over other drawn images),
    scored with the run's rewards, source_similarity included; ``fastgrpo eval`` reports them by their text."""
    from fastgrpo.train.evaluate import evaluate_run
    from fastgrpo.train.prompts import HELDOUT_EDITS

    run = train(_cfg("train.steps=1", "checkpoint.every=1", "eval.every=1", "eval.num_prompts=2",
                     "eval.samples_per_prompt=1"), tmp_path / "run")
    row = read_metrics(run / "metrics.jsonl")[0]
    assert math.isfinite(row["eval_reward_mean"])
    report = json.loads((evaluate_run(run, out=tmp_path / "e", progress=False) / "eval.json").read_text())
    assert report["prompts"] == [text for text, _ in HELDOUT_EDITS[:2]]
    assert {"brightness", "source_similarity"} <= set(report["checkpoints"][0]["rewards"])


@pytest.mark.slow  # about 10 s of CPU
def test_aegpo_on_kontext_resumes_bit_identical(tmp_path):
    """AEGPO on the editing family: its probes run under the collector (generated queries), its base-entropy cache is
    keyed by (EditPrompt, seed) and saved in strategy.pt, which loads with weights_only: 4 steps straight == 2, then
    --resume to 4."""
    from fastgrpo.train.checkpoint import load_pt

    base = ["algo=aegpo", "algo_args={r_high: 4, r_low: 2, warmup_steps: 1, top_k: 2, layers: [0, 1], "
            "exploration: branch}", "sample.num_steps=4", "sample.prompts_per_step=2", "sample.group_size=3",
            "sample.batch_size=8", "log.progress=false", "log.tensorboard=false", "checkpoint.every=2",
            "train.lr=1e-3"]
    cfg = lambda steps: resolve_config(preset=PRESET, overrides=[*base, f"train.steps={steps}"])  # noqa: E731
    a = train(cfg(4), tmp_path / "a")
    train(cfg(2), tmp_path / "b")
    b = train(cfg(4), tmp_path / "b", resume=True)
    wa = load_file(str(a / "checkpoints/step_4/trainable.safetensors"))
    wb = load_file(str(b / "checkpoints/step_4/trainable.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = read_metrics(a / "metrics.jsonl")
    assert sorted(rows[-1]["rollouts_per_prompt"]) == [2, 4] and all(len(r["entropy_t"]) == 4 for r in rows)
    keys = [k for k in load_pt(a / "checkpoints/step_4/strategy.pt")["base_entropy"]]
    assert keys and all(type(p) is EditPrompt for p, _ in keys)


def test_geneval_reads_the_clauses_of_an_edit_row(tmp_path):
    """Flow-GRPO's counting edits are JSONL rows with an image and GenEval clauses: the EditPrompt keeps the row, so
    the geneval reward of the paper preset finds its metadata (no detector needed to check that)."""
    from fastgrpo.rewards.geneval import GenEvalReward

    img = _random_image(tmp_path / "a.png", (8, 8), 0)
    row = {"prompt": "make it three cats", "image": "a.png", "tag": "counting",
           "include": [{"class": "cat", "count": 3}]}
    f = _jsonl(tmp_path / "train_metadata.jsonl", [row])
    (p,) = load_prompts(str(f), edit=True)
    assert p.image == str(img.resolve())
    assert GenEvalReward(model="google/owlv2-base-patch16-ensemble", rule="flow_grpo").metadata(p) == row
