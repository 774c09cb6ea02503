"""The family table and the adapter protocol (`fastgrpo.families`, `fastgrpo.diffusion.adapter`), for every family.

* the table: each row's adapter and trainer import, the adapter says which family it is, an unknown family is a
  ValueError naming ``model.family``; no module outside the adapters compares the family string (a source scan);
* SD3 and FLUX against diffusers' own pipelines: our ODE sampler over the adapter's velocity (with CFG / the
  guidance embedding) reproduces ``pipe(..., output_type="latent")`` from the same initial latents, and our
  schedule is the pipeline scheduler's (the newer families test the same in their own files,
  tests/test_family_*.py);
* every flow family with a ``configs/tiny-*.yaml`` preset: a training step with LoRA (the family's default
  targets) and with full fine-tuning moves the weights, resume is bit-identical, and the AEGPO collector leaves the
  velocity unchanged while it measures a finite entropy.
"""
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo import sde_step
from fastgrpo.diffusion.adapter import FlowAdapter
from fastgrpo.families import FAMILIES, get_family
from fastgrpo.testing import tiny_family_config, tiny_flow_families
from fastgrpo.train import resolve_config, train
from fastgrpo.train.loop import GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
FLOW = [name for name, row in FAMILIES.items() if row.kind == "flow"]
TINY_FLOW = tiny_flow_families()
family_config = tiny_family_config  # Flow-GRPO at the smallest size on the family's tiny model


# ------------------------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_row_names_its_adapter_and_trainer(name):
    row = get_family(name)
    adapter = row.adapter_class()
    assert adapter.family == name and row.kind in ("flow", "ar")
    assert issubclass(row.trainer_class(), GRPOTrainer)
    assert adapter.lora_targets and all(isinstance(t, str) for t in adapter.lora_targets)
    if row.kind == "flow":
        assert issubclass(adapter, FlowAdapter)
        assert adapter.pipeline_class and adapter.transformer_class and adapter.block_lists
        assert adapter.modality in ("image", "video")
        for method in ("tiny_pipeline", "encode_prompt", "latent_shape", "sigmas", "predict"):
            assert getattr(adapter, method) is not getattr(FlowAdapter, method), f"{name} lacks {method}"


def test_unknown_family_names_the_key():
    with pytest.raises(ValueError, match=r"model.family must be one of sd3, flux, .*got 'sdxl'"):
        get_family("sdxl")
    with pytest.raises(ValueError, match="model.family must be one of"):
        resolve_config(preset="tiny-flow-grpo", overrides=["model.family=sdxl"])


def test_no_module_outside_the_adapters_compares_the_family_string():
    """Adding a family must not need edits elsewhere: only the adapter modules and the table may name a family in
    code (a comparison, a membership test, a dict key or a default)."""
    names = "|".join(re.escape(n) for n in FAMILIES)
    pattern = re.compile(rf"""(==|!=|\bin\b|\bnot in\b)\s*\(?[^#\n]*["']({names})["']|["']({names})["']\s*(==|!=|:)""")
    adapters = {Path(get_family(n).adapter.split(":")[0].replace(".", "/") + ".py") for n in FAMILIES}
    offenders = []
    for path in sorted((ROOT / "fastgrpo").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel in adapters or rel == Path("fastgrpo/families.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and "family" in code:
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "family strings compared outside the adapters:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------- parity with diffusers' pipelines
def _adapter(family, pipe, guidance, **kw):
    return get_family(family).adapter_class()(pipe, height=32, width=32, guidance_scale=guidance,
                                              max_sequence_length=32, **kw)


def ode_sample(model, prompt, x, num_steps):
    """Our deterministic sampler: ``sde_step(kind="ode")`` over the adapter's velocity and sigmas."""
    emb = model.encode_prompts([prompt] * x.shape[0])
    sigmas = model.sigmas(num_steps)
    for i in range(num_steps):
        v = model.velocity(x, sigmas[i:i + 1].expand(x.shape[0]), emb, cfg=True)
        x = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), kind="ode", impl="torch").prev_sample
    return x


@pytest.mark.parametrize("family, guidance", [("sd3", 4.5), ("sd3", 1.0), ("flux", 3.5)])
def test_ode_sampler_reproduces_the_pipeline(family, guidance):
    """Same initial latents, same prompt: our rollout with kind="ode" ends where diffusers' pipeline ends, and our
    sigmas are its scheduler's."""
    adapter = get_family(family).adapter_class()
    pipe = adapter.tiny_pipeline(seed=3)
    model = _adapter(family, pipe, guidance)
    steps, prompt = 5, "a red apple on a table"
    x = model.initial_latents(2, torch.Generator().manual_seed(11))
    ours = ode_sample(model, prompt, x.clone(), steps)
    kwargs = dict(prompt=[prompt] * 2, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                  latents=x.clone(), output_type="latent", max_sequence_length=32)
    if family == "sd3":
        kwargs["negative_prompt"] = [""] * 2
    with torch.no_grad():
        theirs = pipe(**kwargs).images
    torch.testing.assert_close(model.sigmas(steps), pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    assert (ours - x).abs().mean() > 0.1  # the rollout moved: the comparison is not of two copies of the noise


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_decode_matches_the_pipeline(family):
    adapter = get_family(family).adapter_class()
    pipe = adapter.tiny_pipeline(seed=1, vae_gain=4.0)
    model = _adapter(family, pipe, 1.0)
    x = model.initial_latents(2, torch.Generator().manual_seed(0))
    ours = model.decode(x)
    with torch.no_grad():
        z = x if family == "sd3" else pipe._unpack_latents(x, 32, 32, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        theirs = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pt")
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------- every flow family with a tiny preset
@pytest.mark.parametrize("family", TINY_FLOW)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_training_step_moves_the_weights(tmp_path, family, lora):
    cfg = family_config(family, model={"lora": {"rank": 4, "alpha": 8} if lora else None},
                        train={"lr": 1e-3, "beta": 0.01})
    out = train(cfg, tmp_path / "run")
    weights = load_file(str(out / "checkpoints/step_1/trainable.safetensors"))
    from fastgrpo.train import make_trainer

    fresh = make_trainer(cfg, tmp_path / "fresh")
    assert set(weights) == set(fresh.named)
    if lora:
        assert all("lora_" in k for k in weights)
    moved = sum(not torch.equal(weights[k], fresh.named[k].detach().cpu()) for k in weights)
    assert moved > 0 and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("family", TINY_FLOW)
def test_resume_is_bit_identical(tmp_path, family):
    def cfg(steps):
        return family_config(family, train={"steps": steps}, checkpoint={"every": 1})

    straight = train(cfg(2), tmp_path / "a")
    train(cfg(1), tmp_path / "b")
    resumed = train(cfg(2), tmp_path / "b", resume=True)
    wa = load_file(str(straight / "checkpoints/step_2/trainable.safetensors"))
    wb = load_file(str(resumed / "checkpoints/step_2/trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("family", TINY_FLOW)
def test_collector_keeps_the_velocity(family):
    """The entropy processors compute the same attention as the stock ones: the velocity through the collector
    equals the plain one, and each forward records a finite, non-negative Entropy(t) per sample."""
    from fastgrpo.diffusion import AttentionEntropyCollector

    from fastgrpo.train.prompts import load_prompts

    adapter = get_family(family).adapter_class()
    cfg = family_config(family)
    model = adapter(adapter.tiny_pipeline(seed=0), height=cfg.model.height, width=cfg.model.width,
                    guidance_scale=1.0, max_sequence_length=32, **adapter.options_from_config(cfg))
    prompts = load_prompts(cfg.prompts.source)[:2]  # an editing family's prompts carry their source images
    emb = model.encode_prompts(prompts)
    x = model.initial_latents(2, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        plain = model.velocity(x, sigma, emb)
        with AttentionEntropyCollector(model.transformer, layers=(0,), impl="torch") as collector:
            measured = model.velocity(x, sigma, emb)
            entropy = model.conditional_rows(collector.pop())
    torch.testing.assert_close(measured, plain, rtol=1e-4, atol=1e-5)
    assert entropy.shape == (2,) and torch.isfinite(entropy).all() and (entropy >= 0).all()
