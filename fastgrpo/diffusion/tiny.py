"""Tiny randomly initialised diffusers models built from configs (no downloads): CPU demos and tests.

The configurations keep the real architectures (joint attention, qk-norm, dual attention as in SD3.5) at a size
that runs in milliseconds on a CPU core.
"""
from __future__ import annotations

import torch

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)


def tiny_sd3_transformer(seed: int = 0, **overrides):
    """An SD3.5-shaped ``SD3Transformer2DModel`` with random weights (float32, eval mode).

    Inputs: latents [B, 4, 16, 16], ``encoder_hidden_states`` [B, T, 32], ``pooled_projections`` [B, 16].
    """
    from diffusers import SD3Transformer2DModel

    config = {**TINY_SD3, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**config)
    return model.eval()


TINY_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=3, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A FLUX-shaped ``FluxTransformer2DModel`` (3 double-stream + 1 single-stream blocks, RoPE, qk-norm) with
    random weights (float32, eval mode).

    Inputs: packed latents ``hidden_states`` [B, L, 16], ``encoder_hidden_states`` [B, T, 32],
    ``pooled_projections`` [B, 16], ``timestep`` [B] in [0, 1], ``img_ids`` [L, 3], ``txt_ids`` [T, 3]
    (``sum(axes_dims_rope)`` = the head dim, 16).
    """
    from diffusers import FluxTransformer2DModel

    config = {**TINY_FLUX, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config)
    return model.eval()
