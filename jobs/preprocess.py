"""Preprocessing job: ``python -m jobs.preprocess INPUT... --output URI --tokenizer PATH``."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import load_preprocess_config
from pipeline.counters import StrictModeError


def main(args: argparse.Namespace) -> int:
    from jobs.cli import preprocess_overrides, print_json
    from pipeline.preprocess import run_preprocess
    from pipeline.stats import format_stats

    cfg = load_preprocess_config(args.config, preprocess_overrides(args))
    try:
        result = run_preprocess(cfg, progress=sys.stderr.isatty())
    except StrictModeError as exc:
        print(f"gpthf preprocess: strict mode: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(
            {"version": result.version, "new_inputs": result.new_inputs, "run": result.run_stats}
        )
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
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["preprocess", *sys.argv[1:]]))
