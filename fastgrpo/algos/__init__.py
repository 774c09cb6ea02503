"""GRPO variants: one small module per variant (a config plus strategies plugged into the one training loop).

``STRATEGIES`` maps a config's ``algo`` to its `fastgrpo.train.strategy.Strategy` subclass.
"""
from .dance_grpo import DanceGRPO
from .flow_grpo import FlowGRPO

STRATEGIES = {
    "flow_grpo": FlowGRPO,
    "dance_grpo": DanceGRPO,
}

__all__ = ["STRATEGIES", "FlowGRPO", "DanceGRPO"]
