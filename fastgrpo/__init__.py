"""fastgrpo: fast GRPO training of image generators.

Ops (fused kernels with plain-PyTorch ``*_ref`` twins) are re-exported here::

    from fastgrpo import sde_step
"""
from .ops import SDEStep, sde_step, sde_step_ref
from .ops import (EGShaping, eg_grpo_shaping, eg_grpo_shaping_ref, eg_token_advantages, eg_token_advantages_ref,
                  eg_token_masks, eg_token_masks_ref, grpo_token_loss, grpo_token_loss_ref, token_logprob_entropy,
                  token_logprob_entropy_ref)

__version__ = "0.1.0"
__all__ = ["SDEStep", "sde_step", "sde_step_ref", "__version__"]
__all__ += ["token_logprob_entropy", "token_logprob_entropy_ref", "EGShaping", "eg_grpo_shaping",
            "eg_grpo_shaping_ref", "eg_token_advantages", "eg_token_advantages_ref", "eg_token_masks",
            "eg_token_masks_ref", "grpo_token_loss", "grpo_token_loss_ref"]
