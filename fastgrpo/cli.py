"""Command line: ``fastgrpo env | demo`` (``train | presets | plot`` arrive with the training loop)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="Fast GRPO training of image generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="versions, device, and which backends (triton / cpp / torch) are usable")
    p_env.add_argument("--json", action="store_true", help="print as JSON")
    p_demo = sub.add_parser("demo", help="sample a few SDE steps with sde_step on a tiny random SD3 transformer")
    p_demo.add_argument("--batch", type=int, default=4)
    p_demo.add_argument("--steps", type=int, default=10)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--impl", default="auto", choices=["auto", "triton", "torch", "cpp"])
    args = parser.parse_args(argv)

    if args.command == "env":
        from fastgrpo.env import collect_env, format_env

        info = collect_env()
        print(json.dumps(info, indent=2) if args.json else format_env(info))
        return 0
    if args.command == "demo":
        from fastgrpo.demo import main as demo_main

        return demo_main(batch=args.batch, steps=args.steps, seed=args.seed, impl=args.impl)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
