"""Run logging: ``metrics.jsonl`` (one object per optimizer step), tensorboard scalars, and ``curves.png``.

``metrics.jsonl`` is never lost: rows are appended one line at a time, and on ``--resume`` the file is rewritten
(rows past the checkpoint dropped) into a temporary file renamed over it (``os.replace``), so a kill leaves the
old file or the new one. A torn last line (a kill during an append) is dropped with a warning; any other bad line
is a ValueError naming the file and line.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines past the checkpoint we resume from
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once: a temporary file beside it, flushed, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a run killed while writing it) is dropped with a warning,
    any other line that is not a JSON object raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (is it a run folder?)")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a row object with a step")
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped its torn last line {n} (a run killed while writing it?): {e}",
                              stacklevel=2)
                break
            raise ValueError(f"{path} line {n} is not a metrics row ({e}); fix or delete that line") from None
        rows.append(row)
    return rows


def plot_curves(run_dir: Path) -> Path:
    """(Re)draw ``run_dir/curves.png`` from ``run_dir/metrics.jsonl``: reward (mean +- std), loss, KL, entropy (a
    list-valued field such as AEGPO's ``entropy_t`` draws one line per element)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no rows yet")
    steps = [r["step"] for r in rows]
    panels = [("reward", "reward_mean")] + [(k, k) for k in ("loss", "kl", "entropy_t", "entropy_text",
                                                            "entropy_image") if k in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        ys = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, ys, lw=1.5)
        if key == "reward_mean":
            sd = [r.get("reward_std", 0.0) for r in rows]
            ax.fill_between(steps, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
            w = max(1, len(ys) // 8)
            if len(ys) > w:
                smooth = [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))]
                ax.plot(steps[w - 1:], smooth, lw=2.5, label=f"mean of {w}")
                ax.legend(loc="best", fontsize=8)
        if isinstance(ys[0], list):  # one value per denoising step (AEGPO's entropy_t): one line per step
            title += " (a line per denoising step)"
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def reward_improvement(rows: list[dict]) -> dict:
    """Did the reward rise? Mean ``reward_mean`` of the last quarter of steps against the first quarter, with
    the standard error of that difference from the step-to-step spread (``z`` = difference / SE)."""
    ys = [r["reward_mean"] for r in rows]
    q = len(ys) // 4
    if q < 2:
        raise ValueError(f"need at least 8 logged steps to compare quarters, got {len(ys)}")
    first, last = ys[:q], ys[-q:]

    def mean_var(v):
        m = sum(v) / len(v)
        return m, sum((x - m) ** 2 for x in v) / (len(v) - 1)

    (m1, v1), (m2, v2) = mean_var(first), mean_var(last)
    se = math.sqrt(v1 / q + v2 / q)
    return {"first_quarter": m1, "last_quarter": m2, "se": se, "z": (m2 - m1) / se if se > 0 else float("inf")}
