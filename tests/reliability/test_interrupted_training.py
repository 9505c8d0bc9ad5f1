"""Ctrl-C or SIGTERM to a training process: it unwinds, says how to continue, leaks nothing.

Before: SIGINT exited 1 with no hint that ``--resume`` continues, SIGTERM ended the process where
it stood, and both left temporary folders behind (a half-written ``gpthf-ckpt-*``,
``gpthf-metrics-*``). Here real signals go to a real training process (by PID) once it has
written a checkpoint; its temporary folder (TMPDIR, the test's own) is checked for leftovers,
the run folder for its lease, and ``--resume`` continues the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.train.checkpoint import list_checkpoints
from training.train.lease import LEASE

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.train.local", "--data", str(data), "--output", str(out),
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", "2000", "--warmup-steps", "1",
        "--checkpoint-every", "5", "--eval-every", "100000", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_cleans_up_and_says_how_to_continue(
    sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(rows=48, sentences=8, vocab_size=512, shards=2))
    out, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        _cmd(data, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        folder = str(out / "local" / "train")
        while not list_checkpoints(folder):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.2)
        assert any(p.name.startswith("gpthf-") for p in tmp.iterdir())  # it had temporaries
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]  # the signal landed, and was ours to handle
    assert f"interrupted ({sig.name})" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("gpthf-")]
    assert not (out / LEASE).exists()
    last = list_checkpoints(folder)[-1][0]

    resumed = subprocess.run(
        _cmd(data, out, "--resume", "--max-steps", str(last + 2)),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {last})" in resumed.stdout and list_checkpoints(folder)[-1][0] == last + 2
