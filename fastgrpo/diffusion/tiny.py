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


# ------------------------------------------------------------------------------------------ tiny pipelines
# Whole diffusers pipelines (tokenizers, text encoders, VAE, transformer, scheduler) at toy size, so the same
# loading and prompt-encoding code serves tiny runs, tests (saved to a folder and loaded back) and real checkpoints.

_CHARS = [chr(c) for c in range(33, 127)]


def tiny_clip_tokenizer(max_length: int = 32):
    """A character-level CLIP BPE tokenizer (no merges) built in code."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 32):
    """A character-level fast tokenizer standing in for T5's (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _tiny_clip_text(with_projection: bool, vocab_size: int, hidden: int = 16, proj: int = 8, positions: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=positions,
                         projection_dim=proj,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(_CHARS) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2))


# A randomly initialised decoder maps every latent to nearly the same gray image (pixel std ~0.1; brightness
# 0.456-0.515 even for latents optimised for it), so no pixel reward can change what its images look like.
# ``vae_gain`` > 1 scales its output convolution up: with 4, decoded noise spans the pixel range (std ~0.36) and
# brightness reaches ~0.6-0.7, so a pixel reward shows in the images (the tiny-flow-grpo demo sets
# model.tiny_vae_gain: 4). The default 1 keeps the tiny pipelines the other presets and tests were tuned on.


def _tiny_vae(shift_factor: float, scaling_factor: float, latent_channels: int, gain: float = 1.0):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                        shift_factor=shift_factor, scaling_factor=scaling_factor)
    if gain != 1.0:
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(gain)
    return vae


def tiny_sd3_pipeline(seed: int = 0, vae_gain: float = 1.0):
    """A ``StableDiffusion3Pipeline`` of tiny random components (two CLIP encoders, T5, VAE with 2x down-sampling).

    Images of 32x32 px give 16x16 latents with 4 channels; the VAE keeps SD3's shift/scaling factors.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok = tiny_clip_tokenizer()
        vocab = len(clip_tok)
        pipe = StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(0.0609, 1.5305, latent_channels=4, gain=vae_gain),
            text_encoder=_tiny_clip_text(True, vocab), tokenizer=clip_tok,
            text_encoder_2=_tiny_clip_text(True, vocab), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=_tiny_t5(TINY_SD3["joint_attention_dim"]), tokenizer_3=tiny_t5_tokenizer(),
        )
    return pipe


def tiny_flux_pipeline(seed: int = 0, vae_gain: float = 1.0):
    """A ``FluxPipeline`` of tiny random components: 32x32 px -> 16x16x4 latents -> 64 packed tokens of 16.

    The transformer is `tiny_flux_transformer` with 2 double-stream blocks and FLUX.1-dev's guidance embedding.
    """
    from diffusers import FluxPipeline, FlowMatchEulerDiscreteScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok = tiny_clip_tokenizer()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
            vae=_tiny_vae(0.1159, 0.3611, latent_channels=4, gain=vae_gain),
            text_encoder=_tiny_clip_text(False, len(clip_tok)), tokenizer=clip_tok,
            text_encoder_2=_tiny_t5(TINY_FLUX["joint_attention_dim"]), tokenizer_2=tiny_t5_tokenizer(),
            transformer=tiny_flux_transformer(seed, num_layers=2, guidance_embeds=True),
        )
    return pipe


# ------------------------------------------------------------------------------- SD3.5-Medium-shaped, random
# The shape of a real SD3.5-Medium round (bench/test_bench_round.py, bench/test_bench_collector.py): the
# transformer and VAE at their real sizes with random weights; text encoders tiny but emitting the real token
# count and widths (77 CLIP + 256 T5 tokens of 4096, pooled 2048), since their cost is paid once per prompt.
SD35_MEDIUM = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, shift_factor=0.0609, scaling_factor=1.5305,
    use_quant_conv=False, use_post_quant_conv=False,
)


def random_sd3_pipeline(transformer: dict | None = None, *, vae: dict | None = None, seed: int = 0,
                        device="cpu", dtype=torch.bfloat16, clip_tokens: int = 77, t5_tokens: int = 256):
    """A ``StableDiffusion3Pipeline`` with random weights built on ``device`` from configs: by default SD3.5-Medium's
    transformer (2.24 B parameters) and SD3's VAE (8x down-sampling, 16 latent channels), so 512 px images give
    1024 image tokens, and tiny text encoders that still emit ``clip_tokens + t5_tokens`` text tokens (333) of the
    transformer's width. For measuring speed and memory at the real shape without downloading weights (pass it as
    ``make_trainer(..., pipeline=pipe)`` with ``model.max_sequence_length = t5_tokens``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    tcfg = {**SD35_MEDIUM, **(transformer or {})}
    half = tcfg["pooled_projection_dim"] // 2
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            clip_tok = tiny_clip_tokenizer(clip_tokens)
            vocab = len(clip_tok)
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**tcfg).eval(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=AutoencoderKL(**{**SD3_VAE, **(vae or {})}).eval(),
                text_encoder=_tiny_clip_text(True, vocab, proj=half, positions=clip_tokens), tokenizer=clip_tok,
                text_encoder_2=_tiny_clip_text(True, vocab, proj=tcfg["pooled_projection_dim"] - half,
                                               positions=clip_tokens),
                tokenizer_2=tiny_clip_tokenizer(clip_tokens),
                text_encoder_3=_tiny_t5(tcfg["joint_attention_dim"]), tokenizer_3=tiny_t5_tokenizer(t5_tokens),
            )
    return pipe.to(dtype=dtype)


# ------------------------------------------------------------------------------------------------ Wan2.1 (video)
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
# Wan's real compression (8x spatial, 4x temporal: scale_factor_spatial / scale_factor_temporal keep their defaults)
# and its 16 latent channels with the released latents_mean / latents_std (the class defaults), at base width 8.
TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True])


def tiny_umt5_tokenizer(max_length: int = 32):
    """A character-level fast tokenizer standing in for UMT5's (pad 0, eos 1, unk 2), appending ``</s>`` as the
    real one does with ``add_special_tokens=True``."""
    from tokenizers import processors

    tok = tiny_t5_tokenizer(max_length)
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _tiny_umt5(d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=len(_CHARS) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8))


def tiny_wan_transformer(seed: int = 0, **overrides):
    """A Wan2.1-shaped ``WanTransformer3DModel`` (3 blocks: 3-D RoPE self-attention, cross-attention to the text,
    qk-norm across heads) with random weights (float32, eval mode).

    Inputs: latents [B, 16, f, h, w] (f, h, w: latent frames and size; h, w even), ``encoder_hidden_states``
    [B, T, 32], ``timestep`` [B] in [0, 1000].
    """
    from diffusers import WanTransformer3DModel

    config = {**TINY_WAN, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    return model.eval()


def tiny_wan_vae(gain: float = 1.0):
    """A tiny ``AutoencoderKLWan`` (see `TINY_WAN_VAE`); ``gain`` scales the decoder's output convolution (see the
    note on ``vae_gain`` above)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_WAN_VAE)
    if gain != 1.0:
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(gain)
            vae.decoder.conv_out.bias.mul_(gain)
    return vae.eval()


def tiny_wan_pipeline(seed: int = 0, vae_gain: float = 1.0):
    """A ``WanPipeline`` of tiny random components (UMT5 encoder, Wan VAE, `tiny_wan_transformer`) with a
    ``FlowMatchEulerDiscreteScheduler`` at Wan's 480p ``flow_shift`` 3 (`fastgrpo.diffusion.wan` explains why not
    the UniPC scheduler the hub pipelines ship).

    Videos of 5 frames at 32x32 px give latents [16, 2, 4, 4] (8 video tokens after the 1x2x2 patches).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = WanPipeline(
            tokenizer=tiny_umt5_tokenizer(), text_encoder=_tiny_umt5(TINY_WAN["text_dim"]),
            vae=tiny_wan_vae(vae_gain), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            transformer=tiny_wan_transformer(seed),
        )
    return pipe
