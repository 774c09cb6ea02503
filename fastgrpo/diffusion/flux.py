"""The ``flux`` family: FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``).

Conventions, as in the diffusers pipeline: packed latents [B, (h/2)*(w/2), 4C] (initial noise is drawn directly
in the packed layout: the same distribution as the pipeline's draw-then-pack); timestep input ``sigma``;
guidance-distilled, so ``g`` (3.5) enters through the guidance embedding and there is no CFG batch; the sigmas shift
with the packed sequence length (`fastgrpo.diffusion.schedules.flux_sigmas`). AEGPO's collector reads the
double-stream blocks' joint attention (``FluxAttnProcessor``; text tokens, then image tokens, RoPE).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .adapter import FlowAdapter
from .schedules import flux_sigmas


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), 4C], FLUX's 2x2 patch packing."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)*(w/2), 4C] -> [B, C, h, w], the inverse of `pack_latents`."""
    B, L, C = x.shape
    x = x.view(B, h // 2, w // 2, C // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype, *, index: float = 0.0) -> torch.Tensor:
    """FLUX's position ids [h*w, 3] of a packed (h, w) latent grid (first coordinate ``index``)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)


class FluxAdapter(FlowAdapter):
    family: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    block_lists: ClassVar[tuple] = ("transformer_blocks", "single_transformer_blocks")

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        from .tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(seed, vae_gain=vae_gain)

    @classmethod
    def entropy_processor(cls, processor):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        from .attention import FluxEntropyAttnProcessor

        return FluxEntropyAttnProcessor if type(processor) is FluxAttnProcessor else None

    def setup(self) -> None:
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.height % (2 * self.vae_scale) or self.width % (2 * self.vae_scale):
            raise ValueError(f"model.height and model.width must be multiples of {2 * self.vae_scale} "
                             f"for this VAE, got {self.height}x{self.width}")
        self.lat_h, self.lat_w = self.height // self.vae_scale, self.width // self.vae_scale
        self._ids: dict = {}

    def encode_prompt(self, prompt: str) -> dict:
        pe, pp, _ = self.pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"embeds": pe[0], "pooled": pp[0]}

    def latent_shape(self, n: int) -> tuple:
        return (n, (self.lat_h // 2) * (self.lat_w // 2), self.transformer.config.in_channels)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flux_sigmas(num_steps, (self.lat_h // 2) * (self.lat_w // 2))

    def position_ids(self, dtype, text_len: int):
        """(text ids [T, 3] zeros, image ids [L, 3]) on the device, built once per dtype and text length (no
        host->device copy per forward: CUDA graphs cannot capture one)."""
        key = (dtype, text_len)
        if key not in self._ids:
            self._ids[key] = (torch.zeros(text_len, 3, device=self.device, dtype=dtype),
                              latent_image_ids(self.lat_h // 2, self.lat_w // 2, self.device, dtype))
        return self._ids[key]

    def predict(self, net, x, sigma, emb, cfg):
        dtype, B = self.dtype, x.shape[0]
        guidance = (torch.full((B,), self.guidance_scale, device=self.device, dtype=torch.float32)
                    if net.config.guidance_embeds else None)
        txt_ids, img_ids = self.position_ids(dtype, emb["embeds"].shape[1])
        self.model_forwards += B
        return net(hidden_states=x.to(dtype), timestep=sigma, guidance=guidance,
                   pooled_projections=emb["pooled"].to(dtype), encoder_hidden_states=emb["embeds"].to(dtype),
                   txt_ids=txt_ids, img_ids=img_ids).sample.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return super().decode(unpack_latents(x, self.lat_h, self.lat_w))
