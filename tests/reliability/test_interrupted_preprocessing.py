"""SIGTERM to a preprocessing driver on Ray: it unwinds, says how to continue, leaks nothing.

Before: SIGTERM to `gpthf preprocess` running on Ray ended in Ray's native crash dump with no
word from us, and left the run's staging and temporary folders behind. Here a real SIGTERM goes
to a real driver process (by PID) while its Ray workers are between groups, after the first
group has written its shards to staging; the output and the driver's TMPDIR (the test's own) are
then checked for leftovers, and the re-run processes everything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_document

ROOT = Path(__file__).resolve().parents[2]

DOCS = 360
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _cmd(raw: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "preprocess", str(raw), "--output", str(out),
        "--tokenizer", str(tokenizer), "-S", "8", "-M", "32", "--workers", "1",
        "--local-below-bytes", "0", "--no-plot", *extra,
    ]  # fmt: skip


def test_sigterm_to_a_ray_preprocessing_run_cleans_up_and_says_how_to_continue(
    tmp_path: Path, tokenizer_path: Path, request: pytest.FixtureRequest
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(11)
    for k in range(24):  # ~13 MB: three groups of seconds each on one worker (4 MiB a group)
        docs = [{"text": make_document(rng, 30)} for _ in range(DOCS)]
        (raw / f"part{k:02d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    # The driver's own TMPDIR, short: Ray puts its session's sockets there (at most 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env |= {"TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        _cmd(raw, out, tokenizer_path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("[preprocess] group") for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no group finished within 3 minutes"
            time.sleep(0.05)
        staged = list((out / "_staging").rglob("*.parquet"))
        assert staged  # the run had written shards that are not committed yet
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
    stderr = "".join(lines)
    assert proc.returncode == 143, stderr[-3000:]  # the signal landed, and was ours to handle
    # It stopped midway (not after the last group), said so and how to continue:
    assert not any("driver:" in line and "in all" in line for line in lines), stderr[-3000:]
    assert "gpthf preprocess: interrupted (SIGTERM)" in stderr and "same command again" in stderr
    assert "Traceback" not in stderr and "*** SIGTERM received" not in stderr, stderr[-3000:]
    assert not (out / "manifest.json").exists()
    assert not list((out / "_staging").rglob("*")), "the run's staging was left behind"
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("gpthf-")]

    again = subprocess.run(
        [*_cmd(raw, out, tokenizer_path), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert len(summary["new_inputs"]) == 24 and summary["run"]["counts"]["documents"] == 24 * DOCS
