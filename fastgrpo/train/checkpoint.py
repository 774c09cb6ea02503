"""Checkpoints: ``DIR/checkpoints/step_N/`` with everything ``--resume`` needs to continue bit-exactly.

* ``trainable.safetensors`` -- the trainable weights (LoRA or the whole transformer), by parameter name;
* ``ema.safetensors`` -- their exponential moving average (absent when ``train.ema_decay`` is null);
* ``optimizer.pt`` -- the optimizer state (``optimizer.state_dict()``, moments indexed by parameter position);
* ``rng.pt`` -- python/numpy/torch RNG states as plain data and tensors (the loop also derives each step's
  randomness from (seed, step));
* ``state.json`` -- step, samples, model forwards, elapsed time, and the config;
* ``strategy.pt`` -- the variant's own state, when it has one (AEGPO's cached base entropies);
* ``manifest.json`` -- written last: the size and sha256 of every other file.

On ``--resume`` the newest checkpoint whose files match its manifest is used (`resumable_checkpoint`): a newer
one with a missing, truncated or altered file is skipped with a warning naming the file; when none verifies the
resume stops with a ValueError naming the broken file. A checkpoint without a manifest (written before manifests
existed) is loaded unverified, with a warning.

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves half of one.

Loading never executes code from a file: the ``.pt`` files hold only tensors and plain Python data and are read
with ``torch.load(weights_only=True)``; a file holding anything else (a crafted pickle) is refused with a
ValueError naming it, as is a missing or unreadable (truncated, corrupt) ``.pt``, ``.safetensors`` or ``.json``.

Tensors are always whole, whatever ``distributed.strategy`` trained them: under FSDP every process calls
`save_checkpoint` (the shards are gathered one tensor at a time) and only the writer (rank 0) keeps and writes them;
`load_checkpoint` gives each process its own shard (`fastgrpo.train.sharding`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .sharding import gather_full, is_sharded, local_like

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(root: Path, step: int, *, trainable: dict, ema: dict | None, optimizer, state: dict,
                    strategy_state: dict | None = None, write: bool = True) -> Path | None:
    """Write ``root/step_N``; with sharded tensors every process must call it, and only ``write=True`` writes."""
    weights = gather_full(trainable, keep=write)
    ema_weights = gather_full(ema, keep=write) if ema is not None else None
    opt = optimizer.state_dict()
    opt["state"] = {i: gather_full(s, keep=write) if any(map(is_sharded, s.values())) else s
                    for i, s in opt["state"].items()}
    if not write:
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    if ema_weights is not None:
        save_file(ema_weights, str(tmp / "ema.safetensors"))
    torch.save(opt, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if strategy_state:
        torch.save(strategy_state, tmp / "strategy.pt")
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _rng_state() -> dict:
    """The RNG states as tensors and plain data (loadable with ``weights_only=True``: no numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict, path: Path) -> None:
    try:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        n = rng["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(rng["torch"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not an RNG state written by this fastgrpo ({type(e).__name__}: {e})") from None
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_pt(path: Path):
    """``torch.load`` of a checkpoint file without executing code (``weights_only=True``): a file holding objects
    other than tensors and plain data, or an unreadable one, raises ValueError naming it. Prompts that carry data
    (`fastgrpo.train.prompts.EditPrompt`: a str, its image's name and its JSONL row; `fastgrpo.rewards.geneval.
    MetaPrompt`: a str and its row; e.g. AEGPO's cache keys) are plain data too."""
    from fastgrpo.rewards.geneval import MetaPrompt

    from .prompts import EditPrompt

    path = Path(path)
    try:
        with torch.serialization.safe_globals([EditPrompt, MetaPrompt]):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain data, which could "
                         f"run code (not written by fastgrpo, or tampered with); {first}") from None
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (an incomplete checkpoint?)") from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None


def load_safetensors(path: Path) -> dict:
    """``safetensors`` ``load_file``; a missing, truncated or corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing (an incomplete checkpoint?)")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: the reader's own messages name no file
        raise ValueError(f"{path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None


def read_json(path: Path):
    """A JSON file's content; a missing or malformed file raises ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (an incomplete checkpoint?)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def verify_checkpoint(path: Path) -> bool:
    """Check ``path``'s files against its ``manifest.json``: True when they match, False when it has no manifest
    (an older checkpoint: not verifiable); a missing, truncated or altered file raises ValueError naming it."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    manifest = read_json(path / MANIFEST)
    try:
        files = dict(manifest["files"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path / MANIFEST} lists no files (corrupt?)") from None
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise ValueError(f"{f} has {size} bytes, {want.get('bytes')} when saved (truncated?)")
        if _sha256(f) != want.get("sha256"):
            raise ValueError(f"{f} does not match its sha256 in {MANIFEST} (altered or corrupt)")
    return True


def resumable_checkpoint(root: Path) -> Path:
    """The newest checkpoint under ``root`` whose files verify (`verify_checkpoint`); newer broken ones are skipped
    with a warning naming the broken file. ValueError when there is none, or none verifies (naming the newest's
    broken file)."""
    root = Path(root)
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()),
                   reverse=True) if root.is_dir() else []
    if not found:
        raise ValueError(f"--resume: no checkpoint under {root}")
    broken = []
    for _, path in found:
        try:
            verified = verify_checkpoint(path)
        except ValueError as e:
            broken.append(str(e))
            continue
        if not verified:
            warnings.warn(f"{path} has no {MANIFEST} (written by an older fastgrpo): resuming from it unverified",
                          stacklevel=2)
        if broken:
            warnings.warn(f"resuming from {path.name}, the newest checkpoint that verifies; skipped newer broken "
                          f"ones: {'; '.join(broken)}", stacklevel=2)
        return path
    raise ValueError(f"--resume: no checkpoint under {root} verifies; the newest: {broken[0]}")


def load_checkpoint(path: Path, *, trainable: dict, ema: dict | None, optimizer, strategy=None) -> dict:
    """Restore weights, EMA (None: the run keeps none), optimizer and RNG states (and ``strategy``'s state when
    saved) from ``path``; return state.json. No file is unpickled with code execution (`load_pt`)."""
    path = Path(path)
    weights = load_safetensors(path / "trainable.safetensors")
    missing = set(trainable) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable weights {sorted(missing)[:3]}... "
                         "(was it written by a run with another model or LoRA config?)")
    if ema is not None and not (path / "ema.safetensors").is_file():
        raise ValueError(f"checkpoint {path} has no EMA (written with train.ema_decay null): resume with "
                         "train.ema_decay=null")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(local_like(weights[k], p))
        if ema is not None:
            for k, v in load_safetensors(path / "ema.safetensors").items():
                ema[k].copy_(local_like(v, ema[k]))
    opt = load_pt(path / "optimizer.pt")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in opt["state"].items():  # whole moments -> this process's shards
        if is_sharded(params[i]):
            opt["state"][i] = {k: local_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape
                               else v for k, v in s.items()}
    optimizer.load_state_dict(opt)
    _set_rng_state(load_pt(path / "rng.pt"), path / "rng.pt")
    if strategy is not None and (path / "strategy.pt").exists():
        strategy.load_state_dict(load_pt(path / "strategy.pt"))
    return read_json(path / "state.json")
