"""Nightly preprocessing: ``python -m jobs.nightly --input URI... --output URI --tokenizer PATH
[--date D]``.

The preprocessing flags (fields of ``pipeline.config.PreprocessConfig``) plus ``--date``; the
run processes only what arrived since the last one (``pipeline.nightly``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline import settings
from pipeline.config import PreprocessConfig


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, PreprocessConfig)
    p.add_argument("--date", help="the nightly date, YYYY-MM-DD (default: today, UTC)")


def main(args: argparse.Namespace) -> int:
    from pipeline.nightly import run_nightly

    summary = run_nightly(settings.from_args(PreprocessConfig, args), args.date)
    print(summary.format())
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("nightly"))
