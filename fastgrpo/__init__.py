"""fastgrpo: fast GRPO training of image generators.

Ops (fused kernels with plain-PyTorch ``*_ref`` twins) are re-exported here::

    from fastgrpo import sde_step
"""
from .ops import SDEStep, sde_step, sde_step_ref
from .ops import (AttnTextEntropy, attention_with_text_entropy, attention_with_text_entropy_ref,
                  text_attention_probs, text_attention_probs_ref, text_entropy_from_probs)

__version__ = "0.1.0"
__all__ = ["SDEStep", "sde_step", "sde_step_ref", "__version__"]
__all__ += ["AttnTextEntropy", "attention_with_text_entropy", "attention_with_text_entropy_ref",
            "text_attention_probs", "text_attention_probs_ref", "text_entropy_from_probs"]
