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


def curve_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(y-axis label, metrics key) of each panel of ``curves.png``. The reward always; ``loss`` and ``kl`` only when
    they carry information: a KL that is 0 at every step (``train.beta`` = 0 computes none) is dropped, and so is a
    loss that never exceeds 1e-6 in size -- one on-policy step of Flow-GRPO has ratio 1, so its loss is minus the
    mean of per-group normalised advantages, 0 up to rounding (~1e-8): its gradient trains, its value says nothing.
    Entropies (AEGPO's ``entropy_t``, Janus's ``entropy_text`` / ``entropy_image``) when logged."""
    panels = [("reward (mean +- std over the step's rollouts)", "reward_mean")]
    for key, label in (("loss", "loss"), ("kl", "KL to the reference")):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if vals and max(abs(v) for v in vals) > (0.0 if key == "kl" else 1e-6):
            panels.append((label, key))
    panels += [(k.replace("_", " "), k) for k in ("entropy_t", "entropy_text", "entropy_image") if k in rows[0]]
    return panels


def plot_curves(run_dir: Path) -> Path:
    """(Re)draw ``run_dir/curves.png`` from ``run_dir/metrics.jsonl``: the panels of `curve_panels`, x = optimizer
    step, y = the quantity (a list-valued field such as AEGPO's ``entropy_t`` draws one line per element).

    The reward panel also draws the held-out evaluation (``eval_reward_mean`` ± ``eval_reward_se``, logged every
    ``eval.every`` steps: `fastgrpo.train.evaluate`) where the run has one. It is kept honest: when every reward is
    >= 0 its y-axis starts at 0 (a gain of 0.5% is not stretched over the whole panel), and its title states the
    change of the mean reward from the first quarter of steps to the last, relative and in standard errors
    (`reward_improvement`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no rows yet")
    steps = [r["step"] for r in rows]
    panels = curve_panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (label, key) in zip(axes[0], panels):
        ys = [r.get(key, float("nan")) for r in rows]
        title = label
        ax.plot(steps, ys, lw=1.5)
        if key == "reward_mean":
            sd = [r.get("reward_std", 0.0) for r in rows]
            ax.fill_between(steps, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
            w = max(1, len(ys) // 8)
            if len(ys) > w:
                smooth = [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))]
                ax.plot(steps[w - 1:], smooth, lw=2.5, label=f"mean of {w}")
                ax.legend(loc="best", fontsize=8)
            held = [(r["step"], r["eval_reward_mean"], r.get("eval_reward_se", 0.0)) for r in rows
                    if isinstance(r.get("eval_reward_mean"), (int, float)) and math.isfinite(r["eval_reward_mean"])]
            if held:  # eval.every: the held-out evaluation (fixed prompts and seeds, deterministic sampling)
                ax.errorbar([h[0] for h in held], [h[1] for h in held], yerr=[h[2] for h in held], fmt="o-",
                            ms=4, lw=1.2, capsize=2, label="held-out eval (± s.e.)")
                ax.legend(loc="best", fontsize=8)
            finite = [(y, s) for y, s in zip(ys, sd) if math.isfinite(y)]
            finite += [(h[1], h[2]) for h in held if math.isfinite(h[2])]
            if finite and all(y - s >= 0 for y, s in finite):
                ax.set_ylim(0, 1.08 * max(y + s for y, s in finite) or 1.0)
            title = "reward"
            if len(rows) >= 8:
                c = reward_improvement(rows)
                rel = (c["last_quarter"] - c["first_quarter"]) / abs(c["first_quarter"]) if c["first_quarter"] else 0.0
                title = (f"reward: {c['first_quarter']:.4g} -> {c['last_quarter']:.4g} ({rel:+.1%}, "
                         f"z = {c['z']:.1f})\n(first vs last quarter of steps)")
        if isinstance(ys[0], list):  # one value per denoising step (AEGPO's entropy_t): one line per step
            title += " (a line per denoising step)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label, fontsize=8)
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


def reward_verdict(rows: list[dict]) -> str:
    """One plain sentence: did the reward rise? "reward rose by X (...)" when the last quarter of steps beats the
    first by more than two standard errors (`reward_improvement`), otherwise "reward did NOT rise (...)" saying
    whether it fell or stayed within noise."""
    if len(rows) < 8:
        return f"too few steps ({len(rows)}) to tell whether the reward rose: the verdict needs at least 8"
    c = reward_improvement(rows)
    m1, m2, z = c["first_quarter"], c["last_quarter"], c["z"]
    diff = m2 - m1
    rel = f", {diff / abs(m1):+.1%}" if m1 else ""
    span = f"mean reward {m1:.4f} in the first quarter of steps -> {m2:.4f} in the last"
    if z > 2:
        return f"reward rose by {diff:.4f}{rel} (z = {z:.1f} standard errors; {span})"
    how = "it fell" if z < -2 else "the change is within noise"
    return f"reward did NOT rise ({how}: {diff:+.4f}{rel}, z = {z:.1f}; a rise needs z > 2; {span})"
