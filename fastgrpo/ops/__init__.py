"""Public ops: one module per op family (formula docstring, `*_ref`, validation, autograd.Function, public fn).

No diffusers/transformers imports here.
"""
from .sde import SDEStep, sde_step, sde_step_ref
from .token_entropy import token_logprob_entropy, token_logprob_entropy_ref
from .eg_grpo import (EGShaping, eg_grpo_shaping, eg_grpo_shaping_ref, eg_token_advantages, eg_token_advantages_ref,
                      eg_token_masks, eg_token_masks_ref)
from .grpo_loss import grpo_token_loss, grpo_token_loss_ref
from .attention import (AttnTextEntropy, attention_with_text_entropy, attention_with_text_entropy_ref,
                        text_attention_probs, text_attention_probs_ref, text_entropy_from_probs)
from .ovf import OVFSelection, ovf_select, ovf_select_ref
from .advantages import (ADVANTAGE_CONVENTIONS, group_advantages, group_advantages_ref, tree_advantages,
                         tree_advantages_ref)

__all__ = [
    "SDEStep", "sde_step", "sde_step_ref",
    "token_logprob_entropy", "token_logprob_entropy_ref", "EGShaping", "eg_grpo_shaping", "eg_grpo_shaping_ref",
    "eg_token_advantages", "eg_token_advantages_ref", "eg_token_masks", "eg_token_masks_ref", "grpo_token_loss",
    "grpo_token_loss_ref",
    "AttnTextEntropy", "attention_with_text_entropy", "attention_with_text_entropy_ref", "text_attention_probs",
    "text_attention_probs_ref", "text_entropy_from_probs",
    "OVFSelection", "ovf_select", "ovf_select_ref",
    "ADVANTAGE_CONVENTIONS", "group_advantages", "group_advantages_ref", "tree_advantages", "tree_advantages_ref",
]
