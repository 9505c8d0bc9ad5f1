"""Evaluation job: ``python -m jobs.evaluate --checkpoint URI [--checkpoint URI ...] --data URI
--output URI``.

Every flag is a field of ``training.eval.config.EvalConfig`` (``--help`` lists them all).
"""

from __future__ import annotations

import argparse
import sys

from pipeline import settings
from training.eval.config import EvalConfig, EvalConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, EvalConfig)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return settings.from_args(EvalConfig, args, error=EvalConfigError)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a bad flag or file fails here, before torch and ray load
    from training.eval.job import run_eval
    from training.eval.report import format_table

    report = run_eval(cfg, progress=sys.stderr.isatty())
    print(format_table(report), end="")
    print(
        f"report: {cfg.output.rstrip('/')}/report.json ({report.batching}, {report.wall_s:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("eval"))
