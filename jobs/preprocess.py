"""Preprocessing job: ``python -m jobs.preprocess INPUT... --output URI --tokenizer PATH``.

Every flag but ``--json`` is a field of ``pipeline.config.PreprocessConfig`` (``--help`` lists
them all).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import settings
from pipeline.config import PreprocessConfig


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, PreprocessConfig)
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return settings.from_args(PreprocessConfig, args)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from pipeline.preprocess import run_preprocess
    from pipeline.stats import format_stats

    result = run_preprocess(cfg, progress=sys.stderr.isatty())
    if args.json:
        summary = {
            "version": result.version,
            "new_inputs": result.new_inputs,
            "run": result.run_stats,
        }
        print(json.dumps(summary, indent=1, default=str))
    elif not result.wrote_anything:
        print(f"{result.output}: nothing new (manifest v{result.version}); nothing written")
    else:
        print(
            f"{result.output}: manifest v{result.version}, {len(result.new_inputs)} new input file(s), "
            f"{len(result.shards_added)} shard(s) added"
        )
        print(format_stats(result.stats))
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("preprocess"))
