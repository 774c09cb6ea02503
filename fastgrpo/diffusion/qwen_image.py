"""The ``qwen_image`` family: Qwen-Image (``QwenImagePipeline``, ``QwenImageTransformer2DModel``).

Conventions, as in diffusers' ``pipelines/qwenimage/pipeline_qwenimage.py`` (0.42):

* **Prompts**: the pipeline's chat template (a system line asking to describe the image, the prompt as the user
  turn) through the Qwen2.5-VL text encoder; the last hidden state with the template's first
  ``prompt_template_encode_start_idx`` (34) tokens dropped, cut to ``model.max_sequence_length`` tokens (the
  pipeline's ``max_sequence_length``), as ``pipe.encode_prompt`` does for one prompt. Each prompt is encoded on its
  own (`FlowAdapter.encode_prompts`), then **padded with zeros to ``model.max_sequence_length`` tokens** with a
  boolean mask (``embeds`` [T, D], ``mask`` [T]): prompts have different lengths, and the trainer stacks and
  concatenates the embeddings of any samples, so every cached encoding has one shape whatever the batch. The
  transformer's joint attention ignores the padded keys (``encoder_hidden_states_mask``; diffusers >= 0.37, checked
  in `setup`: older versions ignore the mask), so a padded prompt gives the pipeline's velocity (which runs
  unpadded with no mask for one prompt) to float rounding. Decision: the
  padding costs attention over ``max_sequence_length`` text tokens; set ``model.max_sequence_length`` near the
  longest prompt's length (the prompt is cut there, as in the pipeline).
* **Latents**: packed [B, (h/2)*(w/2), 4C] as the pipeline's ``_pack_latents`` (noise drawn in the packed layout:
  the same distribution as draw-then-pack), ``img_shapes = [(1, h/2, w/2)]`` per sample; the transformer takes
  ``timestep = sigma`` (the pipeline passes ``t / 1000``). The text lengths for RoPE come from the mask (diffusers
  >= 0.36 dropped ``txt_seq_lens``).
* **Guidance**: Qwen-Image is not guidance-distilled (``guidance_embeds`` false): ``sample.guidance_scale`` is the
  pipeline's ``true_cfg_scale``, with the negative prompt ``" "`` (`NEGATIVE_PROMPT`, what Flow-GRPO's Qwen-Image
  trainers pass: scripts/train_qwenimage_edit_plus.py, ``negative_prompt=[" "]*len(prompts)``). With ``> 1`` and
  CFG on, one forward runs the batch ``[cond, uncond]`` (Flow-GRPO's order; the pipeline runs two forwards) and
  combines them as the pipeline does, including its norm rescale::

      comb = v_u + g (v_c - v_u);   v = comb * ||v_c|| / ||comb||     (norms over the channel dim, per token)

  ``sample.guidance_scale <= 1``: no negative prompt, one forward (the pipeline with ``true_cfg_scale <= 1``). A
  transformer with ``guidance_embeds`` is refused: diffusers' own forward cannot run its guidance input.
* **Schedule**: the pipeline's sigmas ``linspace(1, 1/N, N)`` through its scheduler with the dynamic shift ``mu``
  linear in the packed image sequence length (the scheduler config's ``base_image_seq_len``/``max_image_seq_len``
  and ``base_shift``/``max_shift``); computed by a copy of the pipeline's own scheduler, so every option of its
  config (Qwen-Image's ``shift_terminal`` 0.02, exponential time shift) applies.
* **Decode**: unpack to the VAE's 5-D latents [B, C, 1, h, w], ``z * latents_std + latents_mean``, decode, frame 0,
  ``x / 2 + 0.5`` clamped to [0, 1] (``VaeImageProcessor.postprocess``).
* **AEGPO**: the collector reads the joint attention of ``transformer_blocks[i].attn``
  (``QwenDoubleStreamAttnProcessor2_0``: text tokens, then image tokens; qk-norm, then Qwen's complex RoPE on each
  stream; the text key mask). `QwenEntropyAttnProcessor` reproduces it; see its docstring for the masked case.

`tiny_pipeline` builds every component in code: a byte-level BPE tokenizer whose vocabulary holds the template's
words (so the template prefix is 34 tokens, as with the real tokenizer, and the pipeline's drop index keeps its
meaning), a 2-layer Qwen2.5-VL (with a 1-block vision tower the pipeline never calls), a 2x-downsampling
``AutoencoderKLQwenImage`` with 4 latent channels, and a 3-block transformer.
"""
from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import FlowAdapter
from .attention import _EntropyAttnProcessor

NEGATIVE_PROMPT = " "  # Flow-GRPO's Qwen-Image negative prompt (scripts/train_qwenimage_edit_plus.py)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), 4C], the pipeline's ``_pack_latents``."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)*(w/2), 4C] -> the VAE's [B, C, 1, h, w], the pipeline's ``_unpack_latents``."""
    B, L, C = x.shape
    x = x.view(B, h // 2, w // 2, C // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C // 4, 1, h, w)


class QwenImageAdapter(FlowAdapter):
    family: ClassVar[str] = "qwen_image"
    pipeline_class: ClassVar[str] = "QwenImagePipeline"
    transformer_class: ClassVar[str] = "QwenImageTransformer2DModel"
    # The joint-attention projections of every block (the SD3/FLUX families' default; Flow-GRPO's Qwen-Image trainer
    # adds both streams' MLPs: configs/qwen-image-flow-grpo-pickscore.yaml lists them in model.lora.targets)
    block_lists: ClassVar[tuple] = ("transformer_blocks",)
    negative_prompt: ClassVar[str] = NEGATIVE_PROMPT

    # ------------------------------------------------------------------------------------------- class-level
    @classmethod
    def tiny_pipeline(cls, seed: int = 0, vae_gain: float = 1.0):
        return tiny_qwen_image_pipeline(seed, vae_gain=vae_gain)

    @classmethod
    def entropy_processor(cls, processor):
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        return QwenEntropyAttnProcessor if type(processor) is QwenDoubleStreamAttnProcessor2_0 else None

    # ------------------------------------------------------------------------------------------- instance
    def setup(self) -> None:
        import diffusers
        from diffusers.models.transformers import transformer_qwenimage

        if not hasattr(transformer_qwenimage, "compute_text_seq_len_from_mask"):
            # Before 0.37 the joint attention ignored encoder_hidden_states_mask: padded prompts would attend to
            # their padding, unlike the pipeline on one prompt.
            raise ValueError(f"model.family qwen_image needs diffusers >= 0.37 (masked joint attention for padded "
                             f"prompts), found {diffusers.__version__}")
        if self.transformer.config.guidance_embeds:
            raise ValueError("model.path: a guidance-distilled Qwen-Image transformer (guidance_embeds) is not "
                             "supported (diffusers' QwenImageTransformer2DModel cannot run its guidance input)")
        self.vae_scale = 2 ** len(self.vae.temperal_downsample)  # the pipeline's vae_scale_factor
        mult = 2 * self.vae_scale
        for key, v in (("model.height", self.height), ("model.width", self.width)):
            if v % mult:
                raise ValueError(f"{key} must be a multiple of {mult} for this VAE and the 2x2 packing, got {v}")
        limit = getattr(self.pipe, "tokenizer_max_length", 1024)
        if self.max_sequence_length > limit:
            raise ValueError(f"model.max_sequence_length must be <= {limit} for Qwen-Image (the pipeline's limit), "
                             f"got {self.max_sequence_length}")
        self.lat_h, self.lat_w = self.height // self.vae_scale, self.width // self.vae_scale
        self.img_shapes = (1, self.lat_h // 2, self.lat_w // 2)

    def _encode_one(self, prompt: str):
        pe, mask = self.pipe.encode_prompt(prompt=[prompt], device=self.device,
                                           max_sequence_length=self.max_sequence_length)
        T = self.max_sequence_length
        n = pe.shape[1]
        embeds = pe.new_zeros(T, pe.shape[2])
        embeds[:n] = pe[0]
        valid = torch.zeros(T, dtype=torch.bool, device=pe.device)
        valid[:n] = True if mask is None else mask[0].bool()
        return embeds, valid

    def encode_prompt(self, prompt: str) -> dict:
        embeds, mask = self._encode_one(prompt)
        out = {"embeds": embeds, "mask": mask}
        if self.guidance_scale > 1:
            if not hasattr(self, "_negative"):
                self._negative = self._encode_one(self.negative_prompt)
            out["neg_embeds"], out["neg_mask"] = self._negative
        return out

    def latent_shape(self, n: int) -> tuple:
        return (n, (self.lat_h // 2) * (self.lat_w // 2), self.transformer.config.in_channels)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/N, N)`` set on a copy of its scheduler with ``mu`` from the
        packed image sequence length (`qwen_mu`), as ``QwenImagePipeline.__call__`` step 5."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sample.num_steps must be a positive int, got {num_steps!r}")
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu",
                            mu=qwen_mu((self.lat_h // 2) * (self.lat_w // 2), sched.config))
        return sched.sigmas.to(torch.float32).cpu()

    def predict(self, net, x, sigma, emb, cfg):
        dtype, B = self.dtype, x.shape[0]
        if cfg and self.guidance_scale > 1:
            out = net(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([sigma, sigma]),
                      encoder_hidden_states=torch.cat([emb["embeds"], emb["neg_embeds"]]).to(dtype),
                      encoder_hidden_states_mask=torch.cat([emb["mask"], emb["neg_mask"]]),
                      img_shapes=[[self.img_shapes]] * (2 * B)).sample
            self.model_forwards += 2 * B
            v_c, v_u = out.float().chunk(2)
            comb = v_u + self.guidance_scale * (v_c - v_u)
            return comb * (torch.linalg.vector_norm(v_c, dim=-1, keepdim=True)
                           / torch.linalg.vector_norm(comb, dim=-1, keepdim=True))
        self.model_forwards += B
        return net(hidden_states=x.to(dtype), timestep=sigma, encoder_hidden_states=emb["embeds"].to(dtype),
                   encoder_hidden_states_mask=emb["mask"], img_shapes=[[self.img_shapes]] * B).sample.float()

    def conditional_rows(self, per_row: torch.Tensor, *, cfg: bool = True) -> torch.Tensor:
        """With true CFG the forward runs ``[cond, uncond]``: the first half."""
        if cfg and self.guidance_scale > 1:
            return per_row[: per_row.shape[0] // 2]
        return per_row

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = unpack_latents(x, self.lat_h, self.lat_w).to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        img = self.vae.decode(z / inv_std + mean).sample[:, :, 0].float()  # the pipeline's ops, in its order
        return (img / 2 + 0.5).clamp(0, 1)


def qwen_mu(image_seq_len: int, config) -> float:
    """The pipeline's ``calculate_shift``: ``mu`` linear in the packed image sequence length, from the scheduler
    config's ``base_image_seq_len``/``max_image_seq_len`` (256 / 4096 by default) and ``base_shift``/``max_shift``
    (0.5 / 1.15 by default; Qwen-Image's config: 0.5 / 0.9 up to 8192 tokens)."""
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


# ------------------------------------------------------------------------------------------ AEGPO processor


class QwenEntropyAttnProcessor(_EntropyAttnProcessor):
    """``QwenDoubleStreamAttnProcessor2_0`` semantics (Qwen-Image's double-stream blocks), attention through the
    collector's entropy op.

    Joint sequence: text tokens, then image tokens (layout [B, S, H, D]); per-stream q/k/v projections, unflatten to
    heads, qk-norm (``norm_q``/``norm_k``, ``norm_added_q``/``norm_added_k``), then Qwen's complex RoPE
    (``image_rotary_emb`` = (image freqs, text freqs)) on each stream, as in diffusers.

    The text key mask (``encoder_hidden_states_mask``, from padded prompts; decision): the entropy kernel has no
    mask, so a forward whose mask pads some prompt takes an eager path: the block output from SDPA with the stock
    processor's joint mask (the same call as diffusers), and the statistics from float32 logits with the padded
    keys excluded: the probabilities of AEGPO eq. 1 are over the valid keys, eq. 2-3 renormalise over the valid
    text keys (`AttentionEntropyCollector._record_masked`). A mask with no padding (checked on the host: one sync
    per selected layer) is dropped and the kernel runs.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError(f"encoder_hidden_states is None in double-stream block {self.layer}: the entropy "
                             "processor needs the text tokens")
        if attention_mask is not None:
            raise ValueError("attention_mask is not accepted (as in QwenDoubleStreamAttnProcessor2_0): pass "
                             "encoder_hidden_states_mask")
        head_dim = attn.inner_dim // attn.heads
        split = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731  [B, L, H*D] -> [B, L, H, D]
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        tq = split(attn.add_q_proj(encoder_hidden_states))
        tk = split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        jq, jk, jv = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)

        n_text, n_image = encoder_hidden_states.shape[1], hidden_states.shape[1]
        mask = encoder_hidden_states_mask
        if mask is not None and bool(mask.bool().all()):
            mask = None
        if mask is None:
            out = self._attend(jq, jk, jv, layout="bshd", text_start=0, text_len=n_text, image_start=n_text,
                               image_len=n_image)
        else:
            text_mask = mask.bool()
            joint = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], n_image)], dim=1)[:, None, None, :]
            # The stock processor's call (dispatch_attention_fn's native backend: SDPA on [B, H, S, D])
            out = F.scaled_dot_product_attention(jq.transpose(1, 2), jk.transpose(1, 2), jv.transpose(1, 2),
                                                 attn_mask=joint).transpose(1, 2)
            with torch.no_grad():
                self.collector._record_masked(self.layer, jq.detach(), jk.detach(), text_mask, text_len=n_text,
                                              image_start=n_text, image_len=n_image)
        out = out.flatten(2, 3).to(jq.dtype)
        text_out, image_out = out[:, :n_text], out[:, n_text:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


# ------------------------------------------------------------------------------------------ tiny pipeline

PROMPT_TEMPLATE_PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                          "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                          "<|im_start|>user\n")
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_chars() -> list:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# Qwen2's pre-tokenizer split (transformers' models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX): the byte-level
# BPE runs on these pieces
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer built in code with Qwen2's pre-tokenizer (``tokenizers`` wrapped in
    ``PreTrainedTokenizerFast``, which every transformers version loads back): every byte is a token, plus one token
    for each word of the pipeline's template (merged from its characters, so other text containing those words uses
    them too), plus Qwen's special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>``. The template's
    prefix is then 34 tokens, as with Qwen's tokenizer (the pipeline's ``prompt_template_encode_start_idx``)."""
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    byte = _byte_chars()
    vocab = {c: i for i, c in enumerate(byte)}
    merges = []
    text = PROMPT_TEMPLATE_PREFIX + "<|im_end|>\n<|im_start|>assistant\n"
    for piece in re.findall(r" ?[A-Za-z]+", re.sub(r"<\|[a-z_]+\|>", "\n", text)):
        chars = "".join(byte[b] for b in piece.encode())
        for i in range(1, len(chars)):
            if chars[:i + 1] not in vocab:
                vocab[chars[:i + 1]] = len(vocab)
                merges.append((chars[:i], chars[i]))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=_SPECIAL[0], eos_token=_SPECIAL[0],
                                   model_max_length=2048)


TINY_QWEN_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_qwen_text_encoder(vocab_size: int, hidden: int = 32):
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` (M-RoPE sections of its 16-dim heads; a 1-block vision
    tower that text-only prompts never run)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = vocab_size
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2, vision_end_token_id=n + 3)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen_vae(gain: float = 1.0):
    """A 2x-downsampling ``AutoencoderKLQwenImage`` with 4 latent channels (its own latents mean / std). ``gain``
    scales the decoder's output convolution (`fastgrpo.diffusion.tiny`'s note on ``tiny_vae_gain``)."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False], latents_mean=[-0.3, 0.1, 0.5, -0.2],
                                 latents_std=[1.5, 0.8, 2.0, 1.2])
    if gain != 1.0:
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(gain)
            vae.decoder.conv_out.bias.mul_(gain)
    return vae.eval()


def tiny_qwen_image_pipeline(seed: int = 0, vae_gain: float = 1.0):
    """A ``QwenImagePipeline`` of tiny random components: 32x32 px -> 16x16x4 latents -> 64 packed tokens of 16;
    3 double-stream blocks (2 heads of 16); Qwen-Image's scheduler config (dynamic shift, exponential time shift,
    ``shift_terminal`` 0.02, base/max shift 0.5/0.9 over 256..8192 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_qwen_tokenizer()
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
            vae=tiny_qwen_vae(vae_gain),
            text_encoder=tiny_qwen_text_encoder(len(tok), TINY_QWEN_TRANSFORMER["joint_attention_dim"]),
            tokenizer=tok,
            transformer=QwenImageTransformer2DModel(**TINY_QWEN_TRANSFORMER).eval(),
        )
    return pipe
