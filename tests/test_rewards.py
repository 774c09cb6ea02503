"""Built-in rewards against independent computations; the CLIP reward on a tiny CLIP saved to a folder."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastgrpo.rewards import REWARDS, build_reward, brightness, colorfulness, jpeg_compressibility
from fastgrpo.rewards.pixel import as_pil_images


def _images(n=3, seed=0):
    return torch.rand(n, 3, 20, 24, generator=torch.Generator().manual_seed(seed))


def test_brightness_and_colorfulness_match_numpy():
    x = _images()
    arr = x.double().numpy()
    np.testing.assert_allclose(brightness(x).numpy(), arr.mean(axis=(1, 2, 3)), rtol=1e-6)
    rg = arr[:, 0] - arr[:, 1]
    yb = 0.5 * (arr[:, 0] + arr[:, 1]) - arr[:, 2]
    want = np.sqrt(rg.reshape(3, -1).std(1) ** 2 + yb.reshape(3, -1).std(1) ** 2) + 0.3 * np.sqrt(
        rg.reshape(3, -1).mean(1) ** 2 + yb.reshape(3, -1).mean(1) ** 2)
    np.testing.assert_allclose(colorfulness(x).numpy(), want, rtol=1e-5)


def test_rewards_accept_pil_lists():
    x = _images()
    pil = as_pil_images(x)
    np.testing.assert_allclose(brightness(pil).numpy(), brightness(x).numpy(), atol=1 / 255)


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    r = jpeg_compressibility(torch.cat([flat, noisy]))
    assert r[0] > r[1]
    buf = io.BytesIO()
    Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buf, format="JPEG", quality=95)
    assert r[1].item() == pytest.approx(-buf.tell() / 1000)


def test_weighted_sum_and_unknown_name():
    x = _images()
    fn = build_reward([{"name": "brightness", "weight": 2.0}, {"name": "colorfulness", "weight": -0.5}])
    total, parts = fn(x, ["p"] * 3)
    torch.testing.assert_close(total, 2 * brightness(x) - 0.5 * colorfulness(x))
    assert set(parts) == {"brightness", "colorfulness"}
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        build_reward([{"name": "beauty"}])


def test_clip_reward_loads_a_local_model_and_scores(tmp_path):
    from fastgrpo.testing import tiny_clip_folder

    folder, model, proc = tiny_clip_folder(tmp_path / "clip")
    fn = REWARDS["pickscore"](model=folder, processor=folder, device="cpu")
    x = _images(2)
    prompts = ["a cat", "a dog"]
    got = fn(x, prompts)
    # Independent computation with the same model.
    with torch.no_grad():
        im = proc(images=as_pil_images(x), return_tensors="pt")
        tx = proc(text=prompts, padding=True, return_tensors="pt")
        out = model(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"], pixel_values=im["pixel_values"])
    torch.testing.assert_close(got, out.logits_per_image.diagonal().float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        REWARDS["clip_score"](model="/no/such/clip")(x, prompts)


# ------------------------------------------------------------------ issue 15: model sources checked up front
def _offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def _cache(hub, repo_id):
    """A snapshot of ``repo_id`` in the hub cache layout (refs/main -> snapshots/<commit>/config.json)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def _cfg(*overrides):
    from fastgrpo.train import resolve_config

    return resolve_config(preset="tiny-flow-grpo", overrides=["log.progress=false", "log.tensorboard=false",
                                                              *overrides])


def test_model_sources_checked_offline_naming_the_key(tmp_path, monkeypatch):
    """Offline, a hub id missing from the cache stops at once naming its config key (defaults included), before
    any model is built; a cached id passes without the network."""
    from fastgrpo.train.loop import check_model_sources

    hub = _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.model 'yuvalkirstain/PickScore_v1' is not in the local "
                                         r"Hugging Face cache and the hub is offline.*\(pickscore's default\)$"):
        check_model_sources(_cfg("reward=[{name: pickscore}]"))
    _cache(hub, "yuvalkirstain/PickScore_v1")
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.processor 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'"):
        check_model_sources(_cfg("reward=[{name: pickscore}]"))
    _cache(hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    check_model_sources(_cfg("reward=[{name: pickscore}]"))  # both cached: fine, offline
    with pytest.raises(ValueError, match=r"^reward\[1\]\.args\.model 'me/hps'"):
        check_model_sources(_cfg("reward=[{name: brightness}, {name: hps, args: {model: me/hps}}]"))
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.model is required"):
        check_model_sources(_cfg("reward=[{name: hps}]"))
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.model '\./nowhere' does not exist"):
        check_model_sources(_cfg("reward=[{name: clip_score, args: {model: ./nowhere}}]"))
    with pytest.raises(ValueError, match=r"^model\.path 'org/sd3' is not in the local Hugging Face cache"):
        check_model_sources(_cfg("model.path=org/sd3"))
    check_model_sources(_cfg("model.path=org/sd3"), pipeline=object())  # a pipeline object: model.path unused


def test_model_sources_online_one_short_request(tmp_path, monkeypatch):
    """Online, an uncached id costs one metadata request with HF_HUB_ETAG_TIMEOUT, never minutes of retries."""
    from huggingface_hub import HfApi

    from fastgrpo.paths import check_model_source

    _offline_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    calls = []

    def unreachable(self, repo_id, timeout=None, **kw):
        calls.append((repo_id, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.model 'org/m' is not in the local Hugging Face cache "
                                         r"and the hub cannot be reached \(ConnectionError"):
        check_model_source("reward[0].args.model", "org/m")
    assert calls == [("org/m", 3.0)]
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, timeout=None, **kw: None)
    assert check_model_source("model.path", "org/m") == "org/m"  # exists on the hub: loading downloads it
