"""fastgrpo: fast GRPO training of image generators.

Ops (fused kernels with plain-PyTorch ``*_ref`` twins) are re-exported here::

    from fastgrpo import sde_step
"""
from .ops import SDEStep, sde_step, sde_step_ref

__version__ = "0.1.0"
__all__ = ["SDEStep", "sde_step", "sde_step_ref", "__version__"]
from .ops import OVFSelection, ovf_select, ovf_select_ref  # noqa: E402

__all__ += ["OVFSelection", "ovf_select", "ovf_select_ref"]
from .ops import ADVANTAGE_CONVENTIONS, group_advantages, group_advantages_ref  # noqa: E402

__all__ += ["ADVANTAGE_CONVENTIONS", "group_advantages", "group_advantages_ref"]
