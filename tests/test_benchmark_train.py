"""benchmarks/train.py: its bare loop does the trainer's work (the same batches, the same first
loss and the same losses after, step for step), and a run's fixed cost splits into parts that
add up to its wall time.

The trainer here is ``TrainWorker`` + ``run_steps`` in this process (gloo, one rank, one torch
thread): the code a Ray Train worker runs, which tests/test_train_worker.py proves equal to a
Ray Train run step for step. No Ray is started.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train import WARMUP_STEPS, BareLoop, bare_run, goal_lines  # noqa: E402
from tests._model_helpers import one_torch_thread  # noqa: E402
from tests.conftest import preprocessed  # noqa: E402
from training.train.config import TrainConfig, load_train_config  # noqa: E402
from training.train.driver import read_metrics, run_phases, setup_run, worker_context  # noqa: E402
from training.train.local import arrow_stream  # noqa: E402
from training.train.metrics import MetricsWriter  # noqa: E402
from training.train.worker import TrainWorker, run_steps  # noqa: E402

TINY = {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 3, "n_encoder_layers": 2}
STEPS = WARMUP_STEPS + 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    return preprocessed(
        tmp_path_factory.mktemp("bench-train-data"),
        tokenizer_path,
        files=2,
        docs=30,
        seed=5,
        heldout=0.1,
    )


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "data.uri": str(data),
        "run.output": str(out),
        "model.overrides": TINY,
        "deepspeed.micro_batch_rows": 2,
        "deepspeed.grad_accum": 2,  # the loss scale over the step's targets, accumulated
        "deepspeed.zero_stage": 2,
        "optim.total_steps": STEPS,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "optim.grad_clip": 0.5,  # the clip acts: the first steps' norms are above it
        "run.checkpoint_every": STEPS,
        "run.eval_rows": 0,
    }
    return load_train_config(None, {**base, **kw})


def token_ids(micros: list[Any]) -> list[list[list[int]]]:
    return [m.column("input_ids").to_pylist() for m in micros]


@pytest.mark.usefixtures("process_group", one_torch_thread.__name__)
def test_the_bare_loop_trains_what_the_trainer_trains(data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path / "run")
    setup = setup_run(cfg, verify=False)
    with TrainWorker(cfg, worker_context(setup, 0, None)).build() as worker:
        # The same batches, in the same order, split into the same micro-batches.
        theirs = worker.micro_batches(arrow_stream(worker.stream_uris()))
        ours = BareLoop(setup).batches()
        for _ in range(STEPS):
            (s1, m1), (s2, m2) = next(theirs), next(ours)
            assert s1 == s2 and token_ids(m1) == token_ids(m2)
        writer = MetricsWriter(str(tmp_path / "run"), None, 0)
        run_steps(
            worker,
            arrow_stream(worker.stream_uris()),
            writer=writer,
            checkpoint=lambda step, record: None,
        )
        writer.sync()
        writer.close()
    records = read_metrics(str(tmp_path / "run"))
    steps = {r["step"]: r for r in records if "loss" in r}
    bare = bare_run(setup, threads=1)
    # Same seed, same batch, no update yet: the same loss (one thread: the same sums). After
    # it the optimizers agree to rounding (DeepSpeed steps flat fp32 partitions).
    assert bare.extra["losses"][0] == pytest.approx(steps[1]["loss"], rel=1e-6)
    assert bare.extra["losses"] == pytest.approx([steps[s]["loss"] for s in range(1, STEPS + 1)], rel=1e-5)  # fmt: skip
    assert bare.work == {
        "steps": STEPS - WARMUP_STEPS,
        "tokens": sum(steps[s]["tokens"] for s in range(WARMUP_STEPS + 1, STEPS + 1)),
    }
    # The final record carries rank 0's timings, which the driver turns into phases.
    final = next(r for r in records if r.get("final"))
    assert final["torch_threads"] == 1
    w = final["phases"]
    assert w["build_s"] > 0 and w["steps_s"] > 0 and w["first_batch_s"] >= 0
    assert w["started"] <= w["ended"] and w["restore_s"] == w["validate_s"] == 0


def test_the_phases_of_a_run_add_up_to_its_wall_time() -> None:
    marks = {
        "started": 100.0,
        "ray_start": 101.0,
        "ray_ready": 106.0,
        "first_fit": 106.5,
        "fit": 106.5,
        "fit_ended": 140.0,
        "exported": 142.0,
    }
    worker = {
        "started": 112.0,
        "build_s": 3.0,
        "restore_s": 0.0,
        "first_batch_s": 2.0,
        "steps_s": 15.0,
        "validate_s": 1.0,
        "checkpoint_s": 1.5,
        "ended": 136.0,
    }
    phases = run_phases(marks, worker)
    assert phases["setup"] == 1.5 and phases["ray_start"] == 5.0 and phases["retries"] == 0
    assert phases["worker_start"] == 5.5 and phases["worker_stop"] == 4.0
    assert phases["export"] == 2.0 and phases["steps"] == 15.0
    assert phases["other"] == pytest.approx(136 - 112 - (3 + 2 + 15 + 1 + 1.5))
    assert phases["total"] == 42.0
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(42.0)
    # Without the worker's record (a retried fit), the fit is one part; still adds up.
    coarse = run_phases(marks, None)
    assert coarse["fit"] == 33.5
    assert sum(v for k, v in coarse.items() if k != "total") == pytest.approx(42.0)


def test_a_missed_goal_is_said_plainly() -> None:
    def model(ratio: float, fixed: float) -> dict[str, Any]:
        return {
            "goals": {
                "trainer_over_bare": {"goal": 0.9, "median": ratio, "met": ratio >= 0.9},
                "fixed_cost_s": {"goal": 15.0, "median": fixed, "met": fixed <= 15},
            }
        }

    lines = goal_lines({"models": {"a": model(0.95, 20.0), "b": model(0.5, 10.0)}})
    assert [line.split(":")[0] for line in lines] == [
        "goal met",
        "GOAL MISSED",
        "GOAL MISSED",
        "goal met",
    ]
