"""transformers glue for autoregressive text-to-image models: Janus(-Pro) two-stage sampling (a textual chain of
thought, then image tokens with classifier-free guidance), teacher-forced logits, and a tiny model factory."""
from .janus import JANUS_LORA_TARGETS, JanusPolicy, LMParts, load_janus
from .tiny import tiny_janus, tiny_janus_config, tiny_janus_tokenizer

__all__ = ["JANUS_LORA_TARGETS", "JanusPolicy", "LMParts", "load_janus", "tiny_janus", "tiny_janus_config",
           "tiny_janus_tokenizer"]
