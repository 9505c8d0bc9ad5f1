"""``gpthf demo [--workdir DIR] [--fresh] [--greedy]``: the main job on the embedded default,
end to end (``training.demo.run_demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", default="runs/demo", help="where the demo writes (default runs/demo)"
    )
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="generate greedily (default: seeded sampling, temperature 0.8, top_k 40, seed 0)",
    )


def main(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    run_demo(Path(args.workdir), fresh=args.fresh, greedy=args.greedy)
    return 0
