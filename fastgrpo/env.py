"""What `fastgrpo env` reports: versions, the device, and which backends run here."""
from __future__ import annotations

import importlib.metadata as md
import platform

import torch

from fastgrpo import _ext
from fastgrpo.ops._backend import triton_interpreting, usable_backends

PACKAGES = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft")


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def collect_env() -> dict:
    from fastgrpo import __version__

    info = {"fastgrpo": __version__, "python": platform.python_version()}
    info.update({p: _version(p) for p in PACKAGES})
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        info["device"] = f"cuda:{i} {torch.cuda.get_device_name(i)}"
        info["cuda"] = torch.version.cuda
        info["device_count"] = torch.cuda.device_count()
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    info["triton_interpret"] = triton_interpreting()
    info["backends"] = usable_backends()
    return info


def format_env(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "backends":
            why = {
                "triton": "CUDA present" if torch.cuda.is_available() else
                ("TRITON_INTERPRET=1 (interpreter)" if info["triton_interpret"] else
                 "needs CUDA or TRITON_INTERPRET=1"),
                "cpp": _ext.describe(),
                "torch": "always",
            }
            for name, ok in v.items():
                lines.append(f"{'backend ' + name:<16} {'yes' if ok else 'no':<4} ({why[name]})")
        else:
            lines.append(f"{k:<16} {v}")
    return "\n".join(lines)
