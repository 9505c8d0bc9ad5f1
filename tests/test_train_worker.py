"""TrainWorker without Ray: training steps in this process (gloo, world size 1) equal Ray Train's
step for step, save -> restore continues identically, activation checkpointing really
recomputes, the torchrun entry runs with Ray unimportable; TrainState reads old checkpoints.

The Ray reference is one ``run_training`` with 1 worker; its per-step losses come from its
RUN/metrics.jsonl. Equality is exact (``==`` on floats): the same seed, data order, DeepSpeed
config and one torch thread (a Ray worker with <= 1 CPU runs torch on one thread) leave no
room for rounding to differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._model_helpers import one_torch_thread
from tests.conftest import preprocessed
from training.model import ModelConfig
from training.train.checkpoint import CheckpointError, DataCursor, TrainState, list_checkpoints
from training.train.config import TrainConfig, load_train_config
from training.train.driver import (
    default_cpus_per_worker,
    read_metrics,
    run_training,
    setup_run,
    worker_context,
)
from training.train.local import arrow_stream
from training.train.worker import TrainWorker

pytestmark = [
    pytest.mark.usefixtures(one_torch_thread.__name__),
    pytest.mark.timeout(900),  # the Ray reference run shares 2 cores with everything else
]
TINY = {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}
STEPS = 8
OVERRIDES: dict[str, Any] = {
    "run.workers": 1,
    "deepspeed.zero_stage": 2,
    "deepspeed.micro_batch_rows": 4,
    "deepspeed.grad_accum": 2,  # exercises the accumulation and the loss scale
    "optim.total_steps": STEPS,
    "optim.warmup_steps": 2,
    "optim.lr": 3e-3,
    "run.checkpoint_every": 4,
    "run.eval_every": 4,
    "run.eval_rows": 8,
    "model.overrides": TINY,
}


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return load_train_config(
        None, {"data.uri": str(data), "run.output": str(out), **OVERRIDES, **kw}
    )


@pytest.fixture(scope="module")
def data_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path, ray_session: None
) -> Path:
    return preprocessed(
        tmp_path_factory.mktemp("worker-data"),
        tokenizer_path,
        files=4,
        docs=30,
        seed=7,
        heldout=0.1,
    )


@pytest.fixture(scope="module")
def ray_records(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Step -> metrics record of the same run under Ray Train (1 worker)."""
    out = tmp_path_factory.mktemp("ray-run") / "run"
    result = run_training(config(data_dir, out))
    assert (result.start_step, result.end_step) == (0, STEPS)
    records = {r["step"]: r for r in read_metrics(str(out)) if "loss" in r}
    assert sorted(records) == list(range(1, STEPS + 1))
    return records


def make_worker(cfg: TrainConfig) -> TrainWorker:
    setup = setup_run(cfg)
    return TrainWorker(cfg, worker_context(setup, 0, None)).build()


def train(worker: TrainWorker, batches: Iterator[Any], n: int) -> dict[int, float]:
    """``n`` steps; step -> loss."""
    losses = {}
    for _ in range(n):
        step, micros = next(batches)
        assert step == worker.global_step
        m = worker.step(micros)
        losses[m.step] = m.loss
    return losses


def batches_of(worker: TrainWorker) -> Iterator[Any]:
    return worker.micro_batches(arrow_stream(worker.stream_uris()))


@pytest.mark.slow
@pytest.mark.usefixtures("process_group")
def test_worker_steps_equal_ray_train(
    data_dir: Path, ray_records: dict[int, dict], tmp_path: Path
) -> None:
    with make_worker(config(data_dir, tmp_path)) as worker:
        batches = batches_of(worker)
        got = train(worker, batches, 4)
        val4 = worker.validate(worker.ctx.val_rows)
        got |= train(worker, batches, STEPS - 4)
        val8 = worker.validate(worker.ctx.val_rows)
        tokens_seen = worker.tokens_seen
    want = {s: r["loss"] for s, r in ray_records.items()}
    for s in sorted(want):
        print(f"step {s}: Ray Train {want[s]!r}  TrainWorker {got.get(s)!r}")
    assert got == want
    assert (val4, val8) == (ray_records[4]["val_loss"], ray_records[8]["val_loss"])
    assert tokens_seen == ray_records[STEPS]["tokens_seen"]


@pytest.mark.slow
@pytest.mark.usefixtures("process_group")
def test_save_restore_through_the_worker_continues_identically(
    data_dir: Path, ray_records: dict[int, dict], tmp_path: Path
) -> None:
    cfg = config(data_dir, tmp_path / "run")
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    with make_worker(cfg) as first:
        batches = batches_of(first)
        train(first, batches, 4)
        saved = first.save(ckpt)
        uninterrupted = train(first, batches, STEPS - 4)
    assert saved.step == 4 and saved.data_cursor == DataCursor(4, 0, 8)
    assert saved.tokens_seen == ray_records[4]["tokens_seen"]
    with make_worker(cfg) as second:
        assert second.restore(ckpt) == saved
        assert (second.global_step, second.tokens_seen) == (4, saved.tokens_seen)
        resumed = train(second, batches_of(second), STEPS - 4)
    assert resumed == uninterrupted == {s: ray_records[s]["loss"] for s in range(5, STEPS + 1)}


@pytest.mark.slow
@pytest.mark.usefixtures("process_group")
def test_activation_checkpointing_recomputes_blocks_with_equal_losses(
    data_dir: Path, tmp_path: Path
) -> None:
    losses, calls_per_step = [], []
    for on in (False, True):
        cfg = config(data_dir, tmp_path / str(on), **{"deepspeed.activation_checkpointing": on})
        with make_worker(cfg) as worker:
            blocks = worker.engine.module.blocks
            calls = [0]

            def count(*_: object, calls: list[int] = calls) -> None:
                calls[0] += 1

            hooks = [b.register_forward_pre_hook(count) for b in blocks]
            losses.append(train(worker, batches_of(worker), 2))
            calls_per_step.append(calls[0] // 2)
            for h in hooks:
                h.remove()
    # Plain: one forward per block and micro-batch. Checkpointed: each runs again in backward.
    per_step = TINY["n_layers"] * OVERRIDES["deepspeed.grad_accum"]
    assert calls_per_step == [per_step, 2 * per_step]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_local_entry_runs_without_ray_and_resumes(
    data_dir: Path, ray_records: dict[int, dict], tmp_path: Path
) -> None:
    """``python -m training.train.local`` (what torchrun runs on a GPU machine without Ray) with
    Ray made unimportable: 4 steps, then --resume to the end, equal to the Ray run."""
    (tmp_path / "noray").mkdir()
    (tmp_path / "noray" / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is not installed here')\n"
        "sys.meta_path.insert(0, _NoRay())\n"
    )
    nested: dict[str, Any] = {}
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(nested))
    out = tmp_path / "local-run"
    # The lock a build of DeepSpeed's CPU comm op leaves when it is killed: a start that still
    # built the op would wait on it forever (and this test would time out).
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "noray"), str(Path.cwd())]),
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "TMPDIR": str(tmp_path / "tmp"),  # the run's scratch folders, checked below
    }
    (tmp_path / "tmp").mkdir()
    base = [
        sys.executable,
        "-m",
        "training.train.local",
        "--config",
        str(config_file),
        "--data",
        str(data_dir),
        "--output",
        str(out),
    ]
    for extra in (["--max-steps", "4"], ["--resume"]):
        proc = subprocess.run(
            base + extra, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 4" in proc.stdout
    got = {r["step"]: r["loss"] for r in read_metrics(str(out)) if "loss" in r}
    assert got == {s: r["loss"] for s, r in ray_records.items()}
    steps = [s for s, _ in list_checkpoints(str(out / "local" / "train"))]
    assert steps == [4, 8]  # keep_checkpoints=2
    assert json.loads((out / "export" / "config.json").read_text())["step"] == STEPS
    # Ours only: torch keeps its compile cache (torchinductor_*) there too, by design.
    assert not list((tmp_path / "tmp").glob("gpthf-*")), "the runs removed their scratch folders"


def test_train_state_reads_the_files_the_previous_code_wrote(tmp_path: Path) -> None:
    mc = ModelConfig.preset("gpthf-tiny", vocab_size=400)
    old: dict[str, Any] = {  # as written before TrainState (no format_version key)
        "step": 20,
        "tokens_seen": 9000,
        "data_cursor": {"global_step": 20, "epoch": 1, "rows_per_step": 8},
        "seed": 0,
        "shuffle_seed": 3,
        "world_size": 2,
        "schedule_hash": "553bdafaeaf5c702",
        "tokenizer_sha256": "ab" * 32,
        "manifest_version": 2,
        "model_config": mc.to_dict(),
        "zero_stage": 2,
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(old, indent=1))
    state = TrainState.load(tmp_path)
    assert state.model_config == mc and state.data_cursor == DataCursor(20, 1, 8)
    assert {k: v for k, v in state.to_dict().items() if k != "format_version"} == old
    assert TrainState.from_dict(state.to_dict()) == state
    (tmp_path / "again").mkdir()
    state.write(tmp_path / "again")
    assert TrainState.load(tmp_path / "again") == state
    state.check_resumable(mc, "553bdafaeaf5c702", 2, "ab" * 32)
    with pytest.raises(CheckpointError, match="same number"):
        state.check_resumable(mc, "553bdafaeaf5c702", 1, "ab" * 32)
    with pytest.raises(CheckpointError, match=r"lacks \['world_size'\]"):
        TrainState.from_dict({k: v for k, v in old.items() if k != "world_size"})
    with pytest.raises(CheckpointError, match="format 9"):
        TrainState.from_dict({**old, "format_version": 9})
    with pytest.raises(CheckpointError, match="global_step 19 != step 20"):
        TrainState.from_dict({**old, "data_cursor": {**old["data_cursor"], "global_step": 19}})
    with pytest.raises(CheckpointError, match=r"no trainer_state\.json"):
        TrainState.load(tmp_path / "missing")


def test_default_cpu_share_leaves_one_cpu_for_the_data_tasks() -> None:
    # (workers, cluster CPUs) -> CPUs per worker: at most 1, 1 CPU left (a read task takes 1).
    cases = {(1, 2): 1.0, (2, 2): 0.5, (3, 2): 0.3, (2, 4): 1.0, (4, 4): 0.75, (8, 2): 0.1}
    for (workers, cpus), share in cases.items():
        assert default_cpus_per_worker(workers, cpus, gpu=False) == share, (workers, cpus)
        assert cpus - workers * share >= 1.0
    assert default_cpus_per_worker(40, 2, gpu=False) == 0.0  # refused: they do not fit
    assert default_cpus_per_worker(8, 2, gpu=True) == 1.0


ENGINE_TWICE = """
import deepspeed, torch
from training.train.worker import destroy_distributed, init_distributed

ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
      "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}
for attempt in range(2):
    assert init_distributed(gpu=False) == (0, 1)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # a client optimizer: no op build
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    engine.backward(engine(torch.ones(1, 2)).sum())
    engine.step()
    destroy_distributed()
print("ok")
"""


def test_a_second_process_group_in_one_process_builds_an_engine() -> None:
    # run_local twice in one process (a notebook, a test session): DeepSpeed caches a clone of
    # the world group; torn down with torch's destroy_process_group alone, the second engine
    # fails with "Group ... is not registered".
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_TWICE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
