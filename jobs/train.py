"""Training job: ``python -m jobs.train --data URI --output URI [--config FILE] ...``.

Every flag is a field of ``training.train.config.TrainConfig`` (``--help`` lists them all).
"""

from __future__ import annotations

import argparse
import sys

from pipeline import settings
from training.train.config import TrainConfig, TrainConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return settings.from_args(TrainConfig, args, error=TrainConfigError)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a bad flag or file fails here, before torch and ray load
    from training.train.driver import format_summary, run_training

    result = run_training(cfg)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("train"))
