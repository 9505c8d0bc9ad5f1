"""Two training runs into one folder: the second is refused at once, the first finishes whole.

Before: both exited 0 and left a mix (one's config, the other's metrics and export, each having
pruned the other's checkpoints): the "already holds checkpoints" check ran before either wrote
one. Here two real training processes start into one folder while the first holds it; the
test asserts the second met the first's lease (the fault landed: a second run really did start
while the first was alive), then that the first's outputs are its own. A lease left by a dead
run is taken over with a word, and one held by a live process is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.train.lease import LEASE, LeaseInfo, RunInUse, RunLease

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _cmd(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.train.local", "--data", str(data), "--output", str(out),
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", str(steps), "--warmup-steps", "1",
        "--checkpoint-every", "5", "--eval-every", "1000", *extra,
    ]  # fmt: skip


STEPS = 400  # long enough (tens of seconds here) that the second run starts while it trains
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("one-writer") / "data"
    write_synthetic(d, SyntheticSpec(rows=48, sentences=8, vocab_size=512, shards=2))
    return d


def test_a_second_run_into_a_busy_folder_is_refused_at_once(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(
        _cmd(data, out, STEPS, "--seed", "1"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LEASE).exists():
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.1)
        holder = LeaseInfo.from_bytes((out / LEASE).read_bytes())
        assert holder.pid == first.pid  # the fault is real: the first run holds the folder

        t0 = time.monotonic()
        second = subprocess.run(
            _cmd(data, out, STEPS, "--seed", "2"),
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        refused_in = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another training run" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert refused_in < 60  # before any training step (DeepSpeed's import dominates)

        log, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log[-3000:]
    # The folder is the first run's alone, and its lease is gone with it.
    assert json.loads((out / "train_config.json").read_text())["run"]["seed"] == 1
    assert json.loads((out / "summary.json").read_text())["steps"][-1] == STEPS
    assert not (out / LEASE).exists()


def test_a_dead_runs_lease_is_taken_over_and_a_live_ones_is_not(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(gone.stdout)
    stale = RunLease(str(out))
    stale.info = LeaseInfo(**{**stale.info.__dict__, "pid": dead_pid})
    out.mkdir()
    (out / LEASE).write_bytes(stale.info.to_bytes())

    with RunLease(str(out)) as lease:
        assert lease.took_over and f"process {dead_pid}" in lease.took_over
        assert LeaseInfo.from_bytes((out / LEASE).read_bytes()).pid == os.getpid()
        # While it is held by a live process (this one), nobody else gets it.
        with pytest.raises(RunInUse, match="in use by another training run"):
            RunLease(str(out)).acquire()
    assert not (out / LEASE).exists()

    # A lease of another host whose heartbeat stopped long ago is stale too.
    old = LeaseInfo("x", "elsewhere", 1, 0.0, time.time() - 1000, "gpthf train")
    (out / LEASE).write_bytes(old.to_bytes())
    with RunLease(str(out), stale_s=300) as lease:
        assert lease.took_over and "heartbeat" in lease.took_over
    recent = LeaseInfo("y", "elsewhere", 1, 0.0, time.time(), "gpthf train")
    (out / LEASE).write_bytes(recent.to_bytes())
    with pytest.raises(RunInUse):
        RunLease(str(out)).acquire()


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path: Path) -> None:
    with RunLease(str(tmp_path), heartbeat_s=0.2, stale_s=1.0):
        first = LeaseInfo.from_bytes((tmp_path / LEASE).read_bytes()).heartbeat
        time.sleep(1.5)  # longer than stale_s: without beats it would look dead
        now = LeaseInfo.from_bytes((tmp_path / LEASE).read_bytes())
        assert now.heartbeat > first and now.stale_because(time.time(), 1.0) is None
