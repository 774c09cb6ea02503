"""Public ops: one module per op family (formula docstring, `*_ref`, validation, autograd.Function, public fn).

No diffusers/transformers imports here.
"""
from .sde import SDEStep, sde_step, sde_step_ref
from .attention import (AttnTextEntropy, attention_with_text_entropy, attention_with_text_entropy_ref,
                        text_attention_probs, text_attention_probs_ref, text_entropy_from_probs)

__all__ = ["SDEStep", "sde_step", "sde_step_ref"]
__all__ += ["AttnTextEntropy", "attention_with_text_entropy", "attention_with_text_entropy_ref",
            "text_attention_probs", "text_attention_probs_ref", "text_entropy_from_probs"]
