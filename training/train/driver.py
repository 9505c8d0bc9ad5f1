"""Training driver: check everything early, build per-rank datasets, run TorchTrainer, export."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.blocks import SCORING_COLUMNS
from pipeline.manifest import Manifest
from pipeline.storage import filesystem_for, write_bytes_atomic
from training.data.order import Shard, dropped_rows, plans_until, resume_point, stream_paths
from training.data.shards import arrow_filesystem, read_shards
from training.export import ExportConfig, write_export
from training.model import ModelConfig
from training.train.checkpoint import (
    CheckpointError,
    check_resumable,
    consolidate,
    list_checkpoints,
    read_state,
)
from training.train.config import TrainConfig, TrainConfigError

_DATA_IDS = ("vocab_size", "eos_id", "pad_id", "eod_id", "max_sentence_tokens")


@dataclass
class TrainResult:
    output: str
    start_step: int
    end_step: int
    export: str | None
    summary: dict[str, Any]


def model_config_for(cfg: TrainConfig, manifest: Manifest) -> ModelConfig:
    """The preset, sized to the data's tokenizer; a config that contradicts the data is refused."""
    data = {
        "vocab_size": manifest.vocab_size,
        "eos_id": manifest.eos_id,
        "pad_id": manifest.pad_id,
        "eod_id": manifest.eod_id,
        "max_sentence_tokens": manifest.max_sentence_tokens,
    }
    clash = [
        f"{k}: model config {cfg.model.overrides[k]}, data {data[k]}"
        for k in _DATA_IDS
        if k in cfg.model.overrides and cfg.model.overrides[k] != data[k]
    ]
    if clash:
        raise TrainConfigError(
            "the model config does not match the data's tokenizer (" + "; ".join(clash) + "). "
            "Vocabulary and special ids come from the data manifest: drop them from model.overrides "
            "or preprocess with the matching tokenizer."
        )
    overrides = {k: v for k, v in cfg.model.overrides.items() if k not in _DATA_IDS}
    overrides["activation_checkpointing"] = cfg.deepspeed.activation_checkpointing
    try:
        return ModelConfig.preset(cfg.model.preset, **data, **overrides)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model: {exc}") from exc


def check_resources(cfg: TrainConfig) -> None:
    """Refuse a run whose workers would leave no CPU for the Ray Data tasks that feed them."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.run.workers * cfg.run.cpus_per_worker
    if not cfg.run.gpu and total - need < 0.5:
        raise TrainConfigError(
            f"{cfg.run.workers} worker(s) x {cfg.run.cpus_per_worker} CPU leave {total - need:g} of the "
            f"cluster's {total:g} CPUs for the data tasks that feed them: the run would hang without "
            "an error (see STACK.md). Lower run.cpus_per_worker (e.g. 0.5) or run.workers."
        )
    if cfg.run.gpu and ray.cluster_resources().get("GPU", 0.0) < cfg.run.workers:
        raise TrainConfigError(
            f"--gpu with {cfg.run.workers} workers, but the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs"
        )


def _val_rows(data_uri: str, manifest: Manifest, n: int, storage: Any) -> list[dict[str, Any]]:
    """The first ``n`` held-out blocks (shards by path): the same sample at every validation."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    if n <= 0 or not manifest.has_split("heldout"):
        return rows
    for s in manifest.shards("heldout"):
        fs, path = filesystem_for(f"{data_uri}/{s.path}", storage)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=list(SCORING_COLUMNS))
        rows.extend(table.slice(0, n - len(rows)).to_pylist())
        if len(rows) >= n:
            break
    return rows


def run_training(cfg: TrainConfig) -> TrainResult:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.distributed import init_ray
    from training.train.worker import train_loop_per_worker

    cfg.validate_for_run()
    data_uri, output = cfg.data.uri.rstrip("/"), cfg.run.output.rstrip("/")
    manifest = Manifest.require(data_uri, cfg.storage)
    mc = model_config_for(cfg, manifest)
    train_shards = [Shard(s.path, s.rows) for s in manifest.shards("train")]
    world = cfg.run.workers
    rps = cfg.deepspeed.micro_batch_rows * cfg.deepspeed.grad_accum
    plans = plans_until(train_shards, world, rps, cfg.data.shuffle_seed, cfg.optim.total_steps)
    init_ray()
    check_resources(cfg)

    ray_dir = f"{output}/ray/{cfg.run.name}"
    existing = list_checkpoints(ray_dir, cfg.storage)
    start_step, resume_from = 0, None
    if existing and not cfg.run.resume:
        raise TrainConfigError(
            f"{output} already holds checkpoints (last at step {existing[-1][0]}): pass --resume to continue that run, or choose another --output"
        )
    if existing:
        step, resume_from = existing[-1]
        state = read_state(resume_from, cfg.storage)
        check_resumable(state, mc, cfg.schedule_hash(), world, manifest.tokenizer.sha256)
        start_step = step
        print(f"[train] resuming from {resume_from} (step {step})", flush=True)
    elif cfg.run.resume:
        print(f"[train] --resume: no checkpoint under {ray_dir}, starting from step 0", flush=True)
    end = (
        min(cfg.optim.total_steps, cfg.run.max_steps)
        if cfg.run.max_steps is not None
        else cfg.optim.total_steps
    )

    fs, root = filesystem_for(output, cfg.storage)
    write_bytes_atomic(
        fs, f"{root}/train_config.json", json.dumps(cfg.to_dict(redact=True), indent=1).encode()
    )
    if start_step >= end:
        return TrainResult(
            output,
            start_step,
            start_step,
            None,
            {"note": "nothing to do: already at the requested step"},
        )

    datasets = {}
    for r in range(world):
        rp = resume_point(plans, r, start_step, rps, cfg.data.shuffle_chunk_rows)
        datasets[f"train_rank{r}"] = read_shards(
            [f"{data_uri}/{p}" for p in stream_paths(plans, r, rp)], cfg.storage
        )
    context = {
        "model_config": mc.to_dict(),
        "shards": [(s.path, s.rows) for s in train_shards],
        "data_root": data_uri,
        "dataset_start_step": start_step,
        "resume_from": resume_from,
        "val_rows": _val_rows(data_uri, manifest, cfg.run.eval_rows, cfg.storage),
        "output": output,
        "schedule_hash": cfg.schedule_hash(),
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "manifest_version": manifest.version,
    }
    storage_fs, storage_path = arrow_filesystem(f"{output}/ray", cfg.storage)
    env = {"DS_ACCELERATOR": "cuda" if cfg.run.gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.gpu else {})}
    from ray.data import ExecutionOptions

    run_config = RunConfig(  # type: ignore[call-arg]  # Train V2 RunConfig has worker_runtime_env
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        worker_runtime_env={"env_vars": env},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "context": context},
        torch_config=TorchConfig(backend="nccl" if cfg.run.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=cfg.run.gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    export_uri = f"{output}/export"
    assert result.checkpoint is not None
    with tempfile.TemporaryDirectory(prefix="gpthf-export-") as tmp:
        result.checkpoint.to_directory(tmp)
        state = json.loads(Path(tmp, "trainer_state.json").read_text())
        weights = consolidate(tmp, cfg.deepspeed.zero_stage)
    tok_fs, tok_path = filesystem_for(f"{data_uri}/tokenizer.json", cfg.storage)
    with tok_fs.open(tok_path, "rb") as f:
        tokenizer_json = f.read().decode()
    write_export(
        export_uri,
        weights,
        ExportConfig(
            model=mc,
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            tokenizer_sha256=manifest.tokenizer.sha256,
            special_ids=manifest.special_ids,
            data=data_uri,
            manifest_version=manifest.version,
            schedule_hash=cfg.schedule_hash(),
        ),
        tokenizer_json,
        cfg.storage,
    )
    summary = summarise(output, cfg, start_step, state["step"], wall, dropped_rows(plans, rps))
    write_bytes_atomic(fs, f"{root}/summary.json", json.dumps(summary, indent=1).encode())
    return TrainResult(output, start_step, state["step"], export_uri, summary)


def read_metrics(output: str, storage: Any = None) -> list[dict[str, Any]]:
    fs, root = filesystem_for(output, storage)
    path = f"{root}/metrics.jsonl"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def summarise(
    output: str, cfg: TrainConfig, start: int, end: int, wall: float, dropped: int
) -> dict[str, Any]:
    metrics = read_metrics(output, cfg.storage)
    records = [r for r in metrics if start < r.get("step", 0) <= end and "loss" in r]
    final = [r for r in metrics if r.get("final") and r.get("start_step") == start]
    tokens = final[-1]["session_tokens"] if final else 0
    step_time = final[-1]["session_time_s"] if final else 0.0
    return {
        "steps": [start, end],
        "tokens": tokens,
        "wall_time_s": round(wall, 2),
        "train_time_s": round(step_time, 2),
        "tokens_per_s": round(tokens / step_time, 1) if step_time else None,
        "final_loss": records[-1]["loss"] if records else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
        "peak_memory_bytes": final[-1]["peak_memory_bytes"] if final else None,
        "dropped_tail_rows_per_epoch_total": dropped,
    }


def format_summary(result: TrainResult) -> str:
    s = result.summary
    if "note" in s:
        return f"[train] {s['note']}"
    return (
        f"[train] steps {s['steps'][0]} -> {s['steps'][1]}: {s['tokens']:,} tokens in {s['train_time_s']}s "
        f"({s['tokens_per_s']} tok/s), final loss {s['final_loss']:.4f}"
        + (f", val {s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "")
        + (
            f", peak memory {s['peak_memory_bytes'] / 2**20:.0f} MiB"
            if s["peak_memory_bytes"]
            else ""
        )
        + f"\n[train] export: {result.export}"
    )


__all__ = ["CheckpointError", "TrainResult", "format_summary", "run_training"]
