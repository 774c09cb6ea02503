"""The model-family protocol of the flow-matching trainers: what a family's adapter provides, and what it inherits.

A *family* (``model.family`` in a config: ``sd3``, ``flux``, ...) is one adapter module under `fastgrpo.diffusion`
holding a `FlowAdapter` subclass, plus one row of the family table (`fastgrpo.families.FAMILIES`), which also names
the trainer class. The trainers, strategies, sharding and the AEGPO collector only call the methods below; nothing
outside the adapter module compares the family string. To add a family, see the README section "How to add a model
family".

What a subclass **must** provide (class attributes and methods marked *family* below):

* ``family`` (the ``model.family`` string), ``pipeline_class`` and ``transformer_class`` (diffusers class names:
  what ``from_pretrained`` loads, and how the collector recognises the transformer), ``block_lists`` (the
  attributes of the transformer holding its repeated blocks, for regional ``torch.compile``) and ``modality``
  (``image`` or ``video``);
* `tiny_pipeline` (a random pipeline built in code, for tests and CPU demos: ``model.path: tiny``);
* `encode_prompt` (the text-encoder outputs of one prompt; cached per prompt by `encode_prompts`);
* `latent_shape`, `sigmas` (the pipeline's schedule), `predict` (one velocity forward, with classifier-free guidance
  or guidance embedding as the pipeline does it);
* for AEGPO: `entropy_processor` (the processor class that replaces a stock one on the `attention_modules`).

What it **may** override: ``lora_targets`` (the default ``model.lora.targets``; default: the joint-attention
projections), `attention_modules` (default: each joint block's ``attn``), `decode` (default: latents [B, C, h, w]
through the VAE; images [B, 3, H, W] in [0, 1], videos [B, F, 3, H, W]), `setup` (derived sizes and their checks),
`frozen_modules`, `conditional_rows` (where the conditional rows of a CFG batch are), `check_config`
(family-specific config checks, ValueError naming the key), `options_from_config`, `fsdp_block_classes` (default:
the transformer's ``_no_split_modules``), `load_pipeline` (default: ``pipeline_class.from_pretrained``).

Inherited (family-independent): LoRA (`add_lora`) and full fine-tuning (`full_finetune`) with the reference policy
(`reference`), the per-prompt embedding cache, `initial_latents`, `velocity` (counts ``model_forwards``),
`compile_blocks`, `trainable_state`.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import ClassVar

import torch

from fastgrpo.reference import lora_parameters, reference_network

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FlowAdapter:
    """A flow-matching text-to-image (or -video) policy: a diffusers pipeline's components and what GRPO needs.

    The transformer is the policy; with LoRA (peft, through diffusers' adapter API) the reference policy is the same
    transformer with its adapters disabled, otherwise a frozen copy. ``model_forwards`` counts per-sample
    transformer evaluations (a CFG pair counts 2), sampling and training alike.
    """

    kind: ClassVar[str] = "flow"  # the trainer kind (`fastgrpo.families`): flow-matching SDE rollouts
    family: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class `load_pipeline` uses
    transformer_class: ClassVar[str] = ""  # the diffusers class of its transformer (`owns`)
    # Default: Flow-GRPO's (config/grpo.py), the joint-attention projections of every dual-stream block (SD3, FLUX,
    # Qwen-Image); a family whose attention is laid out otherwise sets its own (Wan).
    lora_targets: ClassVar[tuple] = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                     "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    block_lists: ClassVar[tuple] = ("transformer_blocks",)
    # What one sample is, in words (the README's family table and messages): "image" or "video"
    modality: ClassVar[str] = "image"
    # Image editing: every prompt carries a source image (`fastgrpo.train.prompts.EditPrompt`), which `encode_prompt`
    # encodes with the text; the prompt list must then hold editing prompts, and text-to-image families refuse them
    edits_images: ClassVar[bool] = False

    def __init__(self, pipe, *, height: int, width: int, guidance_scale: float, max_sequence_length: int,
                 device: torch.device | str = "cpu", **options):
        if options:
            raise ValueError(f"{type(self).__name__} takes no option {sorted(options)[0]!r}")
        self.pipe = pipe
        self.device = torch.device(device)
        self.height, self.width = height, width
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.transformer = pipe.transformer
        self.dtype = next(self.transformer.parameters()).dtype  # of the base weights (LoRA weights are fp32)
        self.vae = pipe.vae
        self.uses_lora = False
        self._ref_transformer = None
        self._cache: dict[str, dict] = {}
        self.model_forwards = 0
        self.compiled_blocks = 0
        for m in self.frozen_modules():
            m.to(self.device).requires_grad_(False).eval()
        self.setup()

    # ------------------------------------------------------------------------------- family: class-level
    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        """*family*: a pipeline of tiny random components built in code (``model.path: tiny``)."""
        raise NotImplementedError

    @classmethod
    def load_pipeline(cls, path: str, dtype: torch.dtype, *, seed: int = 0, tiny_vae_gain: float = 1.0):
        """The diffusers pipeline: ``path="tiny"`` builds `tiny_pipeline` (its VAE decoder's output scaled by
        ``tiny_vae_gain``), else ``pipeline_class.from_pretrained`` from a folder or a hub id (a local-looking path
        that does not exist raises ValueError naming ``model.path``: `fastgrpo.paths`)."""
        if path == "tiny":
            pipe = cls.tiny_pipeline(seed, vae_gain=tiny_vae_gain)
            return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
        import diffusers

        from fastgrpo.paths import looks_local as _looks_local, model_location

        looks_local = _looks_local(path)
        where = model_location("model.path", path, kind="pipeline folder")
        if looks_local and not Path(where).is_dir():
            raise ValueError(f"model.path {path!r} does not exist (give a local pipeline folder, a hub id, or 'tiny')")
        pipeline = getattr(diffusers, cls.pipeline_class)
        try:
            with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype to dtype; older ones know only this
                warnings.simplefilter("ignore", FutureWarning)
                return pipeline.from_pretrained(where, torch_dtype=dtype)
        except (OSError, EnvironmentError) as e:
            raise ValueError(f"model.path {path!r}: could not load a {cls.pipeline_class} from it ({e})") from e

    @classmethod
    def options_from_config(cls, cfg) -> dict:
        """*may override*: the family's own constructor options read from a config (e.g. a video family's frame
        count); passed to ``__init__`` as keywords. Default: none."""
        return {}

    @classmethod
    def check_config(cls, cfg) -> None:
        """*may override*: family-specific checks of a whole config (ValueError naming the key). Default: none."""

    @classmethod
    def attention_modules(cls, transformer) -> list:
        """*may override*: the attention modules (``diffusers.models.attention_processor.Attention``) the AEGPO
        collector may replace, in layer order (``layers`` of `fastgrpo.diffusion.AttentionEntropyCollector` index
        them). Default: the joint attention ``attn`` of each of ``transformer_blocks`` (SD3, FLUX, Qwen-Image)."""
        from .attention import joint_blocks

        return [b.attn for b in joint_blocks(transformer)]

    @classmethod
    def entropy_processor(cls, processor):
        """*family*: the entropy-measuring processor class that replaces the stock ``processor`` of one of
        `attention_modules` (same outputs; `fastgrpo.diffusion.attention`), or None when ``processor`` is not the
        family's stock one (an IP-adapter, a user's own: the collector refuses it)."""
        return None

    @classmethod
    def owns(cls, transformer) -> bool:
        """Whether ``transformer`` (a diffusers model, maybe peft-wrapped) is this family's transformer."""
        base = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
        return type(base).__name__ == cls.transformer_class

    # --------------------------------------------------------------------------------- family: instance
    def setup(self) -> None:
        """*may override*: derived sizes, checked against the pipeline (ValueError naming ``model.height`` etc.)."""

    def frozen_modules(self) -> list:
        """*may override*: every module of the pipeline to move to the device and freeze (text encoders, VAE,
        transformer)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    def encode_prompt(self, prompt: str) -> dict:
        """*family*: the conditioning of one prompt, each tensor without a batch dimension (stacked per sample by
        `encode_prompts`). A family with classifier-free guidance also returns the negative prompt's."""
        raise NotImplementedError

    def latent_shape(self, n: int) -> tuple:
        """*family*: the shape of ``n`` samples' latents in the transformer's layout."""
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """*family*: float32 ``[num_steps + 1]`` sigmas, descending, ending with 0: the pipeline scheduler's."""
        raise NotImplementedError

    def predict(self, net, x: torch.Tensor, sigma: torch.Tensor, emb: dict, cfg: bool) -> torch.Tensor:
        """*family*: the velocity of ``net`` (the policy or the reference transformer) at latents ``x`` and
        ``sigma`` [B] (float32, on the device), float32, with guidance as the pipeline applies it when ``cfg``;
        adds the per-sample forwards it ran to ``self.model_forwards``."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """*may override*: images [B, 3, H, W] (videos [B, F, 3, H, W]) float32 in [0, 1] from final latents.
        Default: latents [B, C, h, w] through the VAE with its scaling and shift factors, as the pipelines do."""
        cfg = self.vae.config
        z = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)

    def conditional_rows(self, per_row: torch.Tensor, *, cfg: bool = True) -> torch.Tensor:
        """The conditional rows of a per-row quantity measured in one `predict` forward (the attention entropy of
        `AttentionEntropyCollector`). Default: every row (no CFG batch, or a family that runs CFG as separate
        forwards: the collector then reports each forward's rows; see the family's override)."""
        return per_row

    def fsdp_block_classes(self) -> set:
        """The transformer's block classes that become FSDP units (default: its ``_no_split_modules``)."""
        return set(getattr(self.transformer, "_no_split_modules", None) or ())

    # ------------------------------------------------------------------------------------ inherited
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
        """Regional compilation: ``torch.compile`` each repeated block of the transformer in place (the modules in
        the family's ``block_lists``), for sampling and training alike.

        The blocks of one kind share their code, so Dynamo compiles one graph per block variant (SD3.5's dual-
        attention blocks, its last block, grad on/off) and every other block reuses it: the compile time of a few
        blocks, not of the whole model. In place (``nn.Module.compile``), so parameter names, checkpoints, LoRA
        adapters and the reference (adapters disabled: one more graph) are unchanged. The frozen copy of full
        fine-tuning is compiled too. Returns the number of blocks compiled.

        Every flow family traces whole (no graph break; tests/test_speed_paths.py runs a compiled round of each
        family with a tiny preset against the eager one). Under AEGPO's collector the blocks holding its selected
        attention layers run uncompiled during the probes (`fastgrpo.diffusion.attention`, "Compiled blocks"), so
        the probes add no graphs.
        """
        import torch._dynamo

        # One graph per block variant and grad mode, plus recompilations for new chunk sizes (the first new batch
        # size makes the batch dimension dynamic), the frozen reference (parameters without grad) and, for FLUX's
        # single-stream blocks, a contiguous input to the first and strided ones to the rest: 8 graphs of the
        # single-stream block in an AEGPO round at FLUX.1-dev's block count, the default limit per code object.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        n = 0
        for net in (self.transformer, self._ref_transformer):
            if net is None:
                continue
            for attr in self.block_lists:
                for block in getattr(net, attr, None) or []:
                    block.compile(**compile_kwargs)
                    n += 1
        if n == 0:
            raise ValueError(f"model.compile: {type(self.transformer).__name__} has no {' / '.join(self.block_lists)} "
                             "to compile")
        self.compiled_blocks = n
        return n

    def trainable_state(self) -> dict:
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def reference(self):
        """Context manager yielding the reference transformer (pass it to ``velocity(transformer=...)``)."""
        return reference_network(self.transformer, self.transformer, self._ref_transformer,
                                 uses_lora=self.uses_lora)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        """Embeddings for each prompt, computed once per distinct prompt and cached; stacked per sample.

        Each prompt is encoded on its own: a batched text-encoder forward rounds differently with the batch's size
        and members, so the cached embedding (and every later step) would depend on which prompts happened to be
        encoded together first (a sample preview, another process's share, a resumed run)."""
        for p in sorted({p for p in prompts if p not in self._cache}):
            self._cache[p] = self.encode_prompt(p)
        return {k: torch.stack([self._cache[p][k] for p in prompts]) for k in self._cache[prompts[0]]}

    def initial_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """float32 N(0, 1) latents drawn with the (CPU) generator, moved to the device without blocking."""
        from fastgrpo.ops.sde import standard_normal

        return standard_normal(self.latent_shape(n), generator, self.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, emb: dict, *, cfg: bool = True,
                 transformer=None) -> torch.Tensor:
        """v(x, sigma) in float32. ``sigma``: [B]. ``transformer``: another module to evaluate (the reference)."""
        net = transformer if transformer is not None else self.transformer
        sigma = sigma.to(self.device, torch.float32).reshape(x.shape[0])
        return self.predict(net, x, sigma, emb, cfg)
