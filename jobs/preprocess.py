"""Preprocessing job: ``python -m jobs.preprocess INPUT... --output URI --tokenizer PATH``."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import load_preprocess_config
from pipeline.counters import StrictModeError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files, prefixes or globs (local or s3://)"
    )
    p.add_argument("--output", help="output location (local path or s3://bucket/prefix)")
    p.add_argument("--tokenizer", help="tokenizer JSON (local or URL)")
    p.add_argument("--config", help="YAML file; any field of PreprocessConfig (flags override it)")
    p.add_argument("--sentences-per-block", "-S", type=int, dest="S", help="S (default 32)")
    p.add_argument("--max-sentence-tokens", "-M", type=int, dest="M", help="M (default 64)")
    p.add_argument("--heldout-fraction", type=float, help="documents held out (default 0.01)")
    p.add_argument("--seed", type=int, help="seed of the held-out split (default 0)")
    p.add_argument("--strict", action="store_true", default=None, help="skipped records are fatal")
    p.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"])
    p.add_argument("--text-field", help="JSONL field / Parquet column with the text (default text)")
    p.add_argument("--id-field", help="field with a stable document id (default: path#record)")
    p.add_argument(
        "--text-document", choices=["file", "paragraph"], help="plain-text document unit"
    )
    p.add_argument("--workers", type=int, help="concurrent tasks (default: one per CPU)")
    p.add_argument(
        "--on-changed", choices=["error", "replace"], help="inputs changed since processed"
    )
    p.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-plot", action="store_true", help="skip stats.png")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def preprocess_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "input.paths": args.inputs or None,
        "output": args.output,
        "tokenizer": args.tokenizer,
        "packing.sentences_per_block": args.S,
        "packing.max_sentence_tokens": args.M,
        "packing.heldout_fraction": args.heldout_fraction,
        "packing.seed": args.seed,
        "strict": args.strict,
        "input.format": args.format,
        "input.text_field": args.text_field,
        "input.id_field": args.id_field,
        "input.text_document": args.text_document,
        "workers": args.workers,
        "on_changed": args.on_changed,
        "storage.endpoint_url": args.endpoint_url,
        "plot": False if args.no_plot else None,
    }


def main(args: argparse.Namespace) -> int:
    from pipeline.preprocess import run_preprocess
    from pipeline.stats import format_stats

    cfg = load_preprocess_config(args.config, preprocess_overrides(args))
    try:
        result = run_preprocess(cfg, progress=sys.stderr.isatty())
    except StrictModeError as exc:
        print(f"gpthf preprocess: strict mode: {exc}", file=sys.stderr)
        return 1
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
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["preprocess", *sys.argv[1:]]))
