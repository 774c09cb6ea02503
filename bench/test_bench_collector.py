"""AEGPO's whole-step cost: one denoising forward of a mid-size SD3 transformer, plain and with Entropy(t) measured.

Three ways to run the same forward (random weights, bf16, no grad -- a rollout or probe step):
* ``plain``: the transformer as diffusers ships it (SDPA in every block);
* ``collector``: inside ``AttentionEntropyCollector(layers=(5, 10, 15), mode="mixture")`` -- our kernels in the
  three selected blocks, one float32 [B, N_image, N_text] buffer;
* ``eager_maps``: the same three blocks materialise their attention maps (softmax(QK^T) in float32,
  [B, H, L, L]) and read Entropy(t) off them, as hooks that extract maps do (AEGPO's reported overhead: 11.1% time,
  +1 GB, paper 000).

The configuration is SD3.5 Medium's transformer (24 joint blocks, 24 heads x 64, dual attention in blocks 0-12) at
512 px (1024 image tokens) with 333 text tokens (77 CLIP + 256 T5), batch 2 and 8. On CPU a tiny configuration
with 16 blocks runs instead (``scaled_down``), only to check correctness. Before timing, the collector's and the
eager Entropy(t) must agree, and the velocities of all three must agree with the plain forward (bf16 rounding of
different attention kernels propagates through the blocks, hence the relative tolerance below). ``bench/report.py``
sets ``collector`` and ``eager_maps`` against ``plain``: time and peak extra memory over the plain forward.
"""
import pytest
import torch

from fastgrpo.diffusion.attention import AttentionEntropyCollector, SD3EntropyAttnProcessor
from fastgrpo.diffusion.tiny import SD35_MEDIUM
from fastgrpo.testing import rel_err
from harness import HAS_CUDA, measure

LAYERS = (5, 10, 15)
CPU_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=16, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
N_TEXT = 333
VELOCITY_RTOL = 3e-2  # bf16 model: relative L2 distance between velocities from different attention kernels
ENTROPY_RTOL = 1e-2  # the two Entropy(t) differ only through that propagation (a few bits out of ~8)


class _EagerMapProcessor(SD3EntropyAttnProcessor):
    """The selected block's attention with its map materialised (float32 [B, H, L, L]), as map-extracting hooks
    do; the image->text block, summed over heads, goes into the collector's mixture buffer."""

    def _attend(self, q, k, v, *, layout, text_start, text_len, image_start, image_len):
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        out = (probs @ v.float()).to(v.dtype)
        c = self.collector
        if c._in_forward:
            c._seen.append(self.layer)
            block = probs[:, :, image_start:image_start + image_len, text_start:text_start + text_len].sum(1)
            c._probs = block if c._probs is None else c._probs + block
        return out


class _EagerMapCollector(AttentionEntropyCollector):
    processor_classes = {"sd3": _EagerMapProcessor}


_MODEL = {}


def _model(device):
    if device.type not in _MODEL:
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        config = SD35_MEDIUM if device.type == "cuda" else CPU_CONFIG
        with torch.device(device):
            model = SD3Transformer2DModel(**config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        _MODEL[device.type] = model.eval().requires_grad_(False)
    return _MODEL[device.type]


def _inputs(model, batch, device):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    n_text = N_TEXT if device.type == "cuda" else 12
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=model.dtype)  # noqa: E731
    return dict(hidden_states=mk(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                encoder_hidden_states=mk(batch, n_text, cfg.joint_attention_dim),
                pooled_projections=mk(batch, cfg.pooled_projection_dim),
                timestep=torch.full((batch,), 700.0, device=device))


def _forward(model, inputs, collector_cls=None):
    def run():
        with torch.no_grad():
            if collector_cls is None:
                return model(**inputs).sample, None
            with collector_cls(model, layers=LAYERS, mode="mixture") as collector:
                v = model(**inputs).sample
                return v, collector.pop()
    return run


@pytest.mark.parametrize("way", ["plain", "collector", "eager_maps"])
@pytest.mark.parametrize("batch", [2, 8])
def test_denoising_step(benchmark, bench_device, way, batch):
    model = _model(bench_device)
    inputs = _inputs(model, batch, bench_device)
    collector_cls = {"plain": None, "collector": AttentionEntropyCollector, "eager_maps": _EagerMapCollector}[way]
    fn = _forward(model, inputs, collector_cls)
    plain_v, _ = _forward(model, inputs)()
    _, eager_entropy = _forward(model, inputs, _EagerMapCollector)()
    errors = {}

    def check(result):
        v, entropy = result
        errors["velocity_rel_l2_vs_plain"] = float((v.float() - plain_v.float()).norm() / plain_v.float().norm())
        assert errors["velocity_rel_l2_vs_plain"] < VELOCITY_RTOL, errors
        if entropy is not None:
            assert entropy.shape == (batch,) and torch.isfinite(entropy).all()
            errors["entropy_rel_err_vs_eager"] = rel_err(entropy, eager_entropy)
            assert errors["entropy_rel_err_vs_eager"] < ENTROPY_RTOL, errors

    cfg = model.config
    n_image = (cfg.sample_size // cfg.patch_size) ** 2
    n_text = inputs["encoder_hidden_states"].shape[1]
    measure(benchmark, fn, check=check, bytes_moved=sum(p.numel() * p.element_size() for p in model.parameters()),
            dtype=model.dtype, shapes={"latents": tuple(inputs["hidden_states"].shape),
                                       "encoder_hidden_states": tuple(inputs["encoder_hidden_states"].shape)},
            way=way, batch=batch, layers=list(LAYERS), n_image=n_image, n_text=n_text,
            num_layers=cfg.num_layers, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
            params=sum(p.numel() for p in model.parameters()), scaled_down=not HAS_CUDA,
            rounds=10 if HAS_CUDA else 2, warmup=2 if HAS_CUDA else 1)
    benchmark.extra_info.update(errors)


def test_gpu_probe_collector_section():
    """bench/gpu_probe.py's ``collector`` section (plain vs collector forward, a new collector per forward, one
    entered once, and one with its kernels stubbed: times, host issue time, ops, kernels and their device time per
    forward, where the host time goes) runs and writes its numbers; scaled down and untimed on CPU, the real probe
    on CUDA."""
    import gpu_probe

    res = gpu_probe.probe_collector(batches=(2,), repeats=1 if not HAS_CUDA else 3)
    row = res["b2"]
    for way in ("plain", "collector", "collector_reused", "collector_stubbed"):
        assert row[way]["ms"] > 0 and row[way]["host_issue_ms"] > 0 and row[way]["cpu_aten_ops"] > 0
        top = row[way]["host_profile"]
        assert top and all(len(r) == 4 and r[2] >= 0 for r in top)  # [function, calls, own ms, cumulative ms]
        events = row[way]["cpu_events"]
        assert events and all(len(r) == 4 and r[2] >= 0 for r in events)  # [event, calls, self us, total us]
        assert any(r[0].startswith("aten::") for r in events)
    assert res["scaled_down"] == (not HAS_CUDA)
    if HAS_CUDA:
        assert row["collector"]["device_kernels"] > row["plain"]["device_kernels"] > 0
        assert row["plain"]["kernel_ms"] > 0 and row["plain"]["kernels_top"]
        assert row["extra_kernel_ms"] == row["collector"]["kernel_ms"] - row["plain"]["kernel_ms"]
    else:  # no device time without CUDA
        assert row["plain"]["kernel_ms"] is None and row["extra_kernel_ms"] is None
    assert {"overhead", "extra_kernels_per_forward", "extra_cpu_ops_per_forward", "host_bound"} <= row.keys()
    assert row["launch_overhead_ms"] == row["collector"]["ms"] - row["collector_stubbed"]["ms"]
    # host time per transformer block, each way; the collector's extra per block
    blocks = _model(torch.device("cuda" if HAS_CUDA else "cpu")).transformer_blocks
    n_blocks = len(blocks)
    for way in ("plain", "collector", "collector_reused", "collector_stubbed"):
        per_block = row[way]["block_host_ms"]
        assert len(per_block) == n_blocks > max(LAYERS) and all(t > 0 for t in per_block), (way, per_block)
        assert sum(per_block) <= row[way]["hooked_host_ms"] * 1.2  # the blocks are part of the same forwards
    assert row["extra_block_host_ms"] == [a - b for a, b in zip(row["collector"]["block_host_ms"],
                                                                  row["plain"]["block_host_ms"])]
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in blocks)  # the probe's hooks are gone
    if HAS_CUDA:  # the stubbed way runs the forward's kernels without the collector's own (2 per layer)
        assert row["collector_stubbed"]["device_kernels"] == row["collector"]["device_kernels"] - 2 * len(LAYERS)
