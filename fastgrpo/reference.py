"""LoRA adapters and the reference policy for the KL term, shared by the diffusion and autoregressive policies.

With LoRA the reference is the same network with its adapters disabled (Flow-GRPO, T2I-R1); with full
fine-tuning it is a frozen copy made before training.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def reference_network(adapted, active, frozen_copy, *, uses_lora: bool):
    """Yield the module that evaluates the reference policy.

    ``adapted``: the module carrying the LoRA adapters (``disable_adapters``/``enable_adapters``); ``active``: what
    to yield while they are disabled; ``frozen_copy``: the full fine-tuning reference, or None.
    """
    if uses_lora:
        adapted.disable_adapters()
        try:
            yield active
        finally:
            adapted.enable_adapters()
    elif frozen_copy is not None:
        yield frozen_copy
    else:
        raise ValueError("train.beta > 0 needs a reference policy: use LoRA, or full fine-tuning with beta set "
                         "before the trainer is built")


def lora_parameters(module) -> list:
    """The LoRA weights peft attached to ``module``, upcast to float32 and trainable (the base weights may be
    bf16; the adapters train in fp32, as Flow-GRPO casts its training parameters)."""
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params
