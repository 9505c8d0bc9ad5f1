"""Training faults injected for real: a Ray Train worker killed by PID mid-run, a pickle payload
written into the newest checkpoint, a truncated and a missing checkpoint file.

Every check is exact: the recovered or resumed run's losses equal the uninterrupted run's, step
for step (max difference 0), and nothing a checkpoint holds runs code.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.conftest import preprocessed
from training.train.checkpoint import CheckpointError, list_checkpoints
from training.train.config import TrainConfig, load_train_config
from training.train.driver import read_metrics, run_training
from training.train.integrity import CHECKSUMS

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
TINY = {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    root = tmp_path_factory.mktemp("faults-data")
    return preprocessed(root, tokenizer_path, files=6, docs=40, seed=33, heldout=0.1)


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "data.uri": str(data),
        "run.output": str(out),
        "run.workers": 2,
        "deepspeed.zero_stage": 2,
        "deepspeed.micro_batch_rows": 4,
        "optim.total_steps": 20,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "run.checkpoint_every": 5,
        "run.keep_checkpoints": 4,  # 5, 10, 15, 20: three to damage, one to fall back to
        "run.eval_every": 100,
        "run.eval_rows": 0,
        "model.overrides": TINY,
        **kw,
    }
    return load_train_config(None, base)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(str(out)) if "loss" in r]


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults-ref") / "run"
    run_training(config(data_dir, out))
    assert [s for s, _ in losses(out)] == list(range(1, 21))
    return out


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_killed_worker_is_recovered_by_ray_and_the_run_matches(
    data_dir: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    killed: list[int] = []
    before: set[int] = set()
    replacements: set[int] = set()

    def kill_mid_run_then_watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            workers = _train_workers()
            if not killed:
                done = list_checkpoints(str(out / "ray" / "train"))
                # After the second checkpoint and before the last step: a kill after step 20
                # would need no recovery at all.
                if done and 10 <= done[-1][0] < 20 and workers:
                    before.update(w.pid for w in workers)
                    workers[-1].kill()
                    killed.append(workers[-1].pid)
            else:  # the recovery: worker processes that were not there at the kill
                replacements.update(w.pid for w in workers if w.pid not in before)
                if replacements:
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_run_then_watch, daemon=True)
    killer.start()
    result = run_training(config(data_dir, out))  # max_failures defaults to 3: no --resume
    killer.join(timeout=5)
    assert killed, "no training worker was killed between the second checkpoint and the end"
    assert replacements, "Ray Train started no new worker after the kill: nothing recovered"
    assert result.end_step == 20
    assert losses(out) == losses(reference), "every step once, every loss identical"


def _copy_run(reference: Path, tmp_path: Path) -> tuple[Path, list[tuple[int, str]]]:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    found = list_checkpoints(str(out / "ray" / "train"))
    assert [s for s, _ in found] == [5, 10, 15, 20], found
    return out, found


def _rewrite_checksum(checkpoint: Path, rel: str) -> None:
    """What an attacker who can write the storage does after replacing a file."""
    import hashlib

    path = checkpoint / CHECKSUMS / "rank0.json"
    entry = json.loads(path.read_text())
    data = (checkpoint / rel).read_bytes()
    entry["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    path.write_text(json.dumps(entry))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_damaged_checkpoints_are_refused_and_resume_falls_back_past_them(
    data_dir: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The newest three checkpoints each damaged another way (one resume run checks all
    three): a pickle payload under a rewritten checksum, a truncated file, a missing file."""
    out, found = _copy_run(reference, tmp_path)
    rel = "ds/mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    damaged = {step: Path(uri) for step, uri in found[1:]}
    torch.save({"module": _Payload(marker)}, damaged[20] / rel)
    _rewrite_checksum(damaged[20], rel)
    data = (damaged[15] / rel).read_bytes()
    (damaged[15] / rel).write_bytes(data[: len(data) // 2])
    (damaged[10] / rel).unlink()
    # The metrics of the run folder stand at step 20: a resume from 5 rewrites 6-20.
    result = run_training(config(data_dir, out, **{"run.resume": True}))
    said = capsys.readouterr().out
    refused = [
        line for line in said.splitlines() if "not resuming from a damaged checkpoint" in line
    ]
    for step, why in ((20, "would run code"), (15, "truncated"), (10, "missing")):
        (line,) = [r for r in refused if f"{damaged[step]} (step {step})" in r]
        assert why in line, line
    assert result.start_step == 5 and result.end_step == 20
    assert losses(out) == losses(reference), "resumed from step 5, identical to the end"
    assert not marker.exists(), "nothing in the checkpoint ran"


def test_no_intact_checkpoint_is_a_clear_error(
    data_dir: Path, reference: Path, tmp_path: Path
) -> None:
    out, found = _copy_run(reference, tmp_path)
    for _, uri in found:
        (Path(uri) / "rng_rank1.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint under"):
        run_training(config(data_dir, out, **{"run.resume": True}))
