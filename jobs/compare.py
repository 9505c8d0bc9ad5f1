"""``gpthf compare RUN... [--eval EVAL...] --output DIR``: runs side by side (PNG + table)."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run folders (local or URL)")
    p.add_argument(
        "--eval", nargs="*", default=[], metavar="EVAL", help="outputs of gpthf eval to show"
    )
    p.add_argument("--output", default="compare", help="folder for compare.{png,md,json}")
    p.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")


def main(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig
    from training.compare import compare_runs, format_markdown

    curves = compare_runs(
        args.runs, args.output, args.eval, StorageConfig(endpoint_url=args.endpoint_url)
    )
    print(format_markdown(curves))
    print(f"[compare] wrote {args.output}/compare.png, compare.md, compare.json")
    return 0
