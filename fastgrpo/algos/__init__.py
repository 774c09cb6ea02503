"""GRPO variants: one small module per variant (a config plus strategies plugged into the one training loop).

``STRATEGIES`` maps a config's ``algo`` to its `fastgrpo.algos.base.Strategy` subclass.
"""
from .aegpo import AEGPO
from .branch_grpo import BranchGRPO
from .dance_grpo import DanceGRPO
from .eg_grpo import EGGRPO
from .flow_grpo import FlowGRPO
from .pro_grpo import ProGRPO
from .t2i_r1 import T2IR1
from .tempflow_grpo import TempFlowGRPO

STRATEGIES = {
    "flow_grpo": FlowGRPO,
    "dance_grpo": DanceGRPO,
    "tempflow_grpo": TempFlowGRPO,
    "pro_grpo": ProGRPO,
    "branch_grpo": BranchGRPO,
    "aegpo": AEGPO,
    "eg_grpo": EGGRPO,
    "t2i_r1": T2IR1,
}

__all__ = ["STRATEGIES", "FlowGRPO", "DanceGRPO", "TempFlowGRPO", "ProGRPO", "BranchGRPO", "AEGPO", "EGGRPO", "T2IR1"]
