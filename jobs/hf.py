"""``gpthf export-hf``, ``gpthf import-hf`` and ``gpthf lm-eval`` (the ``.[hf]`` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UserError

TASKS = Path(__file__).resolve().parent.parent / "training" / "hf" / "tasks"


class MissingExtra(UserError):
    exit_code = 3


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{module} is not installed: pip install -e '.[hf]'")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="RUN_OR_EXPORT", help="a gpthf export or a training run folder"
    )
    p.add_argument("out", metavar="OUT", help="the Hugging Face folder to write (local or URL)")
    p.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")


def cmd_export_hf(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig
    from training.hf.folder import export_hf

    s = export_hf(args.source, args.out, StorageConfig(endpoint_url=args.endpoint_url))
    print(
        f"[export-hf] {s.arch}, {s.parameters:,} parameters -> {s.out} ({', '.join(s.files)})\n"
        f"  load: AutoModelForCausalLM.from_pretrained({s.out!r}, trust_remote_code=True)"
    )
    return 0


def add_import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="HF_FOLDER", help="a folder written by gpthf export-hf")
    p.add_argument("out", metavar="EXPORT", help="the gpthf export to write (local or URL)")
    p.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")


def cmd_import_hf(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig
    from training.hf.folder import import_hf

    cfg = import_hf(args.folder, args.out, StorageConfig(endpoint_url=args.endpoint_url))
    print(f"[import-hf] {cfg.model.arch} step {cfg.step} -> {args.out}")
    return 0


def add_lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        help="lm-eval's own arguments, e.g. --model gpthf --model_args pretrained=PATH "
        "--tasks gpthf_sample (the gpthf tasks folder is on --include_path)",
    )


def cmd_lm_eval(args: argparse.Namespace) -> int:
    _need("lm_eval")
    from lm_eval.__main__ import cli_evaluate

    import training.hf.lm_eval_model  # noqa: F401  (registers --model gpthf)

    argv = list(args.lm_eval_args)
    if "--include_path" not in argv:
        argv += ["--include_path", str(TASKS)]
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0
