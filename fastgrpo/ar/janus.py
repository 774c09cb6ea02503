"""Janus(-Pro) text-to-image policies through transformers, with what autoregressive GRPO needs.

`JanusPolicy` wraps a ``JanusForConditionalGeneration`` and its tokenizer and gives the trainer:

* **two-stage rollouts** as T2I-R1 does them (Jiang et al. 2025, arXiv 2505.00703, §3): `sample_cot` samples a
  textual chain of thought (CoT) from the reasoning template with ``lm_head``; `sample_image_tokens` then samples
  the image tokens from the image template (the prompt and the CoT, ending with ``<begin_of_image>``) with the
  generation head and classifier-free guidance; `decode` turns them into images with the VQ decoder;
* the **teacher-forced forward** on the conditional prompts only (`teacher_forced_logits`): text logits from
  ``lm_head`` over the CoT tokens and image logits from the generation head over the image tokens, each computed
  on just the positions that predict a sampled token (never over the prompt);
* the **reference policy** for the KL (`reference`): the language model with its LoRA adapters disabled, or a
  frozen copy of the language model and ``lm_head`` for full fine-tuning.

Sampling (both stages): temperature ``T`` (1 in T2I-R1), a KV cache (``transformers.DynamicCache``), left-padded
prompts with position ids counted over the real tokens. Every draw is by inverse CDF from uniforms drawn up front
on the CPU (`_uniforms`): from one ``torch.Generator`` for the batch, or one per row (the trainer's, keyed by the
sample's global index), in which case a row's tokens do not depend on the other rows of its batch, and a resumed
run replays the same rollouts. Classifier-free guidance for image tokens, as Janus does it
(deepseek-ai/Janus ``generation_inference.py``; transformers' ``JanusForConditionalGeneration.generate``): the
batch is doubled, the unconditional rows are the image prompt with every token except BOS and
``<begin_of_image>`` replaced by the pad token, and ``logits = l_u + w (l_c - l_u)`` on the generation head's
logits (w = 5 in T2I-R1 / EG-GRPO), then ``softmax(logits / T)``.

Decisions where DESIGN.md is silent (written down here, as it asks):

* BOS is prepended by this module (templates are tokenised with ``add_special_tokens=False``), so a tokenizer that
  adds BOS itself (Janus-Pro's) and the tiny one behave alike. The CoT ends at the first EOS, which is kept as a
  trained token (TRL's completion mask); rows stop independently and the CoT is cut at ``cot_max_tokens``.
* The image template receives the CoT as decoded text (``skip_special_tokens``) and is tokenised again, as T2I-R1
  builds its image prompt from the generated description; the CoT's log-probs are taken in the reasoning context,
  where it was sampled.
* The old log-probs stored at sampling time are the **conditional** ones (text: the sampling distribution itself;
  image: the conditional rows' logits before guidance), i.e. the quantity the training forward recomputes, so the
  first importance ratio is 1 up to float error. The sampled image distribution itself is the guided one; training
  on the conditional logits only is what the reference trainers do.
* ``model_forwards`` counts per-sequence language-model evaluations: a decoding step over b rows adds b (a CFG pair
  counts 2), a teacher-forced forward over b sequences adds b.
* The trainable parts follow the reference: the language model (with its token embeddings) and ``lm_head``; the
  vision tower and aligner, the VQ model, and the generation embeddings / aligner / head stay frozen. LoRA goes on
  the language model's attention projections only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo.reference import lora_parameters, reference_network

from .tiny import BOI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA targets on the Llama language model (every attention projection).
JANUS_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_janus(path: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer): ``path="tiny"`` builds `fastgrpo.ar.tiny.tiny_janus`; otherwise ``from_pretrained`` from
    a local folder or a hub id (a ``JanusForConditionalGeneration`` checkpoint with its tokenizer, e.g.
    ``deepseek-community/Janus-Pro-7B``). A missing folder raises ValueError naming ``model.path``."""
    if path == "tiny":
        from .tiny import tiny_janus

        model, tok = tiny_janus(seed)
        return (model if dtype == torch.float32 else model.to(dtype)), tok
    from fastgrpo.paths import looks_local as _looks_local, model_location

    looks_local = _looks_local(path)
    where = model_location("model.path", path, kind="Janus checkpoint folder")
    if looks_local and not Path(where).is_dir():
        raise ValueError(f"model.path {path!r} does not exist (give a local Janus checkpoint folder, a hub id, "
                         "or 'tiny')")
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    try:
        model = JanusForConditionalGeneration.from_pretrained(where, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"model.path {path!r}: could not load a JanusForConditionalGeneration and its tokenizer "
                         f"from it ({e})") from e
    return model.eval(), tok


@dataclass
class LMParts:
    """The trainable half of Janus: what the policy and its reference differ in."""

    language_model: torch.nn.Module
    lm_head: torch.nn.Module


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and attention mask, left-padded (the prompts end where decoding starts)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return ids.to(device), mask.to(device)


def _attention_mask(lm, mask: torch.Tensor, q_length: int) -> torch.Tensor:
    """The attention mask for a forward of ``lm`` over the last ``q_length`` positions of the 2-D padding ``mask``
    [B, K] (the earlier ones cached): under SDPA the 4-D bool mask [B, 1, q_length, K] (causal and not padding)
    that transformers would build itself, which it takes as given; transformers' own construction first reads the
    mask on the host (whether any token is padding, to use SDPA's ``is_causal`` or no mask instead), a device sync
    per forward (per generated token) on CUDA. Other attention implementations get ``mask`` unchanged."""
    if getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return mask
    K = mask.shape[1]
    kv = torch.arange(K, device=mask.device)
    causal = kv[None, :] <= kv[K - q_length:, None]
    return causal[None, None] & mask.bool()[:, None, None, :]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens (left padding gets position 0)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


class JanusPolicy:
    """The ``janus`` family's adapter (`fastgrpo.families`): Janus / Janus-Pro through transformers."""

    kind = "ar"  # token-by-token rollouts: the trainer `fastgrpo.train.ar.ARTrainer`, the strategies of kind "ar"
    family = "janus"
    lora_targets = tuple(JANUS_LORA_TARGETS)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Janus-specific checks of a whole config (ValueError naming the key)."""
        if not cfg.sample.guidance_scale > 1:
            raise ValueError(f"sample.guidance_scale must be > 1 for model.family janus: Janus samples image tokens "
                             f"with classifier-free guidance (T2I-R1 / EG-GRPO use 5), got {cfg.sample.guidance_scale}")

    def fsdp_block_classes(self) -> set:
        """None: FSDP is not implemented for token-by-token rollouts (`fastgrpo.train.sharding`)."""
        return set()

    def __init__(self, model, tokenizer, *, image_tokens: int, cot_max_tokens: int, cfg_weight: float,
                 temperature: float = 1.0, cot_template: str = "{prompt}", image_template: str = "{prompt} {cot}",
                 device: torch.device | str = "cpu"):
        grid = model.config.vq_config.num_patches
        if image_tokens != grid * grid:
            raise ValueError(f"ar.image_tokens={image_tokens} does not match the model's config: its VQ decoder "
                             f"takes {grid}x{grid} = {grid * grid} image tokens (vq_config.num_patches = {grid})")
        if not cfg_weight > 1:
            raise ValueError(f"cfg_weight (sample.guidance_scale) must be > 1: Janus samples image tokens with "
                             f"classifier-free guidance (T2I-R1 / EG-GRPO use 5), got {cfg_weight}")
        if cot_max_tokens < 1:
            raise ValueError(f"cot_max_tokens (ar.cot_max_tokens) must be >= 1, got {cot_max_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature (ar.temperature) must be > 0, got {temperature}")
        for key, tpl, fields in (("cot_template", cot_template, ("{prompt}",)),
                                 ("image_template", image_template, ("{prompt}", "{cot}"))):
            missing = [f for f in fields if f not in tpl]
            if missing:
                raise ValueError(f"ar.{key} must contain {' and '.join(fields)}, missing {', '.join(missing)}")
        self.model, self.tok = model, tokenizer
        self.device = torch.device(device)
        self.image_tokens, self.cot_max_tokens = image_tokens, cot_max_tokens
        self.cfg_weight, self.temperature = float(cfg_weight), float(temperature)
        self.cot_template, self.image_template = cot_template, image_template
        self.ids = self._special_ids(tokenizer)
        self.text_vocab = model.config.text_config.vocab_size
        self.image_vocab = model.config.vq_config.num_embeddings
        self.uses_lora = False
        self._ref: LMParts | None = None
        self.model_forwards = 0
        model.to(self.device).requires_grad_(False).eval()
        self.parts = LMParts(model.model.language_model, model.lm_head)

    @staticmethod
    def _special_ids(tok) -> dict:
        ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
               "boi": tok.convert_tokens_to_ids(BOI)}
        if ids["boi"] is None or ids["boi"] == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no {BOI} token: is model.path a Janus checkpoint?")
        missing = [k for k in ("bos", "eos", "pad") if ids[k] is None]
        if missing:
            raise ValueError(f"the tokenizer defines no {', '.join(missing)} token (Janus needs BOS, EOS and pad)")
        return ids

    # ----------------------------------------------------------------------------------------- training set-up
    def add_lora(self, rank: int, alpha: float, targets) -> list:
        """LoRA (peft, default init: the adapter starts at zero) on the language model's modules named ``targets``
        (module-name suffixes, e.g. ``q_proj``); returns its parameters (float32)."""
        from peft import LoraConfig

        pattern = r"model\.language_model\..*\.(" + "|".join(map(str, targets)) + ")"
        try:
            self.model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern))
        except ValueError as e:
            raise ValueError(f"model.lora.targets {list(targets)} matched no module of the Janus language model "
                             f"(e.g. {JANUS_LORA_TARGETS}): {e}") from e
        self.uses_lora = True
        return lora_parameters(self.model)

    def full_finetune(self, keep_reference: bool) -> list:
        """Train the language model and ``lm_head``; keep a frozen copy of both as the reference when a KL is used."""
        if keep_reference:
            self._ref = LMParts(copy.deepcopy(self.parts.language_model).requires_grad_(False).eval(),
                                copy.deepcopy(self.parts.lm_head).requires_grad_(False).eval())
        self.parts.language_model.requires_grad_(True)
        self.parts.lm_head.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def train_mode(self, on: bool) -> None:
        self.parts.language_model.train(on)
        self.parts.lm_head.train(on)

    def reference(self):
        """Context manager: within the block, the yielded `LMParts` evaluate the reference policy."""
        return reference_network(self.model, self.parts, self._ref, uses_lora=self.uses_lora)

    # ----------------------------------------------------------------------------------------------- prompts
    def _encode(self, text: str) -> list[int]:
        return [self.ids["bos"]] + self.tok(text, add_special_tokens=False)["input_ids"]

    def cot_prompt_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _left_pad([self._encode(self.cot_template.format(prompt=p)) for p in prompts], self.ids["pad"],
                         self.device)

    def image_prompt_ids(self, prompts: list[str], cots: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._encode(self.image_template.format(prompt=p, cot=c)) + [self.ids["boi"]]
                for p, c in zip(prompts, cots)]
        return _left_pad(rows, self.ids["pad"], self.device)

    def unconditional_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The CFG rows: every token but BOS and ``<begin_of_image>`` replaced by pad (padding stays padding)."""
        keep = (ids == self.ids["bos"]) | (ids == self.ids["boi"])
        return torch.where(keep, ids, torch.full_like(ids, self.ids["pad"]))

    def decode_cots(self, cot_ids: torch.Tensor, cot_mask: torch.Tensor) -> list[str]:
        return [self.tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(cot_ids, cot_mask)]

    # ---------------------------------------------------------------------------------------------- sampling
    def _lm_step(self, lm, embeds, mask, pos, cache):
        out = lm(inputs_embeds=embeds, attention_mask=_attention_mask(lm, mask, embeds.shape[1]), position_ids=pos,
                 past_key_values=cache, use_cache=True)
        self.model_forwards += embeds.shape[0]
        return out.last_hidden_state[:, -1], out.past_key_values

    def _draw(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One token per row from ``softmax(logits / T)`` by inverse CDF at the row's uniform ``u`` [B] in [0, 1):
        the first token whose cumulative probability exceeds ``u`` times the total (never a zero-probability
        token)."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        cdf = probs.cumsum(-1)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).squeeze(-1)
        return tok.clamp_max(cdf.shape[-1] - 1)

    def _uniforms(self, gen, batch: int, length: int) -> torch.Tensor:
        """[batch, length] float32 uniforms on the device, drawn on the CPU and copied once without blocking:
        from ``gen`` (one `torch.Generator` for the batch) or ``gen[b]`` for row b (a list of ``batch``
        generators)."""
        from fastgrpo.diffusion.graphs import to_device

        if isinstance(gen, torch.Generator):
            u = torch.rand(batch, length, generator=gen)
        else:
            gens = list(gen)
            if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
                raise ValueError(f"gen must be a torch.Generator or a list of {batch} (one per prompt), got "
                                 f"{type(gen).__name__} of {len(gens)}")
            u = torch.stack([torch.rand(length, generator=g) for g in gens])
        return to_device(u, self.device)

    @torch.no_grad()
    def sample_cot(self, prompts: list[str], gen) -> dict:
        """Stage 1: the textual CoT. Returns ``prompt_ids, prompt_mask`` [B, P] (left-padded), ``cot_ids,
        cot_mask`` [B, C] (pad after the first EOS, which is kept) and ``cot_old_logp`` [B, C] (float32).
        ``gen``: a `torch.Generator`, or one per prompt; ``cot_max_tokens`` uniforms per row are drawn whether or
        not the row stops early, so what a generator draws next does not depend on where EOS fell."""
        from transformers import DynamicCache

        lm, head = self.parts.language_model, self.parts.lm_head
        ids, mask = self.cot_prompt_ids(prompts)
        B = ids.shape[0]
        u = self._uniforms(gen, B, self.cot_max_tokens)
        pos = _positions(mask)
        h, cache = self._lm_step(lm, lm.embed_tokens(ids), mask, pos, DynamicCache())
        toks, lps, alive = [], [], []
        running = torch.ones(B, dtype=torch.bool, device=self.device)
        for t in range(self.cot_max_tokens):
            logits = head(h).float()
            tok = self._draw(logits, u[:, t])
            lp = torch.log_softmax(logits / self.temperature, -1).gather(-1, tok[:, None]).squeeze(-1)
            toks.append(torch.where(running, tok, torch.full_like(tok, self.ids["pad"])))
            lps.append(torch.where(running, lp, torch.zeros_like(lp)))
            alive.append(running.clone())
            running = running & (tok != self.ids["eos"])
            if not running.any() or len(toks) == self.cot_max_tokens:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            h, cache = self._lm_step(lm, lm.embed_tokens(toks[-1][:, None]), mask, pos, cache)
        return {"prompt_ids": ids, "prompt_mask": mask[:, :ids.shape[1]], "cot_ids": torch.stack(toks, 1),
                "cot_mask": torch.stack(alive, 1), "cot_old_logp": torch.stack(lps, 1)}

    @torch.no_grad()
    def sample_image_tokens(self, prompts: list[str], cots: list[str], gen) -> dict:
        """Stage 2: ``image_tokens`` tokens with CFG. Returns ``image_prompt_ids, image_prompt_mask`` [B, Q],
        ``image_ids`` [B, N] and ``image_old_logp`` [B, N] (conditional log-probs, float32). ``gen``: a
        `torch.Generator`, or one per prompt."""
        from transformers import DynamicCache

        lm = self.parts.language_model
        ids, mask = self.image_prompt_ids(prompts, cots)
        B = ids.shape[0]
        u = self._uniforms(gen, B, self.image_tokens)
        both = torch.cat([ids, self.unconditional_ids(ids)])
        mask2 = torch.cat([mask, mask])
        pos = _positions(mask2)
        h, cache = self._lm_step(lm, lm.embed_tokens(both), mask2, pos, DynamicCache())
        toks, lps = [], []
        for i in range(self.image_tokens):
            cond, uncond = self.model.model.generation_head(h).float().chunk(2)
            tok = self._draw(uncond + self.cfg_weight * (cond - uncond), u[:, i])
            lps.append(torch.log_softmax(cond / self.temperature, -1).gather(-1, tok[:, None]).squeeze(-1))
            toks.append(tok)
            if i + 1 == self.image_tokens:
                break
            mask2 = torch.cat([mask2, torch.ones(2 * B, 1, dtype=mask2.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            emb = self.model.prepare_embeddings_for_image_generation(torch.cat([tok, tok])[:, None])
            h, cache = self._lm_step(lm, emb, mask2, pos, cache)
        return {"image_prompt_ids": ids, "image_prompt_mask": mask, "image_ids": torch.stack(toks, 1),
                "image_old_logp": torch.stack(lps, 1)}

    @torch.no_grad()
    def decode(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] float32 in [0, 1] from the VQ decoder (which outputs [-1, 1])."""
        x = self.model.model.vqmodel.decode(image_ids.to(self.device))
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------ teacher forcing
    def teacher_forced_logits(self, data: dict, parts: LMParts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional logits that predict the sampled tokens: text [B, C, V_text] over the CoT (``lm_head``, in the
        reasoning context) and image [B, N, V_image] over the image tokens (generation head, in the image context).
        ``parts``: the `LMParts` to evaluate (default the policy's; `reference` yields the reference's)."""
        parts = parts if parts is not None else self.parts
        lm = parts.language_model
        P, C = data["prompt_ids"].shape[1], data["cot_ids"].shape[1]
        ids = torch.cat([data["prompt_ids"], data["cot_ids"]], 1)
        mask = torch.cat([data["prompt_mask"], data["cot_mask"].long()], 1)
        h = lm(inputs_embeds=lm.embed_tokens(ids), attention_mask=_attention_mask(lm, mask, mask.shape[1]),
               position_ids=_positions(mask)).last_hidden_state
        text_logits = parts.lm_head(h[:, P - 1:P + C - 1])
        Q, N = data["image_prompt_ids"].shape[1], data["image_ids"].shape[1]
        img = data["image_ids"][:, :-1]
        emb = torch.cat([lm.embed_tokens(data["image_prompt_ids"]),
                         self.model.prepare_embeddings_for_image_generation(img).to(h.dtype)], 1)
        mask = torch.cat([data["image_prompt_mask"], torch.ones_like(img)], 1)
        h = lm(inputs_embeds=emb, attention_mask=_attention_mask(lm, mask, mask.shape[1]),
               position_ids=_positions(mask)).last_hidden_state
        image_logits = self.model.model.generation_head(h[:, Q - 1:Q + N - 1])
        self.model_forwards += 2 * ids.shape[0]
        return text_logits, image_logits
