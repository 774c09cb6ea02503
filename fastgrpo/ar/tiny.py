"""A tiny randomly initialised Janus (``JanusForConditionalGeneration``) and a tokenizer built in code (no downloads).

The model keeps Janus-Pro's architecture (a Llama language model with ``lm_head`` for text, the generation
embeddings / aligner / head for image tokens, a SigLIP-style vision tower and aligner, a VQ-VAE) at toy size:
2 Llama layers of width 32, an 8x8 grid of image tokens from a 64-entry codebook, 32x32 px images. Real Janus-Pro
has a 24x24 grid (576 tokens, 384 px) over a 16,384-entry codebook and a 102,400-token text vocabulary.

The tokenizer is character level (printable ASCII and newline) plus the special tokens Janus uses: a begin-of-
sentence, end-of-sentence and pad token and the image tags ``<begin_of_image>``, ``<end_of_image>`` and
``<image_placeholder>``. ``fastgrpo.ar.janus.load_janus`` looks these up by name, for this tokenizer and for the
real checkpoint's alike.
"""
from __future__ import annotations

import torch

BOS, EOS, PAD, UNK = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<|unk|>"
BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
SPECIALS = [PAD, BOS, EOS, UNK, BOI, EOI, IMAGE]
_CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# Sizes of the tiny model; `tiny_janus(**overrides)` changes any of them.
TINY_JANUS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, grid=8, codebook=64, vq_base_channels=32,
                  vq_channel_multiplier=(1, 1, 2), vq_embed_dim=8)
HEAD_GAIN = 2.0  # std * sqrt(fan_in) of lm_head and the generation head (see `_trained_like_scales`)
DECODER_GAIN = 10.0  # scale of the VQ decoder's output convolution


def tiny_janus_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with Janus's special tokens (no BOS added automatically:
    `fastgrpo.ar.janus` prepends it itself, for every tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # characters back to a string without separators
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[BOI, EOI, IMAGE], padding_side="left")


def tiny_janus_config(tokenizer=None, **overrides):
    """The ``JanusConfig`` of `tiny_janus` (vocabulary from ``tokenizer``, default `tiny_janus_tokenizer`)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    o = {**TINY_JANUS, **overrides}
    tok = tokenizer if tokenizer is not None else tiny_janus_tokenizer()
    d = o["hidden_size"]
    text = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=o["intermediate_size"],
                       num_hidden_layers=o["num_hidden_layers"], num_attention_heads=o["num_attention_heads"],
                       num_key_value_heads=o["num_key_value_heads"],
                       max_position_embeddings=o["max_position_embeddings"], bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    patch = 4
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=o["grid"] * patch,
                               patch_size=patch, mlp_ratio=2.0, projection_dim=d, depth=1,
                               num_image_tokens=o["grid"] ** 2)
    vq = JanusVQVAEConfig(embed_dim=o["vq_embed_dim"], num_embeddings=o["codebook"], latent_channels=32,
                          base_channels=o["vq_base_channels"], channel_multiplier=list(o["vq_channel_multiplier"]),
                          num_res_blocks=1, projection_dim=d, image_token_embed_dim=d, num_hidden_layers=1)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tok.convert_tokens_to_ids(IMAGE), tie_word_embeddings=False)


def tiny_janus(seed: int = 0, **overrides):
    """(model, tokenizer): a ``JanusForConditionalGeneration`` with random weights (float32, eval mode) and
    `tiny_janus_tokenizer`. Image tokens: ``grid**2`` (64); images: ``grid * 2**(len(vq_channel_multiplier)-1)``
    px (32)."""
    from transformers import JanusForConditionalGeneration

    tok = tiny_janus_tokenizer()
    config = tiny_janus_config(tok, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
        _trained_like_scales(model)
    return model.eval(), tok


@torch.no_grad()
def _trained_like_scales(model) -> None:
    """Rescale the output layers so the random model behaves like a trained one, not like a uniform sampler.

    With transformers' initialisation (std 0.02) the heads of a width-32 model give logits of about 1e-2, i.e.
    uniform next-token distributions (normalised entropy 0.99999), and the VQ decoder gives flat grey images
    whatever the tokens. Here the text and image heads get unit-gain Gaussian weights (std ``HEAD_GAIN /
    sqrt(fan_in)``), so token entropies sit well inside (0, 1) as for Janus-Pro, and the decoder's output
    convolution is scaled by ``DECODER_GAIN``, so images (and pixel rewards) depend on the tokens.
    """
    for lin in (model.lm_head, model.model.generation_head.proj_out, model.model.generation_head.vision_head):
        lin.weight.normal_(0.0, HEAD_GAIN / lin.weight.shape[1] ** 0.5)
    model.model.vqmodel.decoder.conv_out.weight.mul_(DECODER_GAIN)
