"""Ray Train + DeepSpeed on CPU (gloo): 2 workers, ZeRO-2 and ZeRO-3, exact resume, S3 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.manifest import Manifest, ManifestError
from tests.conftest import preprocessed
from training.data.collate import IGNORE_INDEX, collate_blocks
from training.export import load_export
from training.train.checkpoint import CheckpointError
from training.train.config import TrainConfig, TrainConfigError, load_train_config
from training.train.driver import _val_rows, read_metrics, run_training
from training.train.optimizer import lr_factor

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
TINY = {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    return preprocessed(
        tmp_path_factory.mktemp("train-data"),
        tokenizer_path,
        files=6,
        docs=40,
        seed=21,
        heldout=0.1,
    )


def config(data: Path | str, out: Path | str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "data.uri": str(data),
        "run.output": str(out),
        "run.workers": 2,
        "deepspeed.zero_stage": 2,
        "deepspeed.micro_batch_rows": 4,
        "optim.total_steps": 30,
        "optim.warmup_steps": 3,
        "optim.lr": 3e-3,
        "run.checkpoint_every": 10,
        "run.eval_every": 10,
        "run.eval_rows": 16,
        "model.overrides": TINY,
    }
    base.update(kw)
    return load_train_config(None, base)


def losses(out: Path | str, storage: Any = None) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(out), storage) if "loss" in r}


@pytest.fixture(scope="module")
def full_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "full"
    result = run_training(config(data_dir, out))
    assert (result.start_step, result.end_step) == (0, 30)
    return out


def test_two_workers_zero2_learns_and_exports(full_run: Path, data_dir: Path) -> None:
    records = read_metrics(str(full_run))
    by_step = losses(full_run)
    assert sorted(by_step) == list(range(1, 31))
    first, last = sum(by_step[s] for s in (1, 2, 3)) / 3, sum(by_step[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    step = next(r for r in records if r.get("step") == 5)
    assert {"lr", "grad_norm", "tokens_per_s", "data_wait_frac", "mfu"} <= set(step)
    # The record of step 5 is the 0-based update 4: warmup (3 steps) is over, cosine has begun.
    assert step["lr"] == pytest.approx(3e-3 * lr_factor(4, config(data_dir, full_run).optim))
    assert next(r for r in records if r.get("step") == 1)["lr"] == pytest.approx(1e-3)
    assert list((full_run / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["tokens"] == sum(r["tokens"] for r in records if "loss" in r)  # log_every=1
    assert summary["tokens"] == next(r["tokens_seen"] for r in records if r.get("step") == 30)
    # The consolidated export scores the validation sample exactly as the workers did.
    exported = load_export(str(full_run / "export"))
    assert exported.config.step == 30
    rows = _val_rows(str(data_dir), Manifest.require(str(data_dir)), 16, None)
    b = collate_blocks(rows, pad_id=exported.model_config.pad_id)
    with torch.no_grad():
        logits = exported.model(b.input_ids, b.sentence_ids, b.document_ids)
    nll = F.cross_entropy(
        logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    val = next(r["val_loss"] for r in records if r.get("step") == 30 and "val_loss" in r)
    assert float(nll) / b.num_targets == pytest.approx(val, rel=1e-5)


def test_resume_20_plus_10_equals_30_uninterrupted(
    full_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    first = run_training(config(data_dir, out, **{"run.max_steps": 20}))
    assert first.end_step == 20
    second = run_training(config(data_dir, out, **{"run.resume": True}))
    assert (second.start_step, second.end_step) == (20, 30)
    want, got = losses(full_run), losses(out)
    assert sorted(got) == list(range(1, 31))
    for s in range(1, 31):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=0), f"step {s}: {got[s]} != {want[s]}"


def test_finetune_from_a_relative_init_from_on_ray_train(
    full_run: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--init-from runs/x/export`` as a user types it. Ray Train workers run in their own
    directory, where that path named nothing: the run failed in the worker."""
    monkeypatch.chdir(full_run.parent)
    out = tmp_path / "finetune"
    overrides = {"model.init_from": f"{full_run.name}/export", "optim.total_steps": 2}
    overrides.update({"optim.warmup_steps": 1, "run.checkpoint_every": 2, "run.eval_every": 2})
    run_training(config(data_dir, out, **overrides))
    # Step 1 is scored before any update, on the same first batch as the base run's step 1
    # (same data order, same workers): the trained weights, not a random init.
    assert losses(out)[1] < losses(full_run)[1] - 0.5, (losses(out)[1], losses(full_run)[1])


def test_refusals_before_any_work(full_run: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="does not match the data's tokenizer"):
        run_training(
            config(data_dir, tmp_path / "a", **{"model.overrides": {**TINY, "vocab_size": 999}})
        )
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):
        run_training(config(data_dir, full_run))
    with pytest.raises(
        CheckpointError, match=r"another model shape.*d_model: checkpoint 64, config 32"
    ):
        run_training(
            config(
                data_dir,
                full_run,
                **{"run.resume": True, "model.overrides": {**TINY, "d_model": 32}},
            )
        )
    with pytest.raises(CheckpointError, match="same number"):
        run_training(config(data_dir, full_run, **{"run.resume": True, "run.workers": 1}))
    # An explicit share that leaves the data tasks less than the 1 CPU a read task takes.
    with pytest.raises(TrainConfigError, match="would hang"):
        run_training(
            config(data_dir, tmp_path / "b", **{"run.workers": 4, "run.cpus_per_worker": 1.0})
        )
    with pytest.raises(TrainConfigError, match="would hang"):
        run_training(
            config(data_dir, tmp_path / "b", **{"run.workers": 2, "run.cpus_per_worker": 1.75})
        )
    with pytest.raises(ManifestError, match="no manifest"):
        run_training(config(tmp_path, tmp_path / "c"))


@pytest.mark.s3
def test_zero3_with_checkpoints_on_s3(data_dir: Path, s3_server: Any) -> None:
    import s3fs

    from pipeline.config import StorageConfig

    storage = StorageConfig(
        endpoint_url=s3_server.endpoint, key=s3_server.key, secret=s3_server.secret
    )
    out = "s3://shards/train-zero3"
    cfg = config(
        data_dir,
        out,
        **{
            "deepspeed.zero_stage": 3,
            "optim.total_steps": 12,
            "run.checkpoint_every": 6,
            "run.eval_every": 6,
        },
    )
    cfg.storage = storage
    result = run_training(cfg)
    assert result.end_step == 12
    fs = s3fs.S3FileSystem(
        key=s3_server.key,
        secret=s3_server.secret,
        client_kwargs={"endpoint_url": s3_server.endpoint},
    )
    # One Ray run per fit: RUN/ray/<name>/attempt-*/checkpoint_*
    checkpoints = [
        p for p in fs.find("shards/train-zero3/ray/train", withdirs=True) if "/checkpoint_20" in p
    ]
    checkpoints = sorted(
        {
            p.split("/checkpoint_20")[0]
            + "/checkpoint_20"
            + p.split("/checkpoint_20")[1].split("/")[0]
            for p in checkpoints
        }
    )
    assert checkpoints, "checkpoints are on the S3 server"
    files = fs.find(sorted(checkpoints)[-1])
    # ZeRO-3 really partitions: every rank saved its own parameter shard.
    assert any("zero_pp_rank_0" in f for f in files) and any(
        "zero_pp_rank_1" in f for f in files
    ), files
    by_step = losses(out, storage)
    assert sorted(by_step) == list(range(1, 13)) and by_step[12] < by_step[1]
    exported = load_export(f"{out}/export", storage)
    assert exported.model.num_parameters() > 0 and exported.config.step == 12
