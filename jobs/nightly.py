"""Nightly preprocessing: ``python -m jobs.nightly INPUT... --output URI --tokenizer PATH [--date D]``.

Processes only what arrived since the last run (the preprocessing job is incremental and
idempotent) and writes a dated summary to ``OUT/nightly/<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    from jobs.preprocess import add_args as add_preprocess_args

    add_preprocess_args(p)
    p.add_argument(
        "--input", action="append", dest="input_prefixes", help="input prefix (repeatable)"
    )
    p.add_argument("--date", help="the nightly date (default: today, UTC)")


def main(args: argparse.Namespace) -> int:
    from jobs.preprocess import preprocess_overrides
    from pipeline.config import load_preprocess_config
    from pipeline.preprocess import run_preprocess
    from pipeline.storage import filesystem_for, write_bytes_atomic

    args.inputs = [*(args.inputs or []), *(args.input_prefixes or [])]
    date = args.date or dt.datetime.now(dt.UTC).date().isoformat()
    cfg = load_preprocess_config(args.config, preprocess_overrides(args))
    result = run_preprocess(cfg)
    summary = {
        "date": date,
        "manifest_version": result.version,
        "new_inputs": result.new_inputs,
        "shards_added": result.shards_added,
        "counts": result.run_stats.get("counts", {}),
        "skipped": result.run_stats.get("skipped", {}),
    }
    fs, root = filesystem_for(cfg.output, cfg.storage)
    write_bytes_atomic(fs, f"{root}/nightly/{date}.json", json.dumps(summary, indent=1).encode())
    counts = summary["counts"]
    print(
        f"[nightly {date}] {len(result.new_inputs)} new input file(s), "
        f"{len(result.shards_added)} shard(s), {counts.get('documents', 0):,} documents, "
        f"{counts.get('tokens', 0):,} tokens added; manifest v{result.version}"
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["nightly", *sys.argv[1:]]))
