"""``gpthf submit`` and ``gpthf jobs``: our commands as Ray jobs, through Ray's JobSubmissionClient.

The job ships this repository's code (``working_dir``, without data, virtualenvs or .git: Ray
caps uploads at 100 MiB) and names the environment it needs. Credentials are passed by
reference: the job reads them from its nodes' environment (Kubernetes Secrets, instance
profiles), never from the submission, which anyone with dashboard access can read. Only
non-secret settings (endpoint, region, DS_ACCELERATOR) are forwarded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from jobs.registry import JOBS
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
MODULES = {name: job.module for name, job in JOBS.items()}
EXCLUDES = [
    ".git",
    ".venv",
    "runs",
    "benchmarks/results",
    "**/__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "*.parquet",
    ".whl",
    ".gl",
]
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(UserError):
    """The cluster cannot be reached or a job cannot be submitted; the message says why."""


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    # Ray 2.60 clusters require token auth; the client sends the token (RAY_AUTH_TOKEN or
    # ~/.ray/auth_token) only when this is set.
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or Path("~/.ray/auth_token").expanduser().exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
    addr = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        return JobSubmissionClient(addr)
    except Exception as exc:
        raise SubmitError(
            f"cannot reach the Ray cluster at {addr} ({type(exc).__name__}: {exc}). Check --address / "
            "RAY_ADDRESS, and RAY_AUTH_MODE=token with the cluster's token for token-auth clusters."
        ) from exc


def nightly_submission_id(args: list[str], date: str) -> str:
    """One id per (date, output): submitting the same night twice cannot run it twice."""
    output = args[args.index("--output") + 1] if "--output" in args else ""
    return f"nightly-{date}-{hashlib.sha256(output.encode()).hexdigest()[:8]}"


def build_job(command: str, args: list[str], cpu_cluster: bool) -> tuple[str, dict[str, Any]]:
    if command not in MODULES:
        raise SubmitError(f"cannot submit {command!r}: choose one of {sorted(MODULES)}")
    entrypoint = f"python -m {MODULES[command]} {shlex.join(args)}".strip()
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if cpu_cluster:
        env["DS_ACCELERATOR"] = "cpu"
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env}
    return entrypoint, runtime_env


def submit(
    command: str,
    args: list[str],
    *,
    address: str | None = None,
    submission_id: str | None = None,
    cpu_cluster: bool = False,
    wait: bool = False,
    timeout: float = 3600,
) -> tuple[str, str]:
    """Submit; returns (submission id, status). An id that already exists is not run again."""
    c = client(address)
    if command == "nightly" and submission_id is None:
        date = (
            args[args.index("--date") + 1]
            if "--date" in args
            else dt.datetime.now(dt.UTC).date().isoformat()
        )
        if "--date" not in args:
            args = [*args, "--date", date]
        submission_id = nightly_submission_id(args, date)
    if submission_id is not None:
        try:
            status = str(c.get_job_status(submission_id))
        except Exception:
            status = None
        if status is not None:
            print(
                f"[submit] {submission_id} was already submitted ({status.split('.')[-1]}); not run again"
            )
            return submission_id, status.split(".")[-1]
    entrypoint, runtime_env = build_job(command, args, cpu_cluster)
    deadline = time.monotonic() + 120
    while True:
        try:
            sid = c.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id
            )
            break
        except RuntimeError as exc:
            # A freshly started (or busy) head answers this until its job agents are up.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    print(f"[submit] {sid}: {entrypoint}")
    status = "PENDING"
    if wait:
        status = wait_for(c, sid, timeout)
    return sid, status


def wait_for(c: Any, sid: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(c.get_job_status(sid)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(1.0)
    raise SubmitError(f"{sid} did not finish within {timeout:.0f}s")


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", help="Ray dashboard address (default RAY_ADDRESS or http://127.0.0.1:8265)"
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for the job and exit non-zero if it fails"
    )
    p.add_argument("--submission-id", help="run at most once under this id")
    p.add_argument("--cpu-cluster", action="store_true", help="set DS_ACCELERATOR=cpu for the job")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("job_command", choices=sorted(MODULES))
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="the command's own arguments")


def cmd_submit(args: argparse.Namespace) -> int:
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    sid, status = submit(
        args.job_command,
        job_args,
        address=args.address,
        submission_id=args.submission_id,
        cpu_cluster=args.cpu_cluster,
        wait=args.wait,
        timeout=args.timeout,
    )
    if args.wait:
        print(f"[submit] {sid}: {status}")
        if status != "SUCCEEDED":
            print(client(args.address).get_job_logs(sid)[-3000:], file=sys.stderr)
            return 1
    return 0


def add_jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("submission_id", nargs="?")


def cmd_jobs(args: argparse.Namespace) -> int:
    c = client(args.address)
    if args.action == "list":
        for job in c.list_jobs():
            print(
                f"{job.submission_id or job.job_id}\t{str(job.status).split('.')[-1]}\t{job.entrypoint}"
            )
        return 0
    if not args.submission_id:
        raise SubmitError(f"`gpthf jobs {args.action}` needs a submission id")
    if args.action == "status":
        print(str(c.get_job_status(args.submission_id)).split(".")[-1])
    elif args.action == "logs":
        print(c.get_job_logs(args.submission_id), end="")
    else:
        print("stopped" if c.stop_job(args.submission_id) else "not running")
    return 0
