"""The ``wan`` family: Wan2.1 text-to-video (``WanPipeline``, ``WanTransformer3DModel``, ``AutoencoderKLWan``, a
UMT5 text encoder through transformers). GRPO on video latents [B, C, f, h, w].

Conventions, as in diffusers' ``WanPipeline.__call__`` (diffusers 0.42, pipelines/wan/pipeline_wan.py):

* prompts are cleaned (``prompt_clean``: ftfy when installed, HTML unescaping, whitespace) and encoded by the UMT5
  encoder with ``padding="max_length"`` to ``model.max_sequence_length`` (Wan: 512); the hidden states past each
  prompt's tokens are zeroed, as the pipeline does (`encode_prompt` calls ``pipe.encode_prompt``);
* classifier-free guidance with the empty negative prompt (Flow-GRPO's Wan script encodes ``[""]`` as the negative;
  it is also the pipeline's default when no negative prompt is given), ``v = v_u + g * (v_c - v_u)`` when
  ``sample.guidance_scale > 1`` (Flow-GRPO's Wan config: 4.5; DanceGRPO's: 5). The pipeline runs the conditional and
  the unconditional forward one after the other; we run them as one batch ``[uncond, cond]`` (one forward per
  `predict`, as SD3's adapter, so the AEGPO collector records one result per call), equal to float32 tolerance;
* timestep input ``sigma * 1000`` ([B], float);
* latents [B, 16, (F - 1) / 4 + 1, H / 8, W / 8] from the VAE's ``scale_factor_temporal`` /
  ``scale_factor_spatial``; ``model.num_frames`` F must be 1 + a multiple of the temporal factor and H, W
  multiples of 8 x the patch (16), checked here (the pipeline rounds with a warning instead);
* decoding: ``z = x / (1 / latents_std) + latents_mean`` per channel (the pipeline's arithmetic, so float32 decodes
  match it exactly), ``vae.decode``, then ``(v / 2 + 0.5).clamp(0, 1)``; videos [B, F, 3, H, W] float32 in [0, 1].

**The scheduler (a decision).** The hub's Wan2.1 pipelines ship ``UniPCMultistepScheduler`` (``flow_shift`` 3.0
at 480p, 5.0 at 720p), a multistep predictor-corrector: a step depends on earlier velocities, so a transition is
not a one-step Gaussian and has no per-step log-probability. GRPO needs per-step Gaussian transitions, so we
sample with flow-matching Euler / SDE steps (`fastgrpo.sde_step`) on the sigmas of a
``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (`fastgrpo.diffusion.schedules.sd3_sigmas`; no dynamic
shifting), ``flow_shift`` read from the loaded pipeline's scheduler (``flow_shift`` of UniPC, ``shift`` of an Euler
one). `load_pipeline` replaces a loaded pipeline's UniPC scheduler by that Euler scheduler, so ``pipe(...)`` then
samples what the trainer samples (its ODE). The public trainers do the same kind of thing:

* DanceGRPO (XueZeyue/DanceGRPO @15cc71d, fastvideo/train_grpo_wan_2_1.py lines 94-133 ``flux_step`` and
  277-279 the schedule ``sd3_time_shift(shift, linspace(1, 0, N + 1))``; scripts/finetune/finetune_wan_2_1_grpo.sh
  line 48 ``--shift 3``): Euler SDE steps with eta on a shift-3 schedule, never the UniPC scheduler;
* Flow-GRPO (yifan123/flow_grpo, scripts/train_wan2_1.py and flow_grpo/diffusers_patch/
  wan_pipeline_with_logprob.py): its SD3 ``sde_step_with_logprob`` (an Euler-Maruyama step) on the sigmas of the
  pipeline's scheduler.

Our sigmas are exactly the Euler scheduler's (tests/test_family_wan.py checks ``pipe.scheduler.sigmas``);
DanceGRPO's linspace differs at the ends (it starts at sigma 1 and has no ``1/1000`` floor before the final 0).

**AEGPO** (a decision): the collector reads the cross-attention ``blocks[i].attn2`` (``WanAttnProcessor``), the
only place Wan's video tokens meet the text: no joint sequence; the video queries attend to the text tokens alone
(q [B, N, H, D], k and v [B, T, H, D], layout [B, S, H, D]; qk-norm across heads before the head split, no RoPE).
So ``text_start = 0`` over the T cross-attention keys and every key is a text key: the text entropy is the row's
entropy, and "mixture" weighs each head's row equally. The keys include the zero-padded positions up to
``model.max_sequence_length``, since Wan attends to them (no mask; the entropy of a random model is near
``log2(T)``). The fused kernels take joint self-attention only (one sequence for q and k), so these layers run the
torch path of `fastgrpo.ops.attention.TextEntropyPlan` with ``cross=True`` on every device (SDPA for the output,
the statistics from logits in query chunks of [B, H, 1024, T]); the kernels are untouched. The self-attention
``attn1`` keeps its processor; image-conditioned cross-attention (I2V's ``add_k_proj``) is refused.
`WanEntropyAttnProcessor` reproduces the stock processor.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .adapter import FlowAdapter
from .attention import _EntropyAttnProcessor
from .schedules import sd3_sigmas

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s default (5 s at 16 fps)


def flow_shift_of(scheduler) -> float:
    """Wan's flow shift from a pipeline's scheduler: ``shift`` of a ``FlowMatchEulerDiscreteScheduler``,
    ``flow_shift`` of the ``UniPCMultistepScheduler`` the hub pipelines ship; ValueError for another one."""
    cfg = scheduler.config
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError("model.path: the pipeline's FlowMatchEulerDiscreteScheduler uses dynamic shifting; "
                             "Wan's schedule is a static flow shift")
        return float(cfg.shift)
    if cfg.get("flow_shift") is not None and cfg.get("use_flow_sigmas", True):
        return float(cfg.flow_shift)
    raise ValueError(f"model.path: cannot read Wan's flow shift from a {type(scheduler).__name__} (expected a "
                     "FlowMatchEulerDiscreteScheduler or a flow UniPCMultistepScheduler)")


def wan_blocks(transformer):
    """The ``blocks`` of a Wan transformer, looking through a peft wrapper."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None and hasattr(transformer, "get_base_model"):
        blocks = getattr(transformer.get_base_model(), "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(transformer).__name__} has no blocks")
    return blocks


class WanAdapter(FlowAdapter):
    family: ClassVar[str] = "wan"
    pipeline_class: ClassVar[str] = "WanPipeline"
    transformer_class: ClassVar[str] = "WanTransformer3DModel"
    # The attention projections of every block's self- and cross-attention: Flow-GRPO's Wan LoRA targets
    # (scripts/train_wan2_1.py: to_q, to_k, to_v, to_out.0, plus add_* projections that text-to-video Wan lacks).
    lora_targets: ClassVar[tuple] = ("to_q", "to_k", "to_v", "to_out.0")
    block_lists: ClassVar[tuple] = ("blocks",)
    modality: ClassVar[str] = "video"

    def __init__(self, pipe, *, num_frames: int = DEFAULT_NUM_FRAMES, **kwargs):
        self.num_frames = num_frames
        super().__init__(pipe, **kwargs)

    # ------------------------------------------------------------------------------------------ class-level
    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        from .tiny import tiny_wan_pipeline

        return tiny_wan_pipeline(seed, vae_gain=vae_gain)

    @classmethod
    def load_pipeline(cls, path, dtype, *, seed=0, tiny_vae_gain=1.0):
        """As the base (``WanPipeline.from_pretrained``), then the scheduler becomes a
        ``FlowMatchEulerDiscreteScheduler`` at the loaded scheduler's flow shift (see the module docstring), and the
        VAE stays in float32 whatever ``model.dtype`` (diffusers' Wan example and Flow-GRPO's train_wan2_1.py load it
        so: the 3-D VAE is small next to the transformer and decodes visibly worse in bf16)."""
        pipe = super().load_pipeline(path, dtype, seed=seed, tiny_vae_gain=tiny_vae_gain)
        if pipe.vae.dtype != torch.float32:
            import logging

            # diffusers warns on every ``.to(dtype)`` of a model with _keep_in_fp32_modules (the Wan VAE has none)
            log = logging.getLogger("diffusers.models.modeling_utils")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                pipe.vae.to(torch.float32)
            finally:
                log.setLevel(level)
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=pipe.scheduler.config.num_train_timesteps, shift=flow_shift_of(pipe.scheduler))
        return pipe

    @classmethod
    def options_from_config(cls, cfg) -> dict:
        return {"num_frames": cfg.model.num_frames if cfg.model.num_frames is not None else DEFAULT_NUM_FRAMES}

    @classmethod
    def check_config(cls, cfg) -> None:
        """``model.num_frames`` (null: 81) must be 1 + a multiple of 4 (Wan2.1's VAE compresses time 4x; the loaded
        VAE is checked again in `setup`); height and width multiples of 16 (8x VAE, 2x2 patches)."""
        f = cls.options_from_config(cfg)["num_frames"]
        if f < 1 or (f - 1) % 4:
            raise ValueError(f"model.num_frames must be 1 + a multiple of 4 for Wan (1, 5, ..., 81), got {f}")
        for key in ("height", "width"):
            if getattr(cfg.model, key) % 16:
                raise ValueError(f"model.{key} must be a multiple of 16 for Wan (8x VAE, 2x2 patches), "
                                 f"got {getattr(cfg.model, key)}")

    @classmethod
    def attention_modules(cls, transformer) -> list:
        return [b.attn2 for b in wan_blocks(transformer)]

    @classmethod
    def entropy_processor(cls, processor):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanEntropyAttnProcessor if type(processor) is WanAttnProcessor else None

    # ------------------------------------------------------------------------------------------ instance
    def setup(self) -> None:
        vcfg = self.vae.config
        self.scale_t, self.scale_s = vcfg.scale_factor_temporal, vcfg.scale_factor_spatial
        _, p_h, p_w = self.transformer.config.patch_size
        f = self.num_frames
        if isinstance(f, bool) or not isinstance(f, int) or f < 1 or (f - 1) % self.scale_t:
            raise ValueError(f"model.num_frames must be 1 + a multiple of {self.scale_t} for this VAE, got {f!r}")
        if self.height % (self.scale_s * p_h) or self.width % (self.scale_s * p_w):
            raise ValueError(f"model.height and model.width must be multiples of {self.scale_s * p_h} x "
                             f"{self.scale_s * p_w} for this VAE and patch size, got {self.height}x{self.width}")
        self.lat_f = (f - 1) // self.scale_t + 1
        self.lat_h, self.lat_w = self.height // self.scale_s, self.width // self.scale_s
        self.flow_shift = flow_shift_of(self.pipe.scheduler)
        z = vcfg.z_dim
        self._mean = torch.tensor(vcfg.latents_mean).view(1, z, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, z, 1, 1, 1)

    def encode_prompt(self, prompt: str) -> dict:
        pe, npe = self.pipe.encode_prompt(prompt=[prompt], negative_prompt=[""], do_classifier_free_guidance=True,
                                          max_sequence_length=self.max_sequence_length, device=self.device)
        return {"embeds": pe[0], "neg_embeds": npe[0]}

    def latent_shape(self, n: int) -> tuple:
        return (n, self.transformer.config.in_channels, self.lat_f, self.lat_h, self.lat_w)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return sd3_sigmas(num_steps, shift=self.flow_shift)

    def predict(self, net, x, sigma, emb, cfg):
        dtype, B = self.dtype, x.shape[0]
        if cfg and self.guidance_scale > 1:
            out = net(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([sigma, sigma]) * 1000,
                      encoder_hidden_states=torch.cat([emb["neg_embeds"], emb["embeds"]]).to(dtype)).sample
            self.model_forwards += 2 * B
            v_u, v_c = out.float().chunk(2)
            return v_u + self.guidance_scale * (v_c - v_u)
        self.model_forwards += B
        return net(hidden_states=x.to(dtype), timestep=sigma * 1000,
                   encoder_hidden_states=emb["embeds"].to(dtype)).sample.float()

    def conditional_rows(self, per_row: torch.Tensor, *, cfg: bool = True) -> torch.Tensor:
        """With CFG the forward runs ``[uncond, cond]``: the last half."""
        if cfg and self.guidance_scale > 1:
            return per_row[per_row.shape[0] // 2:]
        return per_row

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Videos [B, F, 3, H, W] float32 in [0, 1] from latents [B, C, f, h, w] (the pipeline's decoding)."""
        dt = self.vae.dtype
        z = x.to(dt) / self._inv_std.to(x.device, dt) + self._mean.to(x.device, dt)
        video = self.vae.decode(z).sample.float()  # [B, 3, F, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()


class WanEntropyAttnProcessor(_EntropyAttnProcessor):
    """``WanAttnProcessor`` semantics on a Wan cross-attention (``blocks[i].attn2``), attention through the
    cross-attention entropy path (text keys ``[0, T)``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError(f"encoder_hidden_states is None in block {self.layer}'s attn2: the entropy processor "
                             "replaces Wan's cross-attention, which needs the text tokens")
        if attn.add_k_proj is not None:
            raise ValueError(f"block {self.layer}'s attn2 has image-context projections (Wan I2V): the entropy "
                             "processor supports text-to-video cross-attention only")
        if attention_mask is not None or rotary_emb is not None:
            raise ValueError("attention_mask / rotary_emb given to a Wan cross-attention: not supported by the "
                             "entropy processor (diffusers' WanTransformerBlock passes neither)")
        if getattr(attn, "fused_projections", False):
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # across heads, before the split (as WanAttnProcessor)
        split = lambda x: x.unflatten(2, (attn.heads, -1))  # noqa: E731  [B, L, H*D] -> [B, L, H, D]
        q, k, v = split(q), split(k), split(v)
        n_text, n_video = k.shape[1], q.shape[1]
        out = self._attend(q, k, v, layout="bshd", text_start=0, text_len=n_text, image_start=0,
                           image_len=n_video, cross=True)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))
