"""fastgrpo: fast GRPO training of image generators.

Ops (fused kernels with plain-PyTorch ``*_ref`` twins) are re-exported here::

    from fastgrpo import sde_step, token_logprob_entropy, attention_with_text_entropy
"""
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = [*_ops_all, "__version__"]
