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
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fastgrpo.diffusion.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    fn = REWARDS["pickscore"](model=str(tmp_path / "clip"), processor=str(tmp_path / "clip"), device="cpu")
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
