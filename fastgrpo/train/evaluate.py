"""Evaluation: what training did, measured on prompts and seeds that do not change (``fastgrpo eval``, ``eval.every``).

`evaluate_run(RUN_OR_CHECKPOINT)` evaluates the base model and each checkpoint of a run (or the base and one
checkpoint) on the ``eval`` section of the run's config (`fastgrpo.train.config.EvalConfig`):

* **prompts**: the first ``eval.num_prompts`` of ``eval.prompts`` (default ``heldout``: built-in prompts the training
  list does not hold), ``eval.samples_per_prompt`` samples each;
* **seeds**: sample j of prompt i starts from the generator keyed by (``eval.seed``, `STREAM_EVAL`, i * K + j), the
  same for the base and every checkpoint, whatever the run's seed, so two columns differ only through the weights;
* **sampling**: deterministic, the family trainer's ``preview`` (flow families: the ODE, no SDE noise; Janus: its
  token sampling from those fixed generators), in chunks of ``sample.batch_size``;
* **rewards**: every item of ``eval.reward`` (default: the training ``reward`` list), each reported on its own, and
  with several their weighted sum as ``reward``.

Per checkpoint and reward: every sample's value, the mean, its standard error (sample std, ddof 1, over sqrt(n))
and n; the difference
to the base as the mean of the per-sample differences (the same prompt and seed in both: a paired difference) with
its standard error. Written to the output folder (default ``RUN/eval``; ``RUN/eval_step_N`` for one checkpoint):
``eval.json`` (everything above, the prompts, the settings), ``eval.md`` (a markdown table) and ``eval_grid.png``
(one row per prompt, its first sample; one column per checkpoint, base first; a video shows a strip of frames).

``eval.every = N`` evaluates the current weights every N optimizer steps during training (`Evaluator`); the means and
standard errors go to ``metrics.jsonl`` and tensorboard as ``eval_reward_mean`` / ``eval_reward_se`` (and
``eval_<name>_mean`` / ``_se`` per reward when there are several), and ``curves.png`` draws them on the reward
panel. Every process evaluates (FSDP gathers weights in each forward); rank 0 logs. Neither draws randomness of the
run nor counts in ``model_forwards``, so a run gives the same rollouts with and without evaluation.

Decisions where the issue is silent: the weights evaluated are the trained ones (``--ema`` evaluates the EMA,
``ema.safetensors``); ``fastgrpo eval`` runs in one process; a checkpoint whose files do not verify against their
manifest is refused (ValueError naming it and the file), one without a manifest (older) is loaded with a warning.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import torch

STREAM_EVAL = 19  # the evaluation's generator stream (`fastgrpo.train.distributed.step_generator`)
GRID_FRAMES = 6  # frames shown per video in the grid
CELL = 96  # grid cells are scaled up to at least this many pixels high


# ----------------------------------------------------------------------------------------------- the eval set
def eval_prompts(cfg) -> list[str]:
    from .prompts import load_prompts

    from fastgrpo.families import get_family

    try:
        prompts = load_prompts(cfg.eval.prompts, edit=get_family(cfg.model.family).edits_images,
                               family=cfg.model.family)
    except ValueError as e:
        raise ValueError(str(e).replace("prompts.source", "eval.prompts")) from None
    return prompts[:cfg.eval.num_prompts]


def eval_generators(seed: int, n_prompts: int, per_prompt: int) -> list:
    from .distributed import step_generator

    return [step_generator(seed, 0, STREAM_EVAL, i * per_prompt + j)
            for i in range(n_prompts) for j in range(per_prompt)]


def eval_rewards(cfg) -> list:
    """[(label, weight, reward)] of ``eval.reward`` (or the training ``reward``): a reward named twice is labelled
    ``name``, ``name_2``, ..."""
    from fastgrpo.rewards import build_reward

    specs = cfg.eval.reward if cfg.eval.reward is not None else cfg.reward
    out, seen = [], {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        label = spec.name if seen[spec.name] == 1 else f"{spec.name}_{seen[spec.name]}"
        out.append((label, float(spec.weight), build_reward([{"name": spec.name, "weight": 1.0, "args": spec.args}])))
    return out


def _stats(values: torch.Tensor) -> dict:
    v = values.double()
    n = v.numel()
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se, "n": n}


class Evaluator:
    """The eval set of a trainer's config, sampled with the trainer's current weights (``__call__``)."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.prompt_list = eval_prompts(cfg)
        k = cfg.eval.samples_per_prompt
        self.prompts = [p for p in self.prompt_list for _ in range(k)]
        self.generators = lambda: eval_generators(cfg.eval.seed, len(self.prompt_list), k)
        self.rewards = eval_rewards(cfg)
        for _, _, fn in self.rewards:
            fn.check_prompts(self.prompt_list, key="eval.prompts")

    @torch.no_grad()
    def sample(self, progress=None) -> torch.Tensor:
        """The eval set's images [N, 3, H, W] (videos [N, F, 3, H, W]) from the current weights."""
        t, bs = self.trainer, self.trainer.cfg.sample.batch_size
        gens = self.generators()
        out = []
        for i in range(0, len(self.prompts), bs):
            out.append(t.preview(self.prompts[i:i + bs], gens[i:i + bs]).float().cpu())
            if progress is not None:
                progress.update(1)
        return torch.cat(out)

    def score(self, images: torch.Tensor) -> dict:
        """{label: float64 [N]} for each reward, and ``reward``: their weighted sum. A group-level reward
        (`fastgrpo.rewards.is_group_level`) compares each prompt's ``eval.samples_per_prompt`` images."""
        scores, total = {}, None
        groups = [self.trainer.cfg.eval.samples_per_prompt] * len(self.prompt_list)
        for label, weight, fn in self.rewards:
            r, _ = fn(images, self.prompts, group_sizes=groups)
            scores[label] = r.double()
            total = weight * scores[label] if total is None else total + weight * scores[label]
        scores["reward"] = total
        return scores

    def __call__(self) -> dict:
        """The metrics row fields of an evaluation of the current weights (every process computes them)."""
        t = self.trainer
        before = t.policy.model_forwards
        with t.parallel.sampling():
            images = self.sample()
        t._forwards_seen += t.policy.model_forwards - before
        scores = self.score(images)
        row = {}
        for label, values in scores.items():
            if label != "reward" and len(scores) == 2:
                continue  # one reward: its value is the total
            st = _stats(values)
            row[f"eval_{label}_mean"], row[f"eval_{label}_se"] = st["mean"], st["se"]
        return row


# ------------------------------------------------------------------------------------------- fastgrpo eval
def _run_and_checkpoints(path: Path, steps=None) -> tuple[Path, list[Path], Path]:
    """(run folder, checkpoint folders to evaluate, default output folder) for a run folder or one checkpoint."""
    from .checkpoint import _STEP_DIR

    path = Path(path).expanduser()
    if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        run = path.parent.parent
        ckpts, out = [path], run / f"eval_{path.name}"
    else:
        run = path
        root = run / "checkpoints"
        ckpts = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else (),
                       key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
        out = run / "eval"
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{path} is not a run folder or a checkpoint of one (no {run / 'config.yaml'})")
    if steps:
        have = {int(_STEP_DIR.match(p.name).group(1)): p for p in ckpts}
        missing = [s for s in steps if s not in have]
        if missing:
            raise ValueError(f"--steps {missing}: {run} has no checkpoint of step(s) {missing} "
                             f"(it has {sorted(have) or 'none'})")
        ckpts = [have[s] for s in steps]
    return run, ckpts, out


def _load_weights(trainer, ckpt: Path, ema: bool) -> None:
    from .checkpoint import load_safetensors, verify_checkpoint

    try:
        verified = verify_checkpoint(ckpt)
    except ValueError as e:
        raise ValueError(f"checkpoint {ckpt.name} is broken: {e}; evaluate other steps (--steps)") from None
    if not verified:
        import warnings

        warnings.warn(f"{ckpt} has no manifest (written before manifests existed): loaded unverified", stacklevel=3)
    name = "ema.safetensors" if ema else "trainable.safetensors"
    if not (ckpt / name).is_file():
        raise ValueError(f"--ema: {ckpt / name} does not exist (the run kept no EMA: train.ema_decay null)"
                         if ema else f"{ckpt / name} does not exist")
    weights = load_safetensors(ckpt / name)
    missing = sorted(set(trainer.named) - set(weights))
    if missing:
        raise ValueError(f"{ckpt / name} lacks {len(missing)} trainable weight(s) of this config, e.g. "
                         f"{missing[0]!r}: was it written by another model or model.lora setting?")
    with torch.no_grad():
        for k, p in trainer.named.items():
            p.copy_(weights[k].to(p.device, p.dtype))


def evaluate_run(path, *, out=None, overrides=(), steps=None, ema: bool = False, base: bool = True,
                 device=None, progress: bool = True) -> Path:
    """Evaluate the base model and the checkpoints of a run (or one checkpoint); returns the output folder holding
    ``eval.json``, ``eval.md`` and ``eval_grid.png``. ``overrides``: ``--set`` items on top of the run's
    ``config.yaml`` (e.g. ``eval.num_prompts=16``, ``eval.reward=[...]``); ``steps``: only these checkpoints."""
    from tqdm.auto import tqdm

    from .config import resolve_config
    from .loop import check_model_sources
    from .run import make_trainer

    run, ckpts, default_out = _run_and_checkpoints(Path(path), steps)
    out = Path(out).expanduser() if out is not None else default_out
    cfg = resolve_config(run / "config.yaml", None, [*overrides, "log.tensorboard=false", "log.progress=false"])
    columns = (["base"] if base else []) + [c.name for c in ckpts]
    if not columns:
        raise ValueError(f"{run} has no checkpoint to evaluate and base=False")
    check_model_sources(cfg, check_eval=True)  # eval.reward's models too, before anything loads
    with tempfile.TemporaryDirectory(prefix="fastgrpo-eval-") as tmp:
        trainer = make_trainer(cfg, Path(tmp) / "run", device=device)
        ev = Evaluator(trainer)
        chunks = -(-len(ev.prompts) // cfg.sample.batch_size)
        bar = tqdm(total=len(columns) * chunks, desc="fastgrpo eval", disable=not progress)
        images, scores = {}, {}
        paths = {c.name: c for c in ckpts}
        for name in columns:
            if name != "base":
                _load_weights(trainer, paths[name], ema)
            images[name] = ev.sample(bar)
            scores[name] = ev.score(images[name])
        bar.close()
        # one reward: the weighted total repeats it (times its weight) and is left out of the report
        labels = [l for l in scores[columns[0]] if l != "reward" or len(ev.rewards) > 1]
    report = _report(run, cfg, columns, ev, scores, labels, ema)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown_table(report) + "\n")
    draw_grid(out / "eval_grid.png", ev.prompt_list, cfg.eval.samples_per_prompt, columns, images)
    return out


def _report(run, cfg, columns, ev, scores, labels, ema) -> dict:
    rows = []
    for name in columns:
        m = re.match(r"step_(\d+)$", name)
        entry = {"name": name, "step": int(m.group(1)) if m else 0, "rewards": {}}
        for label in labels:
            st = _stats(scores[name][label])
            st["values"] = scores[name][label].tolist()  # per sample, prompt-major (prompt i, seed j at i*K + j)
            if name != "base" and "base" in scores:
                d = _stats(scores[name][label] - scores["base"][label])
                st["delta"], st["delta_se"] = d["mean"], d["se"]
            entry["rewards"][label] = st
        rows.append(entry)
    return {"run": str(run), "family": cfg.model.family, "algo": cfg.algo, "weights": "ema" if ema else "trainable",
            "sampling": "deterministic (flow: ODE; autoregressive: fixed generators)",
            "prompts": ev.prompt_list, "prompt_source": cfg.eval.prompts,
            "samples_per_prompt": cfg.eval.samples_per_prompt, "seed": cfg.eval.seed,
            "rewards": [{"label": l, "weight": w} for l, w, _ in ev.rewards], "checkpoints": rows}


def markdown_table(report: dict) -> str:
    """One row per checkpoint: each reward's mean ± standard error and its paired difference to the base."""
    labels = list(report["checkpoints"][0]["rewards"])
    head = "| checkpoint | " + " | ".join(f"{l} | Δ {l} vs base" for l in labels) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(labels)]
    for c in report["checkpoints"]:
        cells = []
        for l in labels:
            r = c["rewards"][l]
            cells.append(f"{r['mean']:.4g} ± {r['se']:.2g}")
            cells.append(f"{r['delta']:+.4g} ± {r['delta_se']:.2g}" if "delta" in r else "—")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    n = report["checkpoints"][0]["rewards"][labels[0]]["n"]
    lines.append("")
    lines.append(f"{len(report['prompts'])} prompts ({report['prompt_source']}) x {report['samples_per_prompt']} "
                 f"seeds = {n} samples per checkpoint, {report['sampling']}; ± one standard error; Δ: the mean "
                 "of the per-sample differences to the base (same prompt and seed).")
    return "\n".join(lines)


def _cell(img: torch.Tensor):
    """uint8 HxWx3 of one sample: an image [3, H, W], or a strip of up to GRID_FRAMES frames of a video."""
    if img.dim() == 4:  # [F, 3, H, W]
        idx = torch.linspace(0, img.shape[0] - 1, min(GRID_FRAMES, img.shape[0])).round().long()
        img = torch.cat(list(img[idx]), dim=-1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def draw_grid(path: Path, prompts: list, per_prompt: int, columns: list, images: dict) -> Path:
    """``eval_grid.png``: one row per prompt (its first sample), one column per checkpoint."""
    from PIL import Image, ImageDraw

    first = _cell(images[columns[0]][0])
    h, w = first.shape[:2]
    scale = max(1, -(-CELL // h))
    cw, ch, pad, label_w, head_h = w * scale, h * scale, 4, 160, 24
    canvas = Image.new("RGB", (label_w + len(columns) * (cw + pad), head_h + len(prompts) * (ch + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cw + pad), 6), name.replace("_", " "), fill="black")
    for i, prompt in enumerate(prompts):
        y = head_h + i * (ch + pad)
        draw.text((4, y + ch // 2 - 6), prompt if len(prompt) <= 26 else prompt[:25] + "…", fill="black")
        for j, name in enumerate(columns):
            cell = Image.fromarray(_cell(images[name][i * per_prompt])).resize((cw, ch), Image.NEAREST)
            canvas.paste(cell, (label_w + j * (cw + pad), y))
    canvas.save(path)
    return path
