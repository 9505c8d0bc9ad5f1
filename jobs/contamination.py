"""Held-out contamination check: ``python -m jobs.contamination --output OUT [--mode near] [--remove]``.

Every flag but ``--json`` is a field of ``pipeline.contamination.ContaminationConfig``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import settings
from pipeline.contamination import ContaminationConfig


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, ContaminationConfig)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from pipeline.contamination import check_contamination

    report = check_contamination(settings.from_args(ContaminationConfig, args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format())
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("contamination"))
