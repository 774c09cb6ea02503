"""Flow-matching text-to-image policies (SD3/SD3.5 and FLUX through diffusers) with what GRPO needs.

`FlowModel` wraps a diffusers pipeline's components and gives the trainer five things: cached prompt embeddings,
initial latents, the sigma schedule, the velocity ``v(x, sigma)`` (with classifier-free guidance as the family
uses it), and decoded images. The transformer is the policy; with LoRA (peft, through diffusers' adapter API) the
reference policy is the same transformer with its adapters disabled, otherwise a frozen copy.

Family conventions, as in the diffusers pipelines:
* SD3 (``StableDiffusion3Pipeline``): latents [B, C, h, w]; timestep input ``sigma * 1000``; CFG on the batch
  ``[uncond, cond]`` with the empty prompt as the negative, ``v = v_u + g * (v_c - v_u)`` (Flow-GRPO uses 4.5).
* FLUX (``FluxPipeline``): packed latents [B, (h/2)*(w/2), 4C]; timestep input ``sigma``; guidance-distilled, so
  ``g`` (3.5) enters through the guidance embedding and there is no CFG batch. Initial noise is drawn directly in
  the packed layout (the same distribution as the pipeline's draw-then-pack).

``model_forwards`` counts per-sample transformer evaluations (a CFG pair counts 2), sampling and training alike.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from fastgrpo.reference import lora_parameters, reference_network

from .schedules import flux_sigmas, sd3_sigmas

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(family: str, path: str, dtype: torch.dtype, seed: int = 0, tiny_vae_gain: float = 1.0):
    """A diffusers pipeline: ``path="tiny"`` builds a tiny random one (its VAE decoder's output scaled by
    ``tiny_vae_gain``: `fastgrpo.diffusion.tiny`), else ``from_pretrained`` (folder or hub id; a local-looking
    path that does not exist raises ValueError naming ``model.path``: `fastgrpo.paths`)."""
    from . import tiny

    if path == "tiny":
        build = tiny.tiny_sd3_pipeline if family == "sd3" else tiny.tiny_flux_pipeline
        pipe = build(seed, vae_gain=tiny_vae_gain)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from fastgrpo.paths import looks_local as _looks_local, model_location

    looks_local = _looks_local(path)
    where = model_location("model.path", path, kind="pipeline folder")
    if looks_local and not Path(where).is_dir():
        raise ValueError(f"model.path {path!r} does not exist (give a local pipeline folder, a hub id, or 'tiny')")
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    try:
        with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype to dtype; older ones know only this
            warnings.simplefilter("ignore", FutureWarning)
            return cls.from_pretrained(where, torch_dtype=dtype)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"model.path {path!r}: could not load a {cls.__name__} from it ({e})") from e


class FlowModel:
    def __init__(self, pipe, family: str, *, height: int, width: int, guidance_scale: float,
                 max_sequence_length: int, device: torch.device | str = "cpu"):
        if family not in ("sd3", "flux"):
            raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
        self.pipe = pipe
        self.family = family
        self.device = torch.device(device)
        self.height, self.width = height, width
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.transformer = pipe.transformer
        self.dtype = next(self.transformer.parameters()).dtype  # of the base weights (LoRA weights are fp32)
        self.vae = pipe.vae
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % (2 * self.vae_scale) or width % (2 * self.vae_scale):
            raise ValueError(f"model.height and model.width must be multiples of {2 * self.vae_scale} "
                             f"for this VAE, got {height}x{width}")
        self.lat_h, self.lat_w = height // self.vae_scale, width // self.vae_scale
        self.uses_lora = False
        self._ref_transformer = None
        self._cache: dict[str, dict] = {}
        self.model_forwards = 0
        self.compiled_blocks = 0
        self._img_ids = {}
        for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None),
                  self.vae, self.transformer):
            if m is not None:
                m.to(self.device).requires_grad_(False).eval()

    # ----------------------------------------------------------------------------------------- training set-up
    def add_lora(self, rank: int, alpha: float, targets) -> list:
        """Attach a LoRA adapter (Gaussian init, as Flow-GRPO) and return its parameters (cast to float32)."""
        from peft import LoraConfig

        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                target_modules=list(targets)))
        self.uses_lora = True
        params = lora_parameters(self.transformer)
        if not params:
            raise ValueError(f"model.lora.targets {list(targets)} matched no module of the transformer")
        return params

    def full_finetune(self, keep_reference: bool) -> list:
        """Train every transformer weight; keep a frozen copy as the reference policy when a KL is used."""
        if keep_reference:
            self._ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        self.transformer.requires_grad_(True)
        return list(self.transformer.parameters())

    @property
    def frozen_reference(self):
        """The frozen copy that serves as the reference policy in full fine-tuning with a KL, else None."""
        return self._ref_transformer

    def compile_blocks(self, **compile_kwargs) -> int:
        """Regional compilation: ``torch.compile`` each repeated block of the transformer in place (SD3's
        ``transformer_blocks``; FLUX's double- and single-stream blocks), for sampling and training alike.

        The blocks of one kind share their code, so Dynamo compiles one graph per block variant (SD3.5's dual-
        attention blocks, its last block, grad on/off) and every other block reuses it: the compile time of a few
        blocks, not of the whole model. In place (``nn.Module.compile``), so parameter names, checkpoints, LoRA
        adapters and the reference (adapters disabled: one more graph) are unchanged. The frozen copy of full
        fine-tuning is compiled too. Returns the number of blocks compiled.
        """
        import torch._dynamo

        # One graph per block variant and grad mode, plus recompilations for new chunk sizes: more than the
        # default limit of 8 per code object when the block code is shared by every block.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        n = 0
        for net in (self.transformer, self._ref_transformer):
            if net is None:
                continue
            for attr in ("transformer_blocks", "single_transformer_blocks"):
                for block in getattr(net, attr, None) or []:
                    block.compile(**compile_kwargs)
                    n += 1
        if n == 0:
            raise ValueError(f"model.compile: {type(self.transformer).__name__} has no transformer_blocks to compile")
        self.compiled_blocks = n
        return n

    def trainable_state(self) -> dict:
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def reference(self):
        """Context manager yielding the reference transformer (pass it to ``velocity(transformer=...)``)."""
        return reference_network(self.transformer, self.transformer, self._ref_transformer,
                                 uses_lora=self.uses_lora)

    # ----------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        """Embeddings for each prompt, computed once per distinct prompt and cached; stacked per sample.

        Each prompt is encoded on its own: a batched text-encoder forward rounds differently with the batch's size
        and members, so the cached embedding (and every later step) would depend on which prompts happened to be
        encoded together first (a sample preview, another process's share, a resumed run)."""
        for p in sorted({p for p in prompts if p not in self._cache}):
            if self.family == "sd3":
                pe, npe, pp, npp = self.pipe.encode_prompt(
                    prompt=[p], prompt_2=None, prompt_3=None, device=self.device,
                    do_classifier_free_guidance=True, negative_prompt=[""],
                    max_sequence_length=self.max_sequence_length)
                self._cache[p] = {"embeds": pe[0], "pooled": pp[0], "neg_embeds": npe[0], "neg_pooled": npp[0]}
            else:
                pe, pp, text_ids = self.pipe.encode_prompt(prompt=[p], prompt_2=None, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
                self._cache[p] = {"embeds": pe[0], "pooled": pp[0]}
                self._text_ids = text_ids
        return {k: torch.stack([self._cache[p][k] for p in prompts]) for k in self._cache[prompts[0]]}

    # ---------------------------------------------------------------------------------------------- latents
    def latent_shape(self, n: int) -> tuple:
        c = self.transformer.config.in_channels
        if self.family == "sd3":
            return (n, c, self.lat_h, self.lat_w)
        return (n, (self.lat_h // 2) * (self.lat_w // 2), c)

    def initial_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """float32 N(0, 1) latents drawn with the (CPU) generator, moved to the device without blocking."""
        from fastgrpo.ops.sde import standard_normal

        return standard_normal(self.latent_shape(n), generator, self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        if self.family == "sd3":
            return sd3_sigmas(num_steps, shift=self.pipe.scheduler.config.shift)
        return flux_sigmas(num_steps, (self.lat_h // 2) * (self.lat_w // 2))

    # --------------------------------------------------------------------------------------------- velocity
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, emb: dict, *, cfg: bool = True,
                 transformer=None) -> torch.Tensor:
        """v(x, sigma) in float32. ``sigma``: [B]. ``transformer``: another module to evaluate (the reference)."""
        net = transformer if transformer is not None else self.transformer
        dtype = self.dtype
        B = x.shape[0]
        sigma = sigma.to(self.device, torch.float32).reshape(B)
        if self.family == "sd3":
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
        guidance = (torch.full((B,), self.guidance_scale, device=self.device, dtype=torch.float32)
                    if net.config.guidance_embeds else None)
        img_ids = self._image_ids(dtype)
        self.model_forwards += B
        return net(hidden_states=x.to(dtype), timestep=sigma, guidance=guidance,
                   pooled_projections=emb["pooled"].to(dtype), encoder_hidden_states=emb["embeds"].to(dtype),
                   txt_ids=self._text_ids.to(self.device, dtype), img_ids=img_ids).sample.float()

    def conditional_rows(self, per_row: torch.Tensor, *, cfg: bool = True) -> torch.Tensor:
        """The conditional rows of a per-row quantity measured in one `velocity` forward (e.g. the attention
        entropy of `AttentionEntropyCollector`): with SD3's CFG the forward runs ``[uncond, cond]`` (the last half);
        FLUX has no CFG batch."""
        if self.family == "sd3" and cfg and self.guidance_scale > 1:
            return per_row[per_row.shape[0] // 2:]
        return per_row

    def _image_ids(self, dtype):
        """FLUX's image position ids [h*w, 3] on the device, built once per dtype (no host->device copy per
        forward: CUDA graphs cannot capture one)."""
        if dtype not in self._img_ids:
            h, w = self.lat_h // 2, self.lat_w // 2
            ids = torch.zeros(h, w, 3)
            ids[..., 1] += torch.arange(h)[:, None]
            ids[..., 2] += torch.arange(w)[None, :]
            self._img_ids[dtype] = ids.reshape(h * w, 3).to(self.device, dtype)
        return self._img_ids[dtype]

    # ----------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] float32 in [0, 1]."""
        if self.family == "flux":
            B, L, C = x.shape
            x = x.view(B, self.lat_h // 2, self.lat_w // 2, C // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
            x = x.reshape(B, C // 4, self.lat_h, self.lat_w)
        cfg = self.vae.config
        z = x / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)
