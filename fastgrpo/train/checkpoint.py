"""Checkpoints: ``DIR/checkpoints/step_N/`` with everything ``--resume`` needs to continue bit-exactly.

* ``trainable.safetensors`` -- the trainable weights (LoRA or the whole transformer), by parameter name;
* ``ema.safetensors`` -- their exponential moving average;
* ``optimizer.pt`` -- the optimizer state;
* ``rng.pt`` -- python/numpy/torch RNG states (the loop also derives each step's randomness from (seed, step));
* ``state.json`` -- step, samples, model forwards, elapsed time, and the config;
* ``strategy.pt`` -- the variant's own state, when it keeps one (`Strategy.state_dict`: AEGPO's per-prompt
  base-entropy cache).

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves half of one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(root: Path, step: int, *, trainable: dict, ema: dict, optimizer, state: dict,
                    strategy_state: dict | None = None) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if strategy_state:
        torch.save(strategy_state, tmp / "strategy.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, *, trainable: dict, ema: dict, optimizer, strategy=None) -> dict:
    """Restore the weights, EMA, optimizer, RNG states (and ``strategy``'s state when saved); returns
    ``state.json``."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable weights {sorted(missing)[:3]}... "
                         "(was it written by a run with another model or LoRA config?)")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(weights[k].to(p.device, p.dtype))
        for k, v in load_file(str(path / "ema.safetensors")).items():
            ema[k].copy_(v.to(ema[k].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if strategy is not None and (path / "strategy.pt").exists():
        strategy.load_state_dict(torch.load(path / "strategy.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
