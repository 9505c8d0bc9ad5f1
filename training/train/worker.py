"""The Ray Train worker: DeepSpeed engine, the deterministic data stream, metrics, checkpoints.

Everything arrives through ``loop_config`` (STYLE.md 11); nothing is read from module globals.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.data.collate import IGNORE_INDEX, collate_blocks
from training.data.order import (
    Shard,
    epoch_of_step,
    plans_until,
    rank_micro_batches,
    resume_point,
    stream_paths,
)
from training.model import ModelConfig, build_model
from training.model.flops import train_step_flops
from training.train.checkpoint import DS_TAG, STATE
from training.train.config import TrainConfig
from training.train.optimizer import build_optimizer

# Dense bf16 peak FLOP/s of known accelerators, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_rows,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.micro_batch_rows * ds.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": bf16},
        # Our client torch AdamW stays in charge (no op compilation, see STACK.md).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _documents(rows: pa.Table) -> list[list[int]]:
    """Sentence lengths of each (row-local) document: what the FLOPs model needs."""
    docs = []
    for lengths, doc_index in zip(
        rows.column("sentence_lengths").to_pylist(),
        rows.column("document_index").to_pylist(),
        strict=True,
    ):
        current: list[int] = []
        last = None
        for n, d in zip(lengths, doc_index, strict=True):
            if d != last and current:
                docs.append(current)
                current = []
            current.append(n)
            last = d
        if current:
            docs.append(current)
    return docs


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.run.peak_flops_per_worker:
        return cfg.run.peak_flops_per_worker
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


class _MetricsWriter:
    """Rank 0: JSONL + TensorBoard in a local folder, copied to the run output at checkpoints."""

    def __init__(self, output: str, storage: Any, start_step: int) -> None:
        from tensorboardX import SummaryWriter

        from pipeline.storage import filesystem_for

        self.fs, self.root = filesystem_for(output, storage)
        self.local = Path(tempfile.mkdtemp(prefix="gpthf-metrics-"))
        self.jsonl = self.local / "metrics.jsonl"
        remote = f"{self.root}/metrics.jsonl"
        kept = []
        if self.fs.exists(remote):  # a resume continues the same file, minus steps to redo
            with self.fs.open(remote, "rb") as f:
                for line in f.read().decode().splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
        self.jsonl.write_text("".join(k + "\n" for k in kept))
        self.tb = SummaryWriter(str(self.local / "tb"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, int | float) and k != "step":
                self.tb.add_scalar(k, v, record["step"])

    def sync(self) -> None:
        self.tb.flush()
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.put_file(str(self.jsonl), f"{self.root}/metrics.jsonl")
        tb_dir = self.local / "tb"
        for p in tb_dir.rglob("*"):
            if p.is_file():
                self.fs.makedirs(f"{self.root}/tb", exist_ok=True)
                self.fs.put_file(str(p), f"{self.root}/tb/{p.name}")


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over ranks, several values in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _val_loss(
    engine: Any, val_rows: list[dict[str, Any]], pad_id: int, micro: int, device: torch.device
) -> float:
    """Mean NLL over the fixed held-out sample; every rank scores all of it (ZeRO-3 needs all ranks
    in every forward), so no reduction is needed."""
    engine.eval()
    nll = targets = 0.0
    with torch.no_grad():
        for i in range(0, len(val_rows), micro):
            b = collate_blocks(val_rows[i : i + micro], pad_id=pad_id).to(device)
            logits = engine(b.input_ids, b.sentence_ids, b.document_ids)
            nll += float(
                F.cross_entropy(
                    logits.float().flatten(0, 1),
                    b.labels.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            targets += b.num_targets
    engine.train()
    return nll / max(targets, 1)


def _stream(
    cfg: TrainConfig,
    ctx: dict[str, Any],
    rank: int,
    start_step: int,
    plans: list[Any],
    rps: int,
    chunk: int,
) -> Iterator[pa.Table]:
    import ray.data
    import ray.train

    rp = resume_point(plans, rank, start_step, rps, chunk)
    paths = [f"{ctx['data_root']}/{p}" for p in stream_paths(plans, rank, rp)]
    if start_step == ctx["dataset_start_step"]:
        ds = ray.train.get_dataset_shard(f"train_rank{rank}")
    else:
        # Restarted after a failure from a later checkpoint than the datasets were built for.
        from training.data.shards import read_shards

        ds = read_shards(paths, cfg.storage).iterator()
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = loop_config["context"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = torch.device(f"cuda:{tctx.get_local_rank()}") if cfg.run.gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = cfg.deepspeed.bf16 if cfg.deepspeed.bf16 is not None else device.type == "cuda"
    mc = ModelConfig.from_dict(ctx["model_config"])

    print(f"[train] rank {rank} on node {ray.get_runtime_context().get_node_id()}", flush=True)
    torch.manual_seed(cfg.run.seed)
    model = build_model(mc)
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, bf16),
    )

    start_step, tokens_seen = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and ctx.get("resume_from"):
        from training.data.shards import arrow_filesystem

        fs, path = arrow_filesystem(ctx["resume_from"], cfg.storage)
        checkpoint = Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads(Path(d, STATE).read_text())
            rng = Path(d, f"rng_rank{rank}.pt")
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=False))
        start_step, tokens_seen = int(state["step"]), int(state["tokens_seen"])

    shards = [Shard(p, n) for p, n in ctx["shards"]]
    micro, accum = cfg.deepspeed.micro_batch_rows, cfg.deepspeed.grad_accum
    rps = micro * accum
    total = cfg.optim.total_steps
    end = min(total, cfg.run.max_steps) if cfg.run.max_steps is not None else total
    plans = plans_until(shards, world, rps, cfg.data.shuffle_seed, total)
    pad_id = mc.pad_id
    val_rows = ctx["val_rows"]
    peak = _peak_flops(cfg, device)
    writer = _MetricsWriter(ctx["output"], cfg.storage, start_step) if rank == 0 else None
    if rank == 0:
        print(
            f"[train] {mc.arch} {model.num_parameters():,} params, {world} worker(s), ZeRO-{cfg.deepspeed.zero_stage}, "
            f"{'bf16' if bf16 else 'fp32'} on {device.type}; steps {start_step} -> {end} of {total}",
            flush=True,
        )

    def save(step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="gpthf-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            torch.save(torch.get_rng_state(), Path(tmp, f"rng_rank{rank}.pt"))
            if rank == 0:
                Path(tmp, STATE).write_text(
                    json.dumps(
                        {
                            "step": step,
                            "tokens_seen": tokens_seen,
                            "data_cursor": {
                                "global_step": step,
                                "epoch": epoch_of_step(plans, step),
                                "rows_per_step": rps * world,
                            },
                            "seed": cfg.run.seed,
                            "shuffle_seed": cfg.data.shuffle_seed,
                            "world_size": world,
                            "schedule_hash": ctx["schedule_hash"],
                            "tokenizer_sha256": ctx["tokenizer_sha256"],
                            "manifest_version": ctx["manifest_version"],
                            "model_config": mc.to_dict(),
                            "zero_stage": cfg.deepspeed.zero_stage,
                        },
                        indent=1,
                    )
                )
                Path(tmp, "model_config.json").write_text(json.dumps(mc.to_dict(), indent=1))
                Path(tmp, "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
                assert writer is not None
                writer.sync()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    t_last = time.perf_counter()
    wait = 0.0
    session_tokens, session_time = 0, 0.0
    stream = _stream(cfg, ctx, rank, start_step, plans, rps, cfg.data.shuffle_chunk_rows)
    batches = rank_micro_batches(
        stream,
        plans,
        rank,
        start_step,
        micro_rows=micro,
        grad_accum=accum,
        chunk_rows=cfg.data.shuffle_chunk_rows,
        seed=cfg.data.shuffle_seed,
    )
    step = start_step
    while step < end:
        t0 = time.perf_counter()
        step, micros = next(batches)
        collated = [
            collate_blocks(m, pad_id=pad_id, pad_to_multiple=cfg.data.pad_to_multiple)
            for m in micros
        ]
        wait += time.perf_counter() - t0
        # Everything the step's metrics and loss scale need from other ranks, in one reduction.
        local_flops = sum(train_step_flops(mc, _documents(m)).total for m in micros)
        global_targets, global_tokens, flops = _all_sum(
            [
                sum(b.num_targets for b in collated),
                sum(b.num_tokens for b in collated),
                local_flops,
            ],
            device,
        )
        lr = scheduler.get_last_lr()[0]
        nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in collated:
            b = b.to(device)
            logits = engine(b.input_ids, b.sentence_ids, b.document_ids)
            nll = F.cross_entropy(
                logits.float().flatten(0, 1),
                b.labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            # DeepSpeed divides by grad_accum and averages over ranks: this makes the gradient
            # that of the summed NLL over the global batch divided by its target count.
            engine.backward(nll * (world * accum) / global_targets)
            engine.step()
            nll_sum += nll.detach().double()
        (global_nll,) = _all_sum([float(nll_sum)], device)
        loss = global_nll / global_targets
        step_tokens = int(global_tokens)
        tokens_seen += step_tokens
        step += 1
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        session_tokens += step_tokens
        session_time += dt
        grad_norm = engine.get_global_grad_norm()
        metrics: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": step_tokens,
            "tokens_seen": tokens_seen,
            "tokens_per_s": step_tokens / dt,
            "step_time_s": dt,
            "data_wait_frac": min(1.0, wait / dt),
            "mfu": (flops / dt) / (peak * world) if peak else None,
        }
        wait = 0.0
        if val_rows and (step % cfg.run.eval_every == 0 or step == end):
            metrics["val_loss"] = _val_loss(engine, val_rows, pad_id, micro, device)
        if writer is not None and (step % cfg.run.log_every == 0 or step == end):
            writer.write(metrics)
            extra = f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            mfu = f" mfu {metrics['mfu']:.1%}" if metrics["mfu"] is not None else ""
            print(
                f"[train] step {step}/{end} loss {loss:.4f}{extra} lr {lr:.2e} gnorm {metrics['grad_norm'] or 0:.3f} "
                f"{metrics['tokens_per_s']:,.0f} tok/s{mfu} data-wait {metrics['data_wait_frac']:.0%}",
                flush=True,
            )
        # Only checkpoints are reported: a report is a barrier across workers, and the per-step
        # metrics already go to metrics.jsonl / TensorBoard.
        if step % cfg.run.checkpoint_every == 0 or step == end:
            save(step, metrics)
    peak_mem = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    if writer is not None:
        writer.write(
            {
                "step": end,
                "final": True,
                "start_step": start_step,
                "session_tokens": session_tokens,
                "session_time_s": session_time,
                "peak_memory_bytes": int(peak_mem),
            }
        )
        writer.sync()
