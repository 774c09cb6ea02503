"""GRPO variants: one small module per variant (a config plus strategies plugged into the one training loop)."""
