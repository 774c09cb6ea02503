"""The ``flux_kontext`` family: FLUX.1-Kontext image editing (``FluxKontextPipeline``, ``FluxTransformer2DModel``).

Each prompt is an instruction with a source image (`fastgrpo.train.prompts.EditPrompt`; ``prompts.source``: a JSONL
file, a folder of captioned images or ``builtin_edit``). As in diffusers' ``FluxKontextPipeline.__call__``:

* the source image is preprocessed by the pipeline's ``image_processor`` (Lanczos resize, then [-1, 1]), encoded by
  the VAE with the latent distribution's mode (``sample_mode="argmax"``), shifted and scaled
  (``(z - shift_factor) * scaling_factor``) and 2x2-packed like the latents: its tokens join the transformer's
  image sequence after the generated ones (``hidden_states = cat([latents, source_latents], dim=1)``);
* position ids: the generated tokens' FLUX ids (first coordinate 0), then the source tokens' with first
  coordinate 1; text ids zeros;
* the velocity is the output's first L rows (the generated tokens): ``noise_pred[:, :latents.size(1)]``;
* guidance-distilled: ``sample.guidance_scale`` (Kontext-dev's card and Flow-GRPO: 2.5) enters through the guidance
  embedding; no CFG batch (the pipeline's ``true_cfg_scale`` with a negative prompt is not supported);
* the schedule is FLUX's with ``mu`` from the *generated* sequence length only (``image_seq_len = latents.shape[1]``
  in the pipeline; the source tokens do not shift it): `FluxAdapter.sigmas`.

Decisions where the pipeline leaves a choice:

* **Source size.** The source is resized to the generated size, ``model.height`` x ``model.width``, as Flow-GRPO's
  Kontext trainer does (yifan123/flow_grpo flow_grpo/diffusers_patch/flux_kontext_pipeline_with_logprob.py:
  ``image_processor.resize(image, height, width)``; scripts/train_flux_kontext.py resizes the reference images to
  ``config.resolution`` first). So every prompt has the same number of source tokens (= generated tokens) and the
  embeddings of a batch stack. diffusers' pipeline instead snaps the source to the nearest of its preferred
  Kontext resolutions (``_auto_resize=True``) and the generated size to ``max_area``: our output equals the
  pipeline's called with ``height=H, width=W, max_area=H*W, _auto_resize=False`` and the source at H x W
  (tests/test_family_flux_kontext.py).
* **Caching.** The source latents are conditioning, computed once per prompt with its text embeddings by
  `encode_prompt` and cached by the adapter (``emb["source"]``, [L, 4C] packed); the VAE encoder never runs per
  step.
* **AEGPO.** Kontext's transformer is a ``FluxTransformer2DModel``, as FLUX.1's: the collector finds the ``flux``
  adapter for it (`fastgrpo.families.adapter_for_transformer`, first match), whose processors serve both. The
  entropy's queries are the *generated* image tokens only: the collector reads which image tokens have position
  id 0 in their first coordinate (`fastgrpo.diffusion.attention`), so the source tokens (id 1) are attended to but
  not averaged over. (They carry the same text attention pattern step after step less the noise: averaging them
  in would dilute Entropy(t) with conditioning tokens.)
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .flux import FluxAdapter, latent_image_ids, pack_latents


def tiny_flux_kontext_pipeline(seed: int = 0, vae_gain: float = 1.0):
    """A ``FluxKontextPipeline`` of the tiny random FLUX components (`fastgrpo.diffusion.tiny.tiny_flux_pipeline`:
    32x32 px -> 16x16x4 latents -> 64 packed tokens of 16; 2 double-stream + 1 single-stream blocks, guidance
    embedding): the same weights, Kontext's pipeline."""
    from diffusers import FluxKontextPipeline

    from .tiny import tiny_flux_pipeline

    return FluxKontextPipeline(**tiny_flux_pipeline(seed, vae_gain=vae_gain).components)


class FluxKontextAdapter(FluxAdapter):
    family: ClassVar[str] = "flux_kontext"
    pipeline_class: ClassVar[str] = "FluxKontextPipeline"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    edits_images: ClassVar[bool] = True

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        return tiny_flux_kontext_pipeline(seed, vae_gain=vae_gain)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.prompts.source == "builtin":
            raise ValueError("prompts.source 'builtin' holds text prompts without source images, but model.family "
                             "flux_kontext edits images: give a JSONL file of {\"prompt\": ..., \"image\": path} rows, "
                             "a folder of images with same-named .txt captions, or builtin_edit")

    def setup(self) -> None:
        super().setup()
        self.image_processor = getattr(self.pipe, "image_processor", None)
        if self.image_processor is None:
            from diffusers.image_processor import VaeImageProcessor

            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale * 2)

    def encode_prompt(self, prompt: str) -> dict:
        from fastgrpo.train.prompts import EditPrompt

        if not isinstance(prompt, EditPrompt):
            raise ValueError(f"model.family flux_kontext edits images: prompt {str(prompt)!r} has no source image "
                             "(prompts.source: a JSONL file, a folder of captioned images, or builtin_edit)")
        out = super().encode_prompt(str(prompt))
        out["source"] = self.encode_source(prompt.load())
        return out

    @torch.no_grad()
    def encode_source(self, image) -> torch.Tensor:
        """Packed source latents [L, 4C] of one image (a ``PIL.Image`` or what ``VaeImageProcessor.preprocess``
        takes), at the generated size, as ``FluxKontextPipeline.prepare_latents`` makes them."""
        pixels = self.image_processor.preprocess(image, self.height, self.width)
        pixels = pixels.to(self.device, self.vae.dtype)
        z = self.vae.encode(pixels).latent_dist.mode()
        cfg = self.vae.config
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        return pack_latents(z)[0]

    def position_ids(self, dtype, text_len: int):
        """(text ids [T, 3] zeros, image ids [2L, 3]: the generated tokens' (first coordinate 0), then the source
        tokens' (first coordinate 1)), built once per dtype and text length."""
        key = (dtype, text_len)
        if key not in self._ids:
            h, w = self.lat_h // 2, self.lat_w // 2
            self._ids[key] = (torch.zeros(text_len, 3, device=self.device, dtype=dtype),
                              torch.cat([latent_image_ids(h, w, self.device, dtype),
                                         latent_image_ids(h, w, self.device, dtype, index=1.0)]))
        return self._ids[key]

    def predict(self, net, x, sigma, emb, cfg):
        dtype, (B, L) = self.dtype, x.shape[:2]
        guidance = (torch.full((B,), self.guidance_scale, device=self.device, dtype=torch.float32)
                    if net.config.guidance_embeds else None)
        txt_ids, img_ids = self.position_ids(dtype, emb["embeds"].shape[1])
        hidden = torch.cat([x.to(dtype), emb["source"].to(dtype)], dim=1)
        self.model_forwards += B
        out = net(hidden_states=hidden, timestep=sigma, guidance=guidance,
                  pooled_projections=emb["pooled"].to(dtype), encoder_hidden_states=emb["embeds"].to(dtype),
                  txt_ids=txt_ids, img_ids=img_ids).sample
        return out[:, :L].float()
