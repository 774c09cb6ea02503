"""EG-GRPO (seed 001, "From Broad Exploration to Stable Synthesis: Entropy-Guided Optimization for Autoregressive
Image Generation", §5; minebetter/EG-GRPO @b0bdd65) on Janus(-Pro).

T2I-R1's GRPO (see `fastgrpo.algos.t2i_r1`) with EG-GRPO's token shaping on both modalities: per sequence and per
modality (text CoT, image tokens), the lowest-entropy tokens lose their reward-driven advantage (they keep the KL
term) and the highest-entropy tokens get a bonus, through the fused `fastgrpo.ops.eg_grpo_shaping` (one pass over
the vocabulary; never a float32 softmax over [B, L, V]). Defaults: low / high fractions 0.2 / 0.5, bonus 0.3, the
released threshold rule; k3 KL with beta 0.01 to the frozen reference; advantages with the group's std, ddof 1,
+ 1e-4 (`fastgrpo.ops.ADVANTAGE_CONVENTIONS["eg_grpo"]`), no advantage clip; no PPO clipping for the single
on-policy update (ratio ``exp(logp - logp.detach())``).

Ablations (the paper's Table 2): ``ar.shape_text=false`` shapes the image tokens only ("w/ only tok"),
``ar.shape_image=false`` the CoT only ("w/ only sem"); both false is T2I-R1.

Decisions where DESIGN.md is silent:

* Text and image logits have different vocabularies (102,400 vs 16,384 for Janus-Pro), so the shaping runs once per
  modality (modality 0 on the text logits, 1 on the image logits). Thresholds are per row and modality anyway, so
  the masks are those of one call over both; with ``ar.calibrate=true`` the calibration constant alpha is computed
  per modality (over that modality's high-entropy tokens) instead of once for the batch.
* An unshaped modality still reports its normalised entropy (for the log), from `token_logprob_entropy`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from fastgrpo.ops import eg_grpo_shaping, token_logprob_entropy

from .base import Strategy

IGNORE_INDEX = -100


class TokenTerms(NamedTuple):
    """Per-token terms of one modality: logp (differentiable), normalised entropy, token advantage, masks."""

    logp: torch.Tensor
    entropy: torch.Tensor
    token_adv: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


@dataclass
class EGGRPO(Strategy):
    name: str = "eg_grpo"
    beta: float = 0.01
    adv_std: str = "group"
    adv_ddof: int = 1
    adv_eps: float = 1e-4
    shape_text: bool = True
    shape_image: bool = True
    low_frac: float = 0.2
    high_frac: float = 0.5
    bonus: float = 0.3
    rule: str = "released"
    calibrate: bool = False
    kinds: ClassVar[tuple] = ("ar",)

    @classmethod
    def from_config(cls, cfg) -> "EGGRPO":
        s = super().from_config(cfg)
        ar = cfg.ar
        for key in ("shape_text", "shape_image"):
            if getattr(ar, key) is not None:
                setattr(s, key, getattr(ar, key))
        for key in ("low_frac", "high_frac", "bonus", "rule", "calibrate"):
            setattr(s, key, getattr(ar, key))
        return s

    def shapes(self, modality: int) -> bool:
        return self.shape_text if modality == 0 else self.shape_image

    def token_terms(self, logits: torch.Tensor, targets: torch.Tensor, modality: int, advantages: torch.Tensor, *,
                    temperature: float = 1.0, impl: str = "auto", validate: bool = True) -> TokenTerms:
        """Terms of one modality (0 text, 1 image). ``logits`` [B, L, V] predict ``targets`` [B, L] (-100 on
        padding); ``advantages`` [B]. ``validate``: passed to the token ops; the AR trainer passes False (no host
        read per micro-batch: an out-of-range target gives a NaN log-prob, so a NaN loss, which its finiteness
        check stops on)."""
        valid = targets != IGNORE_INDEX
        if self.shapes(modality):
            mod = torch.where(valid, torch.full_like(targets, modality), torch.full_like(targets, -1))
            sh = eg_grpo_shaping(logits, targets, mod, advantages, temperature=temperature, low_frac=self.low_frac,
                                 high_frac=self.high_frac, bonus=self.bonus, rule=self.rule, calibrate=self.calibrate,
                                 impl=impl, validate=validate)
            return TokenTerms(sh.logp, sh.entropy, sh.token_adv, sh.low, sh.high)
        logp, ent = token_logprob_entropy(logits, targets, temperature=temperature, normalize=True,
                                          ignore_index=IGNORE_INDEX, impl=impl, validate=validate)
        none = torch.zeros_like(valid)
        return TokenTerms(logp, ent.detach(), advantages.detach().float()[:, None] * valid, none, none)
