"""Public ops: one module per op family (formula docstring, `*_ref`, validation, autograd.Function, public fn).

No diffusers/transformers imports here.
"""
from .sde import SDEStep, sde_step, sde_step_ref

__all__ = ["SDEStep", "sde_step", "sde_step_ref"]
from .ovf import OVFSelection, ovf_select, ovf_select_ref

__all__ += ["OVFSelection", "ovf_select", "ovf_select_ref"]
from .advantages import ADVANTAGE_CONVENTIONS, group_advantages, group_advantages_ref  # noqa: E402

__all__ += ["ADVANTAGE_CONVENTIONS", "group_advantages", "group_advantages_ref"]
