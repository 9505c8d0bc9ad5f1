"""Running a job: parse its flags, run it, and turn a user error into one line and an exit code.

Both ``gpthf <command>`` (``jobs.cli``) and ``python -m jobs.<module>`` (a job's ``__main__``,
what Ray job submission runs) come through here, so they behave alike.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from jobs.registry import JOBS
from pipeline.errors import UserError, interruption, sigterm_unwinds

AFTER_INTERRUPT = {
    "train": "the checkpoints written so far are kept: run the same command with --resume to "
    "continue from the last one",
    "preprocess": "nothing of this run was committed: run the same command again to process "
    "what is not done yet",
    "nightly": "nothing of this run was committed: run it again to process what is not done yet",
    "eval": "no report was written: run the same command again",
    "study": "the runs keep their checkpoints: run the same command again to continue where it "
    "stopped",
}
"""What to do after an interrupted command (shown with the interruption)."""


def run_command(
    command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """``func(args)``; a ``UserError`` becomes ``gpthf <command>: error: <message>`` on stderr
    and its ``exit_code`` (anything else is a bug and keeps its traceback). Ctrl-C and SIGTERM
    unwind the command (its clean-up runs), then say so and how to continue: exit 130 / 143."""
    try:
        with sigterm_unwinds():
            return func(args)
    except UserError as exc:
        print(f"gpthf {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        name, code = interruption(exc)
        hint = AFTER_INTERRUPT.get(command)
        print(
            f"gpthf {command}: interrupted ({name})" + (f"; {hint}" if hint else ""),
            file=sys.stderr,
        )
        return code


def add_job_parser(parser: argparse.ArgumentParser, name: str) -> None:
    """Give ``parser`` the flags of job ``name`` (from the registry) and its ``main``."""
    module = importlib.import_module(JOBS[name].module)
    module.add_args(parser)
    parser.set_defaults(func=module.main, command=name)


def run_job(name: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) for job ``name`` and run it."""
    job = JOBS[name]
    parser = argparse.ArgumentParser(prog=f"python -m {job.module}", description=job.help)
    add_job_parser(parser, name)
    args = parser.parse_args(argv)
    return run_command(name, args.func, args)
