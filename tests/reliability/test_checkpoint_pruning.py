"""A checkpoint damaged on disk (a full disk truncates a shard mid-write, or a file is altered)
never takes the place of an intact one when the run prunes its checkpoints.

Before: pruning kept the newest ``keep`` checkpoints whose trainer state was readable, so with
the newest one truncated it deleted the intact one before it and kept the damaged one; the run
could then only start over. Real checkpoints of a real (tiny, one-rank, CPU) training run are
damaged on disk here; the test asserts the damage is visible to verification (the fault landed)
before asserting what pruning keeps, and that ``--resume`` then finishes the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.train.checkpoint import list_checkpoints
from training.train.driver import checkpoint_problems, prune_checkpoints

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "training.train.local", "--data", str(data), "--output", str(out),
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", "6", "--warmup-steps", "1", "--checkpoint-every",
        "2", "--eval-every", "1000", "--run.keep_checkpoints", "3", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune")
    data = root / "data"
    write_synthetic(data, SyntheticSpec(rows=32, sentences=8, vocab_size=512, shards=2))
    return data, root


def _fresh_run(trained: tuple[Path, Path], name: str) -> tuple[Path, str]:
    data, root = trained
    out = root / name
    proc = _train(data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = str(out / "local" / "train")
    assert [s for s, _ in list_checkpoints(folder)] == [2, 4, 6]
    return out, folder


def _truncate_largest_file(checkpoint_uri: str) -> Path:
    files = [p for p in Path(checkpoint_uri).rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    with victim.open("r+b") as f:  # what a write cut short by a full disk leaves
        f.truncate(victim.stat().st_size // 2)
    return victim


def test_a_truncated_newest_checkpoint_never_replaces_the_intact_one(
    trained: tuple[Path, Path],
) -> None:
    out, folder = _fresh_run(trained, "truncated")
    (_, c2), (_, c4), (_, c6) = list_checkpoints(folder)
    _truncate_largest_file(c6)
    # The fault landed: the trainer state still reads (the old pruning trusted that), but the
    # checkpoint no longer verifies.
    assert [s for s, _ in list_checkpoints(folder)] == [2, 4, 6]
    assert checkpoint_problems(c6) and not checkpoint_problems(c4)

    removed = prune_checkpoints(folder, keep=1)

    assert sorted(removed) == sorted([c2, c6])
    assert [s for s, _ in list_checkpoints(folder)] == [4]  # the newest intact one survives
    # ... and the run continues from it and ends where it would have.
    proc = _train(trained[0], out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {c4}" in proc.stdout
    assert (out / "export" / "model.safetensors").exists()
    assert [s for s, _ in list_checkpoints(folder)][-1] == 6


def test_with_no_intact_checkpoint_nothing_is_removed(trained: tuple[Path, Path]) -> None:
    _, folder = _fresh_run(trained, "all-damaged")
    checkpoints = [c for _, c in list_checkpoints(folder)]
    for c in checkpoints:
        _truncate_largest_file(c)
    assert all(checkpoint_problems(c) for c in checkpoints)
    assert prune_checkpoints(folder, keep=1) == []
    assert [c for _, c in list_checkpoints(folder)] == checkpoints
