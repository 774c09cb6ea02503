"""T2I-R1 (Jiang et al. 2025, arXiv 2505.00703; CaraJ7/T2I-R1): BiCoT-GRPO on Janus-Pro, the baseline of EG-GRPO.

Two-stage rollouts (a semantic-level CoT, then token-level image generation with CFG 5), rewards on the decoded
images, group-relative advantages (group std, ddof 1, + 1e-4), one on-policy update without clipping, k3 KL with
beta 0.01 to the frozen reference, the same advantage on every CoT and image token. It is EG-GRPO
(`fastgrpo.algos.eg_grpo`) without the entropy shaping on either modality.
"""
from __future__ import annotations

from dataclasses import dataclass

from .eg_grpo import EGGRPO


@dataclass
class T2IR1(EGGRPO):
    name: str = "t2i_r1"
    shape_text: bool = False
    shape_image: bool = False
