"""A disk that fills up during preprocessing: one clear message, and the disk given back.

Before: the message was clear, but the failed run left its own staging behind, which kept the
disk full; the next run then failed without saying why and left a probe file. Here the output
is a real, small tmpfs (mounted by the test; skipped where mounting is not allowed), so the
writes really fail with ENOSPC; the test asserts the failure came from the full disk (the fault
landed) before asserting what is left on it.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
from pipeline.errors import UserError
from pipeline.preprocess import run_preprocess
from tests.conftest import make_document

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): no real full disk")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_fails_clearly_and_leaves_the_disk_as_it_was(
    small_disk: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    rng = random.Random(3)
    src = tmp_path / "raw"
    src.mkdir()
    for k in range(3):  # ~2 MB of text: its shards do not fit in 32 KiB
        (src / f"part-{k}.txt").write_text("\n\n".join(make_document(rng) for _ in range(600)))
    cfg = PreprocessConfig(
        input=InputConfig(paths=[str(src)]),
        output=str(small_disk / "out"),
        tokenizer=str(tokenizer_path),
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16),
        plot=False,
    )
    free_before = shutil.disk_usage(small_disk).free

    for attempt in range(2):  # the re-run meets the same disk: the same clear story
        with pytest.raises(UserError) as caught:
            run_preprocess(cfg)
        message = str(caught.value)
        assert "no space left" in message, message  # the fault landed: ENOSPC, attempt 1 and 2
        assert "cannot write shards" in message  # ... while writing shards, not at the probe
        assert "B free of" in message and "nothing of this run was committed" in message
        out = small_disk / "out"
        leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert leftovers == [], (attempt, leftovers)  # no staging, no probe, no half shard
        assert not (out / "manifest.json").exists()
        assert shutil.disk_usage(small_disk).free >= free_before - 64 * 1024  # given back


TRAIN = [
    "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
    "--micro-batch", "2", "--total-steps", "6", "--warmup-steps", "1", "--checkpoint-every", "2",
    "--eval-every", "1000", "--run.keep_checkpoints", "3",
]  # fmt: skip


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    cmd = [sys.executable, "-m", "training.train.local", "--data", str(data), "--output",
           str(out), *TRAIN, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_while_training_keeps_the_good_checkpoint(
    small_disk: Path, tmp_path: Path
) -> None:
    import sys

    from training.train.checkpoint import list_checkpoints
    from training.train.driver import checkpoint_problems

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(rows=32, sentences=8, vocab_size=512, shards=2))
    # How large one checkpoint is, measured by a run on the ordinary disk.
    ref = tmp_path / "ref"
    assert _train(data, ref, "--max-steps", "2").returncode == 0
    size = _du(ref / "local" / "train")
    # Room for the run's small files and one checkpoint, not two.
    kib = (size + size // 2 + 192 * 1024) // 1024
    remount = ["mount", "-o", f"remount,size={kib}k", str(small_disk)]
    subprocess.run(remount, check=True)

    out = small_disk / "run"
    proc = _train(data, out)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no space left" in proc.stderr and "checkpoint of step 4" in proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    folder = out / "local" / "train"
    assert [s for s, _ in list_checkpoints(str(folder))] == [2]
    assert not checkpoint_problems(str(folder / "checkpoint_00000002"))
    assert not (folder / "checkpoint_00000004").exists()  # the half-written one is gone

    subprocess.run(["mount", "-o", f"remount,size={4 * kib + 4096}k", str(small_disk)], check=True)
    resumed = _train(data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2)" in resumed.stdout and (out / "export" / "model.safetensors").exists()


def _fill(disk: Path) -> int:
    """Write a file until the disk refuses: the disk is then full (returns the bytes written)."""
    written = 0
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                written += 65536
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC: the fault is the one this test is about
    return written


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_full_disk_stops_a_ray_run_at_once_and_keeps_its_checkpoint(
    small_disk: Path, tmp_path: Path
) -> None:
    """`gpthf train` (Ray Train): the disk fills after the first checkpoint. Before, Ray Train
    retried the deterministic error max_failures times, redoing the steps each time, and the run
    ended in a raw WorkerGroupError. Now: one attempt, one worker group, a clear message."""
    import os
    import sys
    import threading
    import time

    from training.train.checkpoint import list_checkpoints
    from training.train.driver import checkpoint_problems

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(rows=64, sentences=8, vocab_size=512, shards=2))
    subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], check=True)
    out = small_disk / "run"
    folder = out / "ray" / "train"
    flags = [
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", "40", "--warmup-steps", "1",
        "--checkpoint-every", "20", "--eval-every", "1000", "--workers", "1",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["OMP_NUM_THREADS"] = "1"  # an embedded Ray of the run's own
    root = Path(__file__).resolve().parents[2]
    filled: list[int] = []

    def fill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not filled:
            if list_checkpoints(str(folder)):
                filled.append(_fill(small_disk))
            time.sleep(0.02)

    filler = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
    filler.start()
    proc = subprocess.run(
        [*cmd, *flags], cwd=root, env=env, capture_output=True, text=True, timeout=360
    )
    filler.join(timeout=5)
    log = proc.stdout + proc.stderr

    assert filled and filled[0] > 0, "the disk was never filled"
    assert proc.returncode == 2, log[-4000:]
    assert "no space left" in proc.stderr, log[-4000:]  # the fault landed, and is named
    # Ray forwards the worker's and controller's logs as they happen (each line prefixed with
    # its process, "(... pid=N)"), and may still be forwarding after our message: of the
    # driver's own lines, ours is the last word, one line, and the driver prints no traceback.
    last = [x for x in proc.stderr.strip().splitlines() if "pid=" not in x][-1]
    assert last.startswith("gpthf train: error: cannot write"), last
    assert "Stopped without retrying" in last and "--resume" in last and "free of" in last
    driver_lines = [x for x in proc.stderr.splitlines() if "pid=" not in x]
    assert not any("Traceback" in x for x in driver_lines), proc.stderr[-4000:]
    # No retry: one fit, one worker group (Ray Train used to start one per retry).
    assert len(list(folder.glob("attempt-*"))) == 1
    assert log.count("[train] rank 0 on node") == 1, log[-4000:]
    assert [s for s, _ in list_checkpoints(str(folder))] == [20]
    (kept,) = list_checkpoints(str(folder))
    assert not checkpoint_problems(kept[1])
    unfinished = [p for p in folder.rglob("checkpoint_*") if p.is_dir()]
    assert [p.as_posix() for p in unfinished] == [kept[1].removeprefix("file://")]

    # The metrics of the steps before the fault survive the full disk whole (they were copied
    # over in place, and a copy cut short truncated the run's history).
    from training.train.driver import read_metrics

    logged = {r["step"] for r in read_metrics(str(out)) if "loss" in r}
    assert set(range(1, 21)) <= logged, sorted(logged)

    (small_disk / "filler").unlink()
    resumed = subprocess.run(
        [*cmd, *flags, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=360
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "(step 20)" in resumed.stdout + resumed.stderr
    assert [s for s, _ in list_checkpoints(str(folder))][-1] == 40
