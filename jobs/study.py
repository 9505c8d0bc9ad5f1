"""Study job: ``python -m jobs.study --preset cpu --output DIR`` or ``--config study.yaml``.

Every flag is a field of ``training.study.config.StudyConfig`` (``--help`` lists them all);
``--preset NAME`` starts from a shipped preset (cpu, gpu-small, paper), which a ``--config``
file and flags then override.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline import settings
from training.study.config import StudyConfig, StudyConfigError, preset_path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a shipped study preset: cpu, gpu-small or paper (training/study/presets)",
    )
    settings.add_flags(p, StudyConfig)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a list, such as the models, is replaced)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """Defaults <- the preset <- the --config file <- flags."""
    data: dict[str, Any] = {}
    if args.preset:
        data = settings.read_yaml(preset_path(args.preset), StudyConfigError)
    path = getattr(args, settings.CONFIG_FLAG, None)
    if path:
        data = _merged(data, settings.read_yaml(path, StudyConfigError))
    overrides = settings.flag_overrides(StudyConfig, args)
    return settings.build(StudyConfig, settings.layer(data, overrides), error=StudyConfigError)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a bad flag or file fails here, before torch and ray load
    cfg.validate_for_run()
    from training.study.report import format_markdown
    from training.study.run import run_study

    report = run_study(cfg)
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("study"))
