"""fastgrpo.ar on a tiny random Janus: two-stage sampling against float64 references, CFG rows, EOS, bad inputs,
loading a saved checkpoint folder, and the training forward's memory with the fused shaping."""
import copy
import ctypes
import gc
import os

import pytest
import torch

from fastgrpo.ar import JanusPolicy, load_janus, tiny_janus
from fastgrpo.testing import assert_close

TEMPLATES = dict(cot_template="<|User|>: {prompt}\n<|Assistant|>:",
                 image_template="<|User|>: {prompt} {cot}\n<|Assistant|>:")
PROMPTS = ["a cat", "a red apple on a table", "sea"]


def make_policy(seed=0, **kw):
    model, tok = tiny_janus(seed)
    args = dict(image_tokens=64, cot_max_tokens=6, cfg_weight=5.0, **TEMPLATES)
    args.update(kw)
    return JanusPolicy(model, tok, **args)


def rollout(policy, prompts, seed):
    gen = torch.Generator().manual_seed(seed)
    data = policy.sample_cot(prompts, gen)
    cots = policy.decode_cots(data["cot_ids"], data["cot_mask"])
    data.update(policy.sample_image_tokens(prompts, cots, gen))
    return data, cots


def _row_ids(policy, text):
    return [policy.ids["bos"]] + policy.tok(text, add_special_tokens=False)["input_ids"]


def reference_logps(policy, prompts, cots, data, temperature):
    """float64, one unpadded sequence at a time, full forward (no cache, default positions): the conditional
    log-probs of the sampled CoT and image tokens."""
    m = copy.deepcopy(policy.model).double()
    lm = m.model.language_model
    text, image = [], []
    with torch.no_grad():
        for b, (p, c) in enumerate(zip(prompts, cots)):
            n = int(data["cot_mask"][b].sum())
            cot = data["cot_ids"][b, :n]
            ids = torch.tensor(_row_ids(policy, policy.cot_template.format(prompt=p)))
            P = len(ids)
            h = lm(input_ids=torch.cat([ids, cot])[None]).last_hidden_state[0]
            lp = torch.log_softmax(m.lm_head(h[P - 1:P + n - 1]) / temperature, -1).gather(-1, cot[:, None])[:, 0]
            text.append(torch.cat([lp, torch.zeros(data["cot_ids"].shape[1] - n, dtype=torch.float64)]))
            ids = torch.tensor(_row_ids(policy, policy.image_template.format(prompt=p, cot=c)) + [policy.ids["boi"]])
            img = data["image_ids"][b]
            emb = torch.cat([lm.embed_tokens(ids), m.prepare_embeddings_for_image_generation(img[:-1])])
            h = lm(inputs_embeds=emb[None]).last_hidden_state[0]
            logits = m.model.generation_head(h[len(ids) - 1:])
            image.append(torch.log_softmax(logits / temperature, -1).gather(-1, img[:, None])[:, 0])
    return torch.stack(text), torch.stack(image)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logps_match_a_float64_unpadded_forward(temperature):
    """Left padding, position ids, the KV cache and EOS handling: the log-probs stored while sampling equal a
    float64 teacher-forced forward of each sequence on its own; so do the trainer's teacher-forced logits."""
    policy = make_policy(temperature=temperature)
    data, cots = rollout(policy, PROMPTS, seed=int(torch.randint(0, 2**31, (1,))))
    ref_text, ref_image = reference_logps(policy, PROMPTS, cots, data, temperature)
    assert_close(data["cot_old_logp"], ref_text, name="cot_old_logp")
    assert_close(data["image_old_logp"], ref_image, name="image_old_logp")
    text_logits, image_logits = policy.teacher_forced_logits(data)
    lp_text = torch.log_softmax(text_logits.double() / temperature, -1).gather(-1, data["cot_ids"][..., None])[..., 0]
    lp_image = torch.log_softmax(image_logits.double() / temperature, -1).gather(
        -1, data["image_ids"][..., None])[..., 0]
    assert_close(lp_text * data["cot_mask"], ref_text, name="teacher-forced text")
    assert_close(lp_image, ref_image, name="teacher-forced image")
    images = policy.decode(data["image_ids"])
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_guided_logits_and_unconditional_rows():
    """The first image token is drawn from ``l_u + w (l_c - l_u)``, where the unconditional row is the image prompt
    with every token but BOS and <begin_of_image> replaced by pad (float64 reference, one row at a time)."""
    w = 3.5
    policy = make_policy(cfg_weight=w)
    seen = []
    real = policy._draw
    policy._draw = lambda logits, gen: (seen.append(logits.clone()), real(logits, gen))[1]
    cots = ["xy", "a longer thought"]
    policy.sample_image_tokens(PROMPTS[:2], cots, torch.Generator().manual_seed(1))
    m = copy.deepcopy(policy.model).double()
    for b, (p, c) in enumerate(zip(PROMPTS[:2], cots)):
        ids = torch.tensor(_row_ids(policy, policy.image_template.format(prompt=p, cot=c)) + [policy.ids["boi"]])
        uncond = torch.full_like(ids, policy.ids["pad"])
        uncond[0], uncond[-1] = policy.ids["bos"], policy.ids["boi"]
        with torch.no_grad():
            lc, lu = (m.model.generation_head(m.model.language_model(input_ids=x[None]).last_hidden_state[0, -1])
                      for x in (ids, uncond))
        assert_close(seen[0][b], lu + w * (lc - lu), name=f"guided logits row {b}")
    ids, _ = policy.image_prompt_ids(PROMPTS[:2], cots)
    un = policy.unconditional_ids(ids)
    keep = (ids == policy.ids["bos"]) | (ids == policy.ids["boi"])
    assert torch.equal(un[keep], ids[keep]) and (un[~keep] == policy.ids["pad"]).all()


def test_cot_stops_at_eos_per_row():
    """A row that samples EOS keeps it as its last trained token; later positions are pad, masked, log-prob 0;
    the other rows go on to cot_max_tokens."""
    policy = make_policy(cot_max_tokens=5)
    real, calls = policy._draw, {"n": 0}

    def draw(logits, gen):
        tok = real(logits, gen)
        calls["n"] += 1
        tok = torch.where(tok == policy.ids["eos"], torch.full_like(tok, policy.ids["pad"] + 10), tok)
        if calls["n"] == 2:
            tok[0] = policy.ids["eos"]
        return tok

    policy._draw = draw
    data = policy.sample_cot(PROMPTS, torch.Generator().manual_seed(0))
    assert data["cot_mask"].tolist() == [[True, True, False, False, False]] + [[True] * 5] * 2
    assert data["cot_ids"][0, 1] == policy.ids["eos"] and (data["cot_ids"][0, 2:] == policy.ids["pad"]).all()
    assert (data["cot_old_logp"][0, 2:] == 0).all() and (data["cot_old_logp"][:, :2] < 0).all()


def test_bad_inputs_raise_clear_errors(tmp_path):
    model, tok = tiny_janus()
    base = dict(image_tokens=64, cot_max_tokens=4, cfg_weight=5.0, **TEMPLATES)
    with pytest.raises(ValueError, match=r"ar.image_tokens=576 does not match the model's config.*8x8 = 64"):
        JanusPolicy(model, tok, **{**base, "image_tokens": 576})
    for w in (1.0, 0.0):
        with pytest.raises(ValueError, match="cfg_weight .*must be > 1"):
            JanusPolicy(model, tok, **{**base, "cfg_weight": w})
    with pytest.raises(ValueError, match="ar.image_template must contain"):
        JanusPolicy(model, tok, **{**base, "image_template": "{prompt}"})
    with pytest.raises(ValueError, match="ar.cot_max_tokens"):
        JanusPolicy(model, tok, **{**base, "cot_max_tokens": 0})
    with pytest.raises(ValueError, match=r"model.path '/no/such/janus' does not exist"):
        load_janus("/no/such/janus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a JanusForConditionalGeneration"):
        load_janus(str(tmp_path / "empty"))


def test_saved_checkpoint_folder_loads_the_same_model(tmp_path):
    """The janus-pro preset loads with from_pretrained: a tiny model and tokenizer saved to a folder come back
    identical (weights, tokenizer, rollouts)."""
    model, tok = tiny_janus(seed=3)
    model.save_pretrained(tmp_path / "janus")
    tok.save_pretrained(tmp_path / "janus")
    loaded, tok2 = load_janus(str(tmp_path / "janus"))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok2("a cat <begin_of_image>")["input_ids"] == tok("a cat <begin_of_image>")["input_ids"]
    args = dict(image_tokens=64, cot_max_tokens=4, cfg_weight=5.0, **TEMPLATES)
    da, _ = rollout(JanusPolicy(model, tok, **args), PROMPTS, seed=5)
    db, _ = rollout(JanusPolicy(loaded, tok2, **args), PROMPTS, seed=5)
    assert all(torch.equal(da[k], db[k]) for k in da)


# --------------------------------------------------------------------------------------------------- memory
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _peak_rss_growth(fn) -> int:
    """Peak resident-set growth (bytes) during ``fn()``, its result kept alive to the end (a training forward holds
    what backward needs). /proc/self/clear_refs resets VmHWM to the current RSS; allocations >= 64 KiB are forced
    to mmap (returned to the system on free), so the peak sees every large tensor."""
    gc.collect()
    # Free heap pages left by earlier tests would be reused without raising RSS: give them back first.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def rss(field):
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith(field)).split()[1]) * 1024

    base = rss("VmRSS:")
    out = fn()
    peak = rss("VmHWM:") - base
    del out
    return peak


@pytest.mark.parametrize("modality, V, rows", [(1, 16_384, 32), (0, 102_400, 8)])
def test_training_forward_memory_with_fused_shaping(modality, V, rows):
    """At Janus-Pro's vocabularies (16,384 image codes, 102,400 text tokens), the training forward through
    `eg_grpo_shaping` (Triton kernel; its interpreter on CPU) + `grpo_token_loss` allocates a small fraction of what
    the eager reference (log_softmax + softmax over the logits, impl="torch") needs beyond the logits."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("measures the CPU peak RSS with Triton's interpreter; on CUDA machines "
                    "bench/test_bench_token.py records the kernels' GPU peak memory against the reference")
    try:
        open("/proc/self/clear_refs", "w").close()
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs and glibc to measure the peak RSS")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)  # fixed at 64 KiB while measuring
    try:
        probe = 16 << 20  # calibration: a 16 MiB tensor must show in the measured peak
        seen = _peak_rss_growth(lambda: torch.ones(probe // 4))
        if seen < 0.9 * probe:
            pytest.skip(f"peak RSS does not track allocations in this process (saw {seen} of {probe} bytes)")
        _measure_fused_against_reference(modality, V, rows)
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling of its dynamic threshold: the usual steady state


def _measure_fused_against_reference(modality, V, rows):
    from fastgrpo.algos import EGGRPO
    from fastgrpo.ops import grpo_token_loss

    strategy = EGGRPO()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    logits = (torch.randn(1, rows, V, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, V, (1, rows), generator=g)
    adv = torch.randn(1, generator=g)

    def forward(impl, x=logits, t=targets):
        def run():
            terms = strategy.token_terms(x, t, modality, adv, impl=impl)
            loss, _ = grpo_token_loss(terms.logp, None, terms.logp.detach() - 0.1, terms.token_adv, t >= 0)
            return loss, terms
        return run

    for impl in ("triton", "torch"):  # warm-up: the interpreter's one-time set-up, the allocator's first pages
        forward(impl, logits[:, :2].detach().requires_grad_(True), targets[:, :2])()
    fused = _peak_rss_growth(forward("triton"))
    ref = _peak_rss_growth(forward("torch"))
    logits_bytes = logits.numel() * 4
    assert ref >= 2 * logits_bytes, (ref, logits_bytes)  # the reference's float32 [rows, V] intermediates
    assert fused <= 0.05 * ref, (fused, ref)
    _, terms = forward("triton")()
    ref64 = torch.log_softmax(logits.detach().double(), -1).gather(-1, targets[..., None])[..., 0]
    assert_close(terms.logp, ref64, name="fused logp")
