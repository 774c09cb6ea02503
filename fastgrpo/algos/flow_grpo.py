"""Flow-GRPO (arXiv 2505.05470; yifan123/flow_grpo, config/grpo.py).

SDE at every step with ``kind="flow_grpo"`` and a = 0.7; trains the first ``floor(0.99 * T)`` steps in order;
PPO clip 1e-4; advantages clipped to +-5; per-prompt means with the *global* std over the batch, ddof 0, + 1e-4
(the paper's default; ``train.adv_std=group`` gives "Flow-GRPO (Fixed)"); KL weight per preset (0.01-0.04 in their
configs; 0 here unless the preset sets it).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy


@dataclass
class FlowGRPO(Strategy):
    """The `Strategy` defaults are Flow-GRPO's (kind flow_grpo, a = 0.7, 99% of steps, global std, ddof 0, +1e-4)."""

    name: str = "flow_grpo"
