"""The ``sd3`` family: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

Conventions, as in the diffusers pipeline: latents [B, C, h, w]; timestep input ``sigma * 1000``; classifier-free
guidance on the batch ``[uncond, cond]`` with the empty prompt as the negative, ``v = v_u + g * (v_c - v_u)``
(Flow-GRPO uses 4.5); the scheduler's static ``shift`` (3.0) sets the sigmas (`fastgrpo.diffusion.schedules`).
AEGPO's collector reads the joint attention of ``transformer_blocks[i].attn`` (``JointAttnProcessor2_0``; image
tokens, then text tokens).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .adapter import FlowAdapter
from .schedules import sd3_sigmas


class SD3Adapter(FlowAdapter):
    family: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"
    block_lists: ClassVar[tuple] = ("transformer_blocks",)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        from .tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline(seed, vae_gain=vae_gain)

    @classmethod
    def entropy_processor(cls, processor):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        from .attention import SD3EntropyAttnProcessor

        return SD3EntropyAttnProcessor if type(processor) is JointAttnProcessor2_0 else None

    def setup(self) -> None:
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        patch = self.transformer.config.patch_size
        if self.height % (patch * self.vae_scale) or self.width % (patch * self.vae_scale):
            raise ValueError(f"model.height and model.width must be multiples of {patch * self.vae_scale} "
                             f"for this VAE, got {self.height}x{self.width}")
        self.lat_h, self.lat_w = self.height // self.vae_scale, self.width // self.vae_scale

    def encode_prompt(self, prompt: str) -> dict:
        pe, npe, pp, npp = self.pipe.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=[""], max_sequence_length=self.max_sequence_length)
        return {"embeds": pe[0], "pooled": pp[0], "neg_embeds": npe[0], "neg_pooled": npp[0]}

    def latent_shape(self, n: int) -> tuple:
        return (n, self.transformer.config.in_channels, self.lat_h, self.lat_w)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return sd3_sigmas(num_steps, shift=self.pipe.scheduler.config.shift)

    def predict(self, net, x, sigma, emb, cfg):
        dtype, B = self.dtype, x.shape[0]
        if cfg and self.guidance_scale > 1:
            out = net(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([sigma, sigma]) * 1000,
                      encoder_hidden_states=torch.cat([emb["neg_embeds"], emb["embeds"]]).to(dtype),
                      pooled_projections=torch.cat([emb["neg_pooled"], emb["pooled"]]).to(dtype)).sample
            self.model_forwards += 2 * B
            v_u, v_c = out.float().chunk(2)
            return v_u + self.guidance_scale * (v_c - v_u)
        self.model_forwards += B
        return net(hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=emb["embeds"].to(dtype),
                   pooled_projections=emb["pooled"].to(dtype)).sample.float()

    def conditional_rows(self, per_row: torch.Tensor, *, cfg: bool = True) -> torch.Tensor:
        """With CFG the forward runs ``[uncond, cond]``: the last half."""
        if cfg and self.guidance_scale > 1:
            return per_row[per_row.shape[0] // 2:]
        return per_row
