"""Command line: ``fastgrpo train | presets | env | plot | demo`` (DESIGN.md §6)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args) -> int:
    from fastgrpo.train import TrainingDiverged, resolve_config, train
    from fastgrpo.train.metrics import plot_curves

    if not args.config and not args.preset:
        print("fastgrpo train: give a CONFIG.yaml or --preset NAME (`fastgrpo presets` lists them)",
              file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(args.config, args.preset, args.set or [])
    except ValueError as e:
        print(f"fastgrpo train: {e}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{args.preset or Path(args.config).stem}"
    try:
        out = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, TrainingDiverged) as e:
        print(f"fastgrpo train: stopped: {e}", file=sys.stderr)
        return 1
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="Fast GRPO training of image generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run a GRPO training from a preset or a YAML config")
    p_train.add_argument("config", nargs="?", help="a YAML config (keys override the preset's)")
    p_train.add_argument("--preset", help="a preset name (see `fastgrpo presets`)")
    p_train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p_train.add_argument("--out", help="run folder (default runs/<preset or config name>)")
    p_train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start over in an --out that holds a run: delete its metrics, checkpoints, "
                              "tensorboard and curves first (without it such a folder is refused)")
    sub.add_parser("presets", help="list the presets with a one-line description")
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
    if args.command == "presets":
        from fastgrpo.train.config import load_yaml, preset_paths

        for name, path in preset_paths().items():
            desc = str(load_yaml(path).get("description", "")).strip().splitlines()
            print(f"{name:<34} {desc[0] if desc else ''}")
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

        return demo_main(batch=args.batch, steps=args.steps, seed=args.seed, impl=args.impl)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
