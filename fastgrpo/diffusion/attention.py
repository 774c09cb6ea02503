"""Attention processors that measure AEGPO's Entropy(t), and the collector that installs them (DESIGN.md §3.3).

`AttentionEntropyCollector(transformer, layers=(5, 10, 15), mode="mixture")` is a context manager. Inside it, the
joint attention of the selected blocks (``transformer.transformer_blocks[i].attn``) runs through
`fastgrpo.attention_with_text_entropy` instead of SDPA, and after every forward of the transformer
``collector.pop()`` returns that forward's Entropy(t) per sample, in bits (AEGPO eq. 1-4)::

    with AttentionEntropyCollector(transformer, layers=(5, 10, 15)) as collector:
        for t in timesteps:
            v = transformer(latents, encoder_hidden_states=..., timestep=t, ...).sample
            entropy_t = collector.pop()          # float32 [B], bits
            ...

Supported models: the flow families of `fastgrpo.families`. The collector finds the family by the transformer's class
(`FlowAdapter.owns`), takes the attention layers ``layers`` index from its adapter (`FlowAdapter.attention_modules`)
and installs the adapter's entropy processor in place of each selected layer's stock one
(`FlowAdapter.entropy_processor`). The processors of SD3 and FLUX are here:

* SD3 / SD3.5 (`SD3Transformer2DModel`, ``JointAttnProcessor2_0``): sequence = image tokens, then text tokens,
  layout [B, H, S, D]; qk-norm (``norm_q``/``norm_k``, ``norm_added_q``/``norm_added_k``) as in diffusers; the last
  block's ``context_pre_only`` (no ``to_add_out``). SD3.5's ``attn2`` (image-only self-attention) and every other
  block keep their processors.
* FLUX (`FluxTransformer2DModel`, ``FluxAttnProcessor``): sequence = text tokens, then image tokens, layout
  [B, S, H, D]; qk-norm, then RoPE (``image_rotary_emb``) on the joint sequence, as in diffusers. ``layers`` index
  the double-stream blocks (``transformer_blocks``); the single-stream blocks are untouched. FLUX.1-Kontext (the
  same transformer class, the same processors) appends the source image's tokens to the image sequence with
  position ids whose first coordinate is 1: the queries are then the generated image tokens only (first coordinate
  0, which must come first), read from the forward's ``img_ids`` (once per ids tensor: no sync per forward); the
  source tokens are attended to but not averaged over.

Other families keep their processor in their adapter module (Qwen-Image: `fastgrpo.diffusion.qwen_image`; Wan2.1:
`fastgrpo.diffusion.wan`, whose cross-attention ``blocks[i].attn2`` has no joint sequence: its processor passes
``cross=True`` to ``_attend``, and the statistics come from the torch path of
`fastgrpo.ops.attention.TextEntropyPlan` with ``cross=True``, the kernels taking joint self-attention only). A family
whose text keys carry padding (a key mask) reports its statistics through `AttentionEntropyCollector._record_masked`
(eager, padded keys excluded) instead of the kernel, which has no mask.

Modes: ``"mixture"`` is the paper's definition (average the text-key probabilities over the selected layers and
heads, renormalise over the text keys, entropy, mean over image queries): each layer adds its head-summed
probabilities into one float32 [B, N, T] buffer (`text_attention_probs`; the first layer of a forward writes it).
``"head_mean"`` averages the per-head, per-layer text entropies instead (no buffer; a mean of entropies, not the
entropy of the mean).

Decisions where DESIGN.md is silent:

* Only the stock processors are replaced (``JointAttnProcessor2_0`` / ``FluxAttnProcessor``, exact types): any other
  processor on a selected block (IP-adapter, PAG, a user's own) raises ValueError, since replacing it would change
  the model. peft LoRA adapters live in the projection layers, which the processors call, so they are honoured.
* ``attention_mask``: SD3's processor ignores it, and so do we; FLUX's processor applies it, and ours raises
  ValueError (the kernel has no mask).
* Passes with grad enabled and inputs that require grad (training) compute the block output with SDPA (so it is
  differentiable, as before) and the entropy from detached q, k with the forward-only op.
* ``pop()`` is first in, first out: each transformer forward inside the context appends one result; popping with
  none pending raises RuntimeError. Calls of the processors outside a transformer forward (e.g. recomputation by
  gradient checkpointing during backward) record nothing.
* ``impl="auto"``: the Triton kernels on CUDA, the torch path on CPU (``impl`` forces one).
* **Compiled blocks** (``model.compile``: `FlowAdapter.compile_blocks` compiles each block in place): inside the
  context the blocks that hold a selected layer run **uncompiled** (their ``nn.Module.compile`` wrapper is set
  aside on enter and put back on exit); every other block keeps its compiled graphs. Traced by Dynamo, the entropy
  processors would specialise the block's graph on their Python state (the layer index, the collector's plan cache,
  whether a layer is the forward's first), so each selected layer would compile graphs of its own (policy and
  reference): measured on FLUX.1-dev's block count (19 double-stream blocks, ``layers`` 5, 10, 15, aot_eager),
  14 graphs of the double-stream block in the first round instead of 6, past Dynamo's default limit of 8 per
  code object, and more with every layer added; on CUDA the trace would also have to go through the Triton
  launchers. Eager selected blocks add no graph whatever ``layers`` is, cost nothing when the model is not
  compiled, and are a small share of the work: a few blocks of one probe trajectory per prompt.
* Host cost (issue 19: at batch 2 the SD3.5-Medium forward is host-bound, so every host op shows in its time):
  the ops' checks run once per q/k/v geometry (`fastgrpo.ops.attention.TextEntropyPlan`, kept by the collector),
  not per call; a no-grad pass takes no detach and no extra no_grad context. Per selected layer on the Triton
  backend: one output allocation (in [B, S, H, D] order, so SD3's reshape after it is a view, as after SDPA's
  flash kernel) and two kernel launches ("head_mean": one). Per forward: one statistics buffer (lse, text lse,
  and in "head_mean" one text-entropy row per layer, reduced once at the end), one uninitialised [B, N, T] buffer
  that the first layer writes and the others add to in-kernel, and Entropy(t) from it (a few small ops). Nothing
  reads device data on the host (no sync); the checks that remain (layers seen, a block run twice) use Python
  state only. The non-selected blocks keep diffusers' processors: the collector does no work there. Constructing
  a collector walks the model breadth-first only as far as the selected layers, to find their ancestors (for the
  compiled-block check), and builds no module names (0.08 ms on SD3.5-Medium's 1,041 modules, where a named walk
  costs 0.9 ms: bench/test_bench_collector.py constructs one per forward).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastgrpo.ops.attention import TextEntropyPlan, text_entropy_from_probs
from fastgrpo.ops._backend import IMPLS

MODES = ("mixture", "head_mean")
_LN2 = math.log(2.0)


def joint_blocks(transformer):
    """The joint (double-stream) blocks (``transformer_blocks``) of a transformer, looking through a peft wrapper."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None and hasattr(transformer, "get_base_model"):
        blocks = getattr(transformer.get_base_model(), "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks")
    return blocks


def _paths_to(root, targets) -> dict:
    """For each module of ``targets`` inside ``root``: the modules from ``root`` down to it (both included), keyed
    by ``id(target)``. A breadth-first walk over the child dicts that stops once every target is found: attention
    layers sit a few levels down (``transformer_blocks[i].attn``), so it expands the blocks, not their contents,
    and builds no names (``named_modules`` over SD3.5-Medium's 1,041 modules costs about 1 ms of host time)."""
    wanted = {id(t) for t in targets}
    parent = {id(root): None}
    level = [root]
    found = [root] if id(root) in wanted else []
    while level and len(found) < len(wanted):
        nxt = []
        for module in level:
            if len(found) == len(wanted):
                break
            for child in module._modules.values():
                if child is None or id(child) in parent:
                    continue
                parent[id(child)] = module
                nxt.append(child)
                if id(child) in wanted:
                    found.append(child)
        level = nxt
    paths = {}
    for t in found:
        chain = [t]
        while parent[id(chain[-1])] is not None:
            chain.append(parent[id(chain[-1])])
        paths[id(t)] = chain[::-1]
    return paths


class _EntropyAttnProcessor:
    """Shared part of the two processors: attention through the entropy op, and the report to the collector."""

    def __init__(self, collector: "AttentionEntropyCollector", layer: int):
        self.collector = collector
        self.layer = layer

    def _attend(self, q, k, v, *, layout, text_start, text_len, image_start, image_len, cross=False):
        """``cross``: k, v are a sequence of their own (cross-attention: every key a text key), not q's."""
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return self._attend_training(q, k, v, layout=layout, text_start=text_start, text_len=text_len,
                                         image_start=image_start, image_len=image_len, cross=cross)
        return self.collector._attend(self.layer, q, k, v, layout, text_start, text_len, image_start, image_len,
                                      cross)

    def _attend_training(self, q, k, v, *, layout, text_start, text_len, image_start, image_len, cross=False):
        """Grad-enabled pass: the block output from SDPA (differentiable), the statistics from detached q, k."""
        with torch.no_grad():
            self.collector._attend(self.layer, q.detach(), k.detach(), v.detach(), layout, text_start, text_len,
                                   image_start, image_len, cross)
        if layout == "bhsd":
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class SD3EntropyAttnProcessor(_EntropyAttnProcessor):
    """``JointAttnProcessor2_0`` semantics (SD3/SD3.5 joint blocks), attention through the entropy op."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(f"encoder_hidden_states is None in joint block {self.layer}: the entropy processor "
                             "needs the text tokens")
        B, n_image = hidden_states.shape[0], hidden_states.shape[1]
        n_text = encoder_hidden_states.shape[1]
        heads = attn.heads

        def split(x):  # [B, L, H*D] -> [B, H, L, D]
            return x.view(B, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        tq = split(attn.add_q_proj(encoder_hidden_states))
        tk = split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], dim=2), torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)

        out = self._attend(q, k, v, layout="bhsd", text_start=n_image, text_len=n_text, image_start=0,
                           image_len=n_image)
        out = out.transpose(1, 2).reshape(B, n_image + n_text, -1).to(q.dtype)
        image_out, text_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, text_out


class FluxEntropyAttnProcessor(_EntropyAttnProcessor):
    """``FluxAttnProcessor`` semantics (FLUX double-stream blocks), attention through the entropy op."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError(f"encoder_hidden_states is None in double-stream block {self.layer}: the entropy "
                             "processor needs the text tokens")
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by the entropy processor (the kernel has no mask); "
                             "run without AttentionEntropyCollector when masking")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            tq, tk, tv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            tq = attn.add_q_proj(encoder_hidden_states)
            tk = attn.add_k_proj(encoder_hidden_states)
            tv = attn.add_v_proj(encoder_hidden_states)
        split = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, L, H*D] -> [B, L, H, D]
        q, k, v = attn.norm_q(split(q)), attn.norm_k(split(k)), split(v)
        tq, tk, tv = attn.norm_added_q(split(tq)), attn.norm_added_k(split(tk)), split(tv)
        q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        n_text = encoder_hidden_states.shape[1]
        n_image = hidden_states.shape[1]
        # Queries: the generated image tokens (FLUX.1-Kontext appends its source image's tokens: keys only)
        n_query = self.collector._generated if self.collector._generated is not None else n_image
        out = self._attend(q, k, v, layout="bshd", text_start=0, text_len=n_text, image_start=n_text,
                           image_len=n_query)
        out = out.flatten(2, 3).to(q.dtype)
        text_out, image_out = out[:, :n_text], out[:, n_text:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


class AttentionEntropyCollector:
    """Measure AEGPO's Entropy(t) (bits, per sample) on every forward of a flow family's transformer.

    Args:
        transformer: the diffusers transformer of a flow family (``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``, ``WanTransformer3DModel``, ...; peft adapters allowed).
        layers: indices into the family's attention layers (`FlowAdapter.attention_modules`: for SD3 and FLUX the
            joint / double-stream blocks ``transformer.transformer_blocks[i].attn``, for Wan the cross-attention
            ``transformer.blocks[i].attn2``); AEGPO uses (5, 10, 15).
        mode: "mixture" (the paper: entropy of the layer- and head-averaged text attention) or "head_mean"
            (mean of per-head entropies).
        impl: "auto" | "triton" | "torch", passed to the ops.

    Use as a context manager; ``pop()`` after each forward (see the module docstring).
    """

    # Processors to install instead of the family's own (`FlowAdapter.entropy_processor`), by model.family: a
    # subclass may swap them (bench/'s eager map extraction).
    processor_classes: dict = {}

    def __init__(self, transformer, layers: Sequence[int] = (5, 10, 15), mode: str = "mixture", impl: str = "auto"):
        from fastgrpo.families import FAMILIES, adapter_for_transformer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        adapter = adapter_for_transformer(transformer)
        if adapter is None:
            known = [f.adapter_class().transformer_class for f in FAMILIES.values() if f.kind == "flow"]
            raise ValueError(f"transformer must be a diffusers transformer of a flow family ({', '.join(known)}), "
                             f"got {type(transformer).__name__}")
        blocks = adapter.attention_modules(transformer)
        if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers must be a sequence of block indices (ints), got {layers!r}")
        layers = tuple(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty sequence of distinct block indices, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the transformer has {len(blocks)} joint blocks "
                             f"({adapter.family}: {len(blocks)} attention layers the collector can read)")
        # Every module on the path from the transformer to a selected layer (the candidates `__enter__` checks for
        # an in-place compiled call: the block, or the whole transformer). No walk over the whole model: the
        # benchmark constructs a collector per forward, where 1 ms of host time is 2% of a batch-2 forward.
        chains = _paths_to(transformer, [blocks[i] for i in layers])
        self._ancestors = list({id(m): m for chain in chains.values() for m in chain}.values())
        self._classes = {}
        for i in layers:
            proc = blocks[i].processor
            stock = adapter.entropy_processor(proc)
            if stock is None:
                names = {id(m): n for n, m in transformer.named_modules()}  # for the message only
                where = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]",
                               names.get(id(blocks[i]), f"layer {i}").removeprefix("base_model.model."))
                raise ValueError(f"layers: {where} uses {type(proc).__name__}; the collector replaces only the "
                                 f"stock attention processor of {adapter.family} ({adapter.transformer_class})")
            self._classes[i] = self.processor_classes.get(adapter.family, stock)
        self.transformer = transformer
        self.layers = layers
        self.mode = mode
        self.impl = impl
        self.family = adapter.family
        self._blocks = blocks
        self._originals: Optional[dict] = None
        self._hooks: list = []
        self._uncompiled: list = []  # (module, its compiled call) set aside while installed
        self._results: list[torch.Tensor] = []
        self._in_forward = False
        self._plans: dict = {}  # TextEntropyPlan per q/k/v geometry (validated once)
        self._generated: Optional[int] = None  # generated image tokens of the current forward (None: all)
        self._ids_seen: Optional[tuple] = None  # (img_ids, its version, generated count): the last ids read
        self._reset()

    # --------------------------------------------------------------------------------------- context manager

    def __enter__(self) -> "AttentionEntropyCollector":
        if self._originals is not None:
            raise RuntimeError("this AttentionEntropyCollector is already installed")
        self._originals = {i: self._blocks[i].processor for i in self.layers}
        for i in self.layers:
            self._blocks[i].set_processor(self._classes[i](self, i))
        self._uncompiled = [(m, m._compiled_call_impl) for m in self._compiled_owners()]
        for m, _ in self._uncompiled:  # the selected blocks run eagerly (module docstring: compiled blocks)
            m._compiled_call_impl = None
        self._hooks = [self.transformer.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
                       self.transformer.register_forward_hook(self._end_forward)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for m, compiled in self._uncompiled:
            m._compiled_call_impl = compiled
        self._uncompiled = []
        if self._originals is not None:
            for i, proc in self._originals.items():
                self._blocks[i].set_processor(proc)
        self._originals = None
        self._in_forward = False

    def _compiled_owners(self) -> list:
        """The modules compiled in place (``nn.Module.compile``: the transformer's blocks under ``model.compile``,
        or the transformer itself) that hold a selected attention layer: the selected layers' ancestors, found in
        the constructor (entering costs a few attribute reads, not a walk over the model)."""
        return [m for m in self._ancestors if getattr(m, "_compiled_call_impl", None) is not None]

    # --------------------------------------------------------------------------------------- results

    def pop(self) -> torch.Tensor:
        """Entropy(t) of the oldest forward not popped yet: float32 [B], bits (AEGPO eq. 4)."""
        if not self._results:
            raise RuntimeError("no transformer forward recorded since the last pop(): run the transformer inside "
                               "the collector's context first")
        return self._results.pop(0)

    def _reset(self):
        self._seen: list[int] = []
        self._probs: Optional[torch.Tensor] = None
        self._stats: Optional[tuple] = None
        self._entropy_sum: Optional[torch.Tensor] = None

    def _begin_forward(self, module, args, kwargs):
        self._reset()
        self._in_forward = True
        self._generated = self._generated_queries(kwargs.get("img_ids"))

    def _generated_queries(self, img_ids) -> Optional[int]:
        """How many leading image tokens are generated ones (FLUX position ids with first coordinate 0), or None
        when all are (FLUX.1, SD3: no ``img_ids``). Read on the host once per ids tensor (kept referenced, so its
        memory is not reused while cached; its version counter catches in-place writes)."""
        if not isinstance(img_ids, torch.Tensor):
            return None
        if self._ids_seen is not None and self._ids_seen[0] is img_ids and self._ids_seen[1] == img_ids._version:
            return self._ids_seen[2]
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        index = (ids[:, 0] != 0).tolist()
        n = index.index(True) if True in index else len(index)
        if not all(index[n:]):
            raise ValueError("img_ids: the generated image tokens (position ids with first coordinate 0) must come "
                             "before the conditioning image tokens (FLUX.1-Kontext's source: first coordinate 1)")
        result = None if n == len(index) else n
        self._ids_seen = (img_ids, img_ids._version, result)
        return result

    def _end_forward(self, module, args, output):
        self._in_forward = False
        if not self._seen:
            return
        if len(self._seen) != len(self.layers):
            raise RuntimeError(f"the forward ran layers {sorted(self._seen)} of the selected {sorted(self.layers)}")
        if self.mode == "mixture":
            # [B, N] nats, float32 (float64 for float64 models); no value check: sums of exps, and no host sync
            per_query = text_entropy_from_probs(self._probs, check=False)
            entropy = per_query.mean(dim=1).mul_(1.0 / _LN2)
        elif self._entropy_sum is not None:  # torch backend: summed per layer
            entropy = self._entropy_sum.mul_(1.0 / (len(self.layers) * _LN2))
        else:  # Triton backend: [layers, B, H, S] text entropies, reduced here once
            start, n = self._image
            entropy = self._stats[-1][2:, :, :, start:start + n].mean(dim=(0, 2, 3)).mul_(1.0 / _LN2)
        self._results.append(entropy if entropy.dtype == torch.float32 else entropy.float())
        self._reset()

    def _plan(self, q, k, v, layout, text_start, text_len, image_start, image_len, cross=False) -> TextEntropyPlan:
        key = TextEntropyPlan.key(q, k, v, layout, text_start, text_len, image_start, image_len, cross)
        plan = self._plans.get(key)
        if plan is None:  # first call with this geometry: every check of the ops runs here, once
            plan = TextEntropyPlan(q, k, v, layout=layout, text_start=text_start, text_len=text_len,
                                   query_start=image_start, query_len=image_len, impl=self.impl, cross=cross)
            self._plans[key] = plan
        return plan

    def _record_masked(self, layer, q, k, text_mask, *, text_len, image_start, image_len, text_start=0):
        """One selected layer's statistics when some text keys are padding (a family whose processor passes a
        key mask, e.g. Qwen-Image's padded prompts): eager, from logits materialised one head at a time in
        float32 (float64 for float64 inputs), the padded keys excluded from the softmax (AEGPO eq. 1) and from the
        text renormalisation (eq. 2-3). ``q``, ``k``: [B, S, H, D] (no grad); ``text_mask``: bool [B, text_len],
        True for the valid keys of ``[text_start, text_start + text_len)``. Records nothing outside a forward."""
        if not self._in_forward:
            return
        if layer in self._seen:
            raise RuntimeError(f"joint block {layer} ran twice in one transformer forward")
        first = not self._seen
        self._seen.append(layer)
        B, S, H, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
        valid[:, text_start:text_start + text_len] = text_mask
        text_valid = text_mask[:, None, :]
        qi = q[:, image_start:image_start + image_len].to(acc)
        kf = k.to(acc)
        probs = torch.zeros(B, image_len, text_len, dtype=acc, device=q.device) if self.mode == "mixture" else None
        entropy = torch.zeros(B, dtype=acc, device=q.device)
        for h in range(H):
            s = (qi[:, :, h] @ kf[:, :, h].transpose(-1, -2)) / math.sqrt(D)  # [B, N, S]
            s = s.masked_fill(~valid[:, None, :], -math.inf)
            s_text = s[..., text_start:text_start + text_len]
            if probs is not None:
                probs += torch.exp(s_text - torch.logsumexp(s, dim=-1, keepdim=True))
            else:
                log_p = s_text - torch.logsumexp(s_text, dim=-1, keepdim=True)
                ent = -torch.where(text_valid, log_p.exp() * log_p, torch.zeros((), dtype=acc, device=q.device))
                entropy += ent.sum(-1).mean(-1)
        if probs is not None:
            if first:
                self._probs = probs.float()
            else:
                self._probs += probs.float()
        elif first:
            self._entropy_sum = entropy / H
        else:
            self._entropy_sum += entropy / H

    def _attend(self, layer, q, k, v, layout, text_start, text_len, image_start, image_len, cross=False):
        """One selected layer under no grad: the attention output, and (inside a transformer forward) this layer's
        statistics added to the forward's. Host work: the plan look-up, one output allocation, the two kernel
        launches (the statistics and [B, N, T] buffers are allocated once per forward); no device sync.
        ``cross``: cross-attention (k, v of their own length; `TextEntropyPlan` with ``cross=True``, torch path)."""
        plan = self._plan(q, k, v, layout, text_start, text_len, image_start, image_len, cross)
        triton = plan.backend == "triton"
        if not self._in_forward:  # e.g. recomputation by gradient checkpointing: nothing is recorded
            return plan.attention(q, k, v, plan.new_stats()[:3] if triton else None)[0]
        if layer in self._seen:
            raise RuntimeError(f"joint block {layer} ran twice in one transformer forward")
        first = not self._seen
        j = len(self._seen)
        self._seen.append(layer)
        if first and triton:
            # One allocation per forward: lse and text_lse shared by the layers, and in "head_mean" mode one
            # text-entropy row per layer (reduced once, at the end of the forward).
            self._stats = plan.new_stats(len(self.layers) if self.mode == "head_mean" else 1)
            self._image = (image_start, image_len)
        if triton:
            out, lse, text_entropy = plan.attention(q, k, v, (self._stats[0], self._stats[1],
                                                              self._stats[2 + j if self.mode == "head_mean" else 2]))
        else:
            out, lse, text_entropy = plan.attention(q, k, v, None)
        if self.mode == "mixture":
            if first:
                self._probs = plan.new_probs()
            plan.probs(q, k, lse, self._probs, accumulate=not first)
        elif not triton:  # torch backend: the statistics are fresh tensors per call
            per_sample = text_entropy[:, :, image_start:image_start + image_len].mean(dim=(1, 2))
            if first:
                self._entropy_sum = per_sample
            else:
                self._entropy_sum += per_sample
        return out
