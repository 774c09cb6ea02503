"""Command line: ``fastgrpo train | eval | serve-reward | presets | env | plot | demo`` (DESIGN.md §6).

Errors are one line on stderr, never a traceback: a bad config (unknown key, bad value, YAML syntax error with its
file and line) exits 2; a run that cannot start or stops (an unwritable ``--out``, a model not available locally,
divergence) exits 1; Ctrl-C exits 130 saying how ``--resume`` continues. Under ``accelerate launch`` only rank 0
prints; the other ranks exit quietly with the same code (the launcher then prints its own failure summary).
``--resume`` continues with the run's saved ``config.yaml`` (`_train_config`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _rank() -> int:
    """This process's rank: the process group's once set up, else torchrun's ``RANK`` (``accelerate launch``
    sets it before fastgrpo starts), else 0. Errors print on rank 0 only; the other ranks exit quietly."""
    from fastgrpo.train.distributed import world

    rank, world_size = world()
    if world_size > 1:
        return rank
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _error(prefix: str, message, code: int) -> int:
    if _rank() == 0:
        print(f"{prefix}: {message}", file=sys.stderr)
    return code


def _train_config(args):
    """(config, run folder) for ``fastgrpo train``. A new run: the preset and/or CONFIG.yaml, then ``--set``. With
    ``--resume``: the run's own ``DIR/config.yaml`` (what it started with, and rewritten by every resume), then
    ``--set`` on top (``--set train.steps=16`` extends an 8-step run); a preset or CONFIG.yaml given too is ignored
    with one notice (it would silently replace the run's settings: the preset's ``train.steps`` instead of the run's),
    and used only for a folder without ``config.yaml`` (a run written before fastgrpo saved it)."""
    from fastgrpo.train import resolve_config

    out = args.out or (f"runs/{args.preset or Path(args.config).stem}" if (args.preset or args.config) else None)
    if args.resume:
        if out is None:
            raise ValueError("--resume needs the run folder: --out DIR")
        saved = Path(out).expanduser() / "config.yaml"
        if saved.is_file():
            given = " and ".join(x for x in (args.config and f"config {args.config}",
                                             args.preset and f"--preset {args.preset}") if x)
            if given and _rank() == 0:
                print(f"fastgrpo train: --resume continues with {saved}; {given} ignored (change keys with --set)",
                      file=sys.stderr)
            return resolve_config(saved, None, args.set or []), out
        if not args.config and not args.preset:
            raise ValueError(f"--resume: {out} holds no run to continue (no config.yaml)")
    elif not args.config and not args.preset:
        raise ValueError("give a CONFIG.yaml or --preset NAME (`fastgrpo presets` lists them)")
    return resolve_config(args.config, args.preset, args.set or []), out


def _interrupted(out) -> str:
    """What to do after Ctrl-C: resume from the newest checkpoint, or start over when none was written."""
    from fastgrpo.train.checkpoint import _STEP_DIR

    ckpts = Path(out).expanduser() / "checkpoints"
    steps = sorted(int(m.group(1)) for p in (ckpts.iterdir() if ckpts.is_dir() else ())
                   if (m := _STEP_DIR.match(p.name)))
    if steps:
        return (f"interrupted; `fastgrpo train --resume --out {out}` continues from the newest checkpoint "
                f"(step {steps[-1]})")
    return f"interrupted before the first checkpoint; start over with --overwrite --out {out}"


def _train(args) -> int:
    from fastgrpo.train import TrainingDiverged, train
    from fastgrpo.train.metrics import plot_curves

    try:
        cfg, out = _train_config(args)
    except ValueError as e:
        return _error("fastgrpo train", e, 2)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(f"dry run: the config above is valid; nothing was loaded, trained or written (run folder: {out})")
        return 0
    try:
        out = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, TrainingDiverged) as e:
        return _error("fastgrpo train", f"stopped: {e}", 1)
    except KeyboardInterrupt:
        return _error("fastgrpo train", _interrupted(out), 130)
    from fastgrpo.train.distributed import world

    if world()[0] == 0:
        from fastgrpo.train.metrics import read_metrics, reward_verdict

        png = plot_curves(out)
        print(reward_verdict(read_metrics(out / "metrics.jsonl")))
        samples = out / "samples.png"
        print(f"run folder: {out}\ncurves: {png}")
        if samples.exists():
            print(f"samples: {samples} (the same prompts and seeds at step 0 and at each checkpoint)")
    return 0


def _eval(args) -> int:
    from fastgrpo.train.evaluate import evaluate_run

    try:
        out = evaluate_run(args.run, out=args.out, overrides=args.set or [], steps=args.steps, ema=args.ema,
                           base=not args.no_base)
    except ValueError as e:
        return _error("fastgrpo eval", e, 2)
    print((out / "eval.md").read_text(), end="")
    print(f"eval folder: {out} (eval.json, eval.md, eval_grid.png)")
    return 0


def presets_text(markdown: bool = False) -> str:
    """Every preset with its algo, model family and the first line of its description; ``markdown``: as the
    README's table (tests/test_readme.py checks the README holds exactly this)."""
    from fastgrpo.train.config import load_yaml, preset_paths

    rows = []
    for name, path in preset_paths().items():
        data = load_yaml(path)
        desc = str(data.get("description", "")).strip().splitlines()
        rows.append((name, data.get("algo", ""), (data.get("model") or {}).get("family", ""), desc[0] if desc else ""))
    if not markdown:
        return "\n".join(f"{name:<34} {desc}" for name, _, _, desc in rows)
    lines = ["| preset | algo | family | what it runs |", "|---|---|---|---|"]
    lines += [f"| `{name}` | `{algo}` | {family} | {desc} |" for name, algo, family, desc in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="Fast GRPO training of image generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run a GRPO training from a preset or a YAML config")
    p_train.add_argument("config", nargs="?", help="a YAML config (keys override the preset's)")
    p_train.add_argument("--preset", help="a preset name (see `fastgrpo presets`)")
    p_train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p_train.add_argument("--out", help="run folder (default runs/<preset or config name>)")
    p_train.add_argument("--resume", action="store_true",
                         help="continue the run in --out from its newest checkpoint, with the run's saved "
                              "config.yaml (--set overrides keys of it; a preset or CONFIG given too is ignored)")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start over in an --out that holds a run: delete its metrics, checkpoints, "
                              "tensorboard and curves first (without it such a folder is refused)")
    p_train.add_argument("--dry-run", action="store_true",
                         help="resolve and validate the config, print it and exit (loads no model, writes nothing)")
    p_eval = sub.add_parser("eval", help="evaluate the base model and the checkpoints of a run on fixed prompts and "
                                         "seeds (eval.json, eval.md, eval_grid.png)")
    p_eval.add_argument("run", help="a run folder (every checkpoint) or one checkpoint folder (RUN/checkpoints/step_N)")
    p_eval.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a key of the run's config.yaml, e.g. eval.num_prompts=16 (repeatable)")
    p_eval.add_argument("--steps", type=int, nargs="+", help="only the checkpoints of these steps")
    p_eval.add_argument("--ema", action="store_true", help="evaluate the EMA weights (ema.safetensors)")
    p_eval.add_argument("--no-base", action="store_true", help="skip the base model")
    p_eval.add_argument("--out", help="output folder (default RUN/eval, or RUN/eval_step_N for one checkpoint)")
    p_serve = sub.add_parser("serve-reward", help="serve the rewards of a YAML config over HTTP (for reward: "
                                                  "[{name: remote, args: {url: ...}}])")
    p_serve.add_argument("config", help="a YAML file with a `reward:` list (a training config works)")
    p_serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_presets = sub.add_parser("presets", help="list the presets with a one-line description")
    p_presets.add_argument("--markdown", action="store_true",
                           help="a Markdown table (preset, algo, family, description): the README's list")
    p_env = sub.add_parser("env", help="versions, device, and which backends (triton / cpp / torch) are usable")
    p_env.add_argument("--json", action="store_true", help="print as JSON")
    p_plot = sub.add_parser("plot", help="(re)draw DIR/curves.png from DIR/metrics.jsonl")
    p_plot.add_argument("dir")
    p_demo = sub.add_parser("demo", help="sample a few SDE steps with sde_step on a tiny random SD3 transformer")
    p_demo.add_argument("--batch", type=int, default=4)
    p_demo.add_argument("--steps", type=int, default=10)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--impl", default="auto", choices=["auto", "triton", "torch", "cpp"])
    args = parser.parse_args(argv)

    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "serve-reward":
        from fastgrpo.rewards.remote import serve

        try:
            serve(args.config, host=args.host, port=args.port)
        except ValueError as e:
            return _error("fastgrpo serve-reward", e, 2)
        except KeyboardInterrupt:
            return 0
        return 0
    if args.command == "presets":
        print(presets_text(markdown=args.markdown))
        return 0
    if args.command == "env":
        from fastgrpo.env import collect_env, format_env

        info = collect_env()
        print(json.dumps(info, indent=2) if args.json else format_env(info))
        return 0
    if args.command == "plot":
        from fastgrpo.train.metrics import plot_curves

        try:
            print(plot_curves(args.dir))
        except OSError as e:  # a read-only run folder
            print(f"fastgrpo plot: cannot write {args.dir}/curves.png ({e.strerror or e})", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"fastgrpo plot: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from fastgrpo.demo import main as demo_main

        try:
            return demo_main(batch=args.batch, steps=args.steps, seed=args.seed, impl=args.impl)
        except ValueError as e:  # e.g. --impl triton on a CPU without TRITON_INTERPRET=1
            print(f"fastgrpo demo: {e}", file=sys.stderr)
            return 2
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
