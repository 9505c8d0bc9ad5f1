"""Two guarantees of the bad-night table that had no test: a resume on another schedule or
another tokenizer is refused (it would continue a run with data or maths it never saw), and the
staging a killed preprocessing run leaves is removed once it is a day old (not before: it may
belong to a run still going)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.preprocess import STALE_STAGING_S, sweep_staging

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "training.train.local", "--data", str(data), "--output", str(out),
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", "6", "--warmup-steps", "1", "--checkpoint-every",
        "2", "--eval-every", "1000", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_a_resume_on_another_schedule_or_tokenizer_is_refused(tmp_path: Path) -> None:
    spec = SyntheticSpec(rows=32, sentences=8, vocab_size=512, shards=2)
    data, other = tmp_path / "data", tmp_path / "other-tokenizer"
    write_synthetic(data, spec)
    write_synthetic(other, SyntheticSpec(**{**spec.__dict__, "word_prefix": "w"}))
    assert (data / "tokenizer.json").read_text() != (other / "tokenizer.json").read_text()
    out = tmp_path / "run"
    first = _train(data, out, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]

    schedule = _train(data, out, "--resume", "--lr", "5e-4")
    assert schedule.returncode == 2, schedule.stderr[-3000:]
    assert "schedule" in schedule.stderr and "Traceback" not in schedule.stderr

    tokenizer = _train(other, out, "--resume")
    assert tokenizer.returncode == 2, tokenizer.stderr[-3000:]
    assert "tokenizer" in tokenizer.stderr and "Traceback" not in tokenizer.stderr

    same = _train(data, out, "--resume")  # the run itself still continues
    assert same.returncode == 0 and "(step 2)" in same.stdout, same.stderr[-3000:]


def test_a_killed_runs_staging_goes_after_a_day_and_not_before(tmp_path: Path) -> None:
    out = tmp_path / "out"
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)

    def staging(age_s: float) -> Path:
        started = now - dt.timedelta(seconds=age_s)
        d = out / "_staging" / (started.strftime("%Y%m%dT%H%M%SZ") + "-deadbeef")
        d.mkdir(parents=True)
        (d / "part.parquet").write_bytes(b"x" * 100)
        return d

    old, recent = staging(STALE_STAGING_S + 60), staging(STALE_STAGING_S - 60)
    removed = sweep_staging(str(out), now=now)
    assert not old.exists() and recent.exists()
    assert len(removed) == 1 and old.name in removed[0]
