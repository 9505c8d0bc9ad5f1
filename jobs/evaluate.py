"""Evaluation job: ``gpthf eval --checkpoint URI [--checkpoint URI ...] --data URI --output URI``."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import StorageConfig
from training.eval.job import EvalConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="an export folder (OUT/export of a training run); repeat to compare several",
    )
    p.add_argument(
        "--data", required=True, help="a `gpthf preprocess` output (its manifest is read)"
    )
    p.add_argument("--split", default="heldout", help="split of the manifest (default heldout)")
    p.add_argument("--output", required=True, help="folder for report.json, report.md, report.png")
    p.add_argument("--actors", type=int, default=1, help="scoring actors (one model each)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--batching", choices=["prepack", "pad"], default="prepack")
    p.add_argument("--token-budget", type=int, default=1024, help="prepack: tokens per row")
    p.add_argument("--batch-rows", type=int, default=64, help="blocks per forward")
    p.add_argument("--endpoint-url", help="S3-protocol endpoint for s3:// URIs")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        checkpoints=list(args.checkpoint),
        data=args.data,
        output=args.output,
        split=args.split,
        actors=args.actors,
        gpu=args.gpu,
        batching=args.batching,
        token_budget=args.token_budget,
        batch_rows=args.batch_rows,
        storage=StorageConfig(endpoint_url=args.endpoint_url),
    )


def main(args: argparse.Namespace) -> int:
    from training.eval.job import run_eval
    from training.eval.report import format_table

    report = run_eval(config_from_args(args))
    print(format_table(report), end="")
    print(
        f"report: {args.output.rstrip('/')}/report.json ({report.batching}, {report.wall_s:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
