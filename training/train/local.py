"""Training without Ray: one process per rank under torchrun, or a plain process as one rank.

    torchrun --nproc-per-node 8 -m training.train.local --data OUT --output RUN --gpu [...]
    python -m training.train.local --data OUT --output RUN [...]        # one CPU rank

Every flag of ``gpthf train`` applies (``--workers`` defaults to torchrun's world size). The
same config, the same data order and the same ``TrainWorker`` as ``gpthf train``: each rank
reads its shards with pyarrow, in the order ``training.data.order`` plans (what Ray Data streams
to a Ray Train worker), so the losses equal a Ray run's step for step. It exists for machines
without Ray (the DeepSpeed GPU path: bf16, NCCL) and for tests that drive training directly.

Checkpoints go to ``RUN/local/<name>/checkpoint_<step>/`` (every rank's files, the trainer
state last); ``--resume`` continues from the last one. ``RUN/metrics.jsonl``, ``RUN/tb/``,
``RUN/export/`` and ``RUN/summary.json`` are those of ``gpthf train``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch.distributed as dist

from pipeline.errors import UserError, interruption, sigterm_unwinds
from pipeline.storage import StorageError, filesystem_for, full_uri, storage_errors
from training.data.shards import shard_batches
from training.train.checkpoint import TrainState, list_checkpoints
from training.train.config import TrainConfig, TrainConfigError
from training.train.driver import (
    RunSetup,
    TrainResult,
    export_run,
    find_resume,
    finish,
    format_summary,
    local_copy,
    nothing_to_do,
    prune_checkpoints,
    run_dir,
    setup_run,
    worker_context,
    write_run_config,
)
from training.train.lease import RunLease
from training.train.metrics import MetricsWriter
from training.train.worker import TrainWorker, destroy_distributed, init_distributed, run_steps


def arrow_stream(uris: list[str], storage: Any = None) -> Iterator[pa.RecordBatch]:
    """The rows of ``uris`` in file order, read with pyarrow (Ray Data's read, without Ray)."""
    for uri in uris:
        yield from shard_batches(uri, storage)


def save_checkpoint(worker: TrainWorker, folder: str, storage: Any = None) -> str:
    """Every rank's part of the checkpoint of ``worker.global_step`` into ``folder`` (a
    collective). The trainer state goes last, after every rank's files: a directory without it
    is an unfinished upload that discovery skips. Returns the checkpoint's URI.

    A save cut short (a full disk, an interruption) is removed again: it could never be resumed
    from, and after a full disk it is what keeps the disk full. A disk error is a StorageError
    naming the location and its free space (it would fail the same way again: not retried).
    """
    fs, root = filesystem_for(folder, storage)
    target = f"{root}/checkpoint_{worker.global_step:08d}"
    what = f"the checkpoint of step {worker.global_step}"
    try:
        with tempfile.TemporaryDirectory(prefix="gpthf-ckpt-") as tmp:
            with storage_errors(tmp, f"write a local copy of {what} to"):
                worker.save(tmp)
            state_file = None
            with storage_errors(folder, f"write {what} to"):
                for p in sorted(Path(tmp).rglob("*")):
                    if not p.is_file():
                        continue
                    if TrainState.is_state_file(p.name):
                        state_file = p
                        continue
                    remote = f"{target}/{p.relative_to(tmp).as_posix()}"
                    fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                    fs.put_file(str(p), remote)
            dist.barrier()
            if state_file is not None:  # rank 0
                with storage_errors(folder, f"write {what} to"):
                    fs.put_file(str(state_file), f"{target}/{state_file.name}")
    except BaseException:
        with contextlib.suppress(OSError):
            if fs.exists(target):
                fs.rm(target, recursive=True)
        raise
    dist.barrier()
    return full_uri(fs, target)


def run_local(cfg: TrainConfig) -> TrainResult:
    """Train this process's rank (a collective: every rank of the group calls it). Creates the
    process group where none exists (and then destroys it at the end)."""
    created = not dist.is_initialized()
    world = int(os.environ.get("WORLD_SIZE", "1")) if created else dist.get_world_size()
    if cfg.run.workers != world:  # before the process group: refused in a second
        raise TrainConfigError(
            f"run.workers is {cfg.run.workers} but {world} process(es) run: give --workers the "
            "number of ranks torchrun starts (--nproc-per-node x nodes), or leave it out"
        )
    rank, world = init_distributed(cfg.run.gpu)
    try:
        return _run(cfg, rank)
    finally:
        if created:
            destroy_distributed()


def _run(cfg: TrainConfig, rank: int) -> TrainResult:
    setup = setup_run(cfg, verify=rank == 0)  # the data folder is checked once per run
    # Rank 0 holds the run folder's lease (one writer per folder); if another run holds it,
    # rank 0 stops here and torchrun ends the other ranks.
    lease = RunLease(setup.output, setup.cfg.storage) if rank == 0 else None
    with lease or contextlib.nullcontext():
        return _run_ranks(setup, rank)


def _run_ranks(setup: RunSetup, rank: int) -> TrainResult:
    t0 = time.perf_counter()
    cfg = setup.cfg  # with the paths the workers need resolved
    checkpoints = run_dir(setup, "local")
    start_step, resume_from = find_resume(setup, checkpoints, verbose=rank == 0)
    if rank == 0:
        write_run_config(setup)
    if start_step >= setup.end_step:
        return nothing_to_do(setup, start_step)
    ctx = worker_context(setup, start_step, resume_from)
    with TrainWorker(cfg, ctx, local_rank=int(os.environ.get("LOCAL_RANK", "0"))) as worker:
        worker.build()
        if resume_from is not None:
            with local_copy(resume_from, cfg.storage) as d:
                worker.restore(d)
        writer = MetricsWriter(setup.output, cfg.storage, start_step) if rank == 0 else None

        def checkpoint(step: int, record: dict[str, Any]) -> None:
            save_checkpoint(worker, checkpoints, cfg.storage)
            if rank == 0:
                prune_checkpoints(checkpoints, cfg.run.keep_checkpoints, cfg.storage)
                assert writer is not None
                writer.sync()

        stream = arrow_stream(worker.stream_uris(), cfg.storage)
        try:
            run_steps(worker, stream, writer=writer, checkpoint=checkpoint)
        finally:
            if writer is not None:
                writer.close()
    if rank != 0:  # rank 0 exports
        return TrainResult(setup.output, start_step, setup.end_step, None, {"note": f"rank {rank}"})
    with local_copy(list_checkpoints(checkpoints, cfg.storage)[-1][1], cfg.storage) as d:
        state = export_run(setup, d)
    return finish(setup, start_step, state, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from pipeline import settings

    parser = argparse.ArgumentParser(
        prog="python -m training.train.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings.add_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = settings.from_args(TrainConfig, args, error=TrainConfigError)
        if "run.workers" not in settings.flag_overrides(TrainConfig, args):
            cfg.run.workers = int(os.environ.get("WORLD_SIZE", "1"))
        with sigterm_unwinds():
            result = run_local(cfg)
    except StorageError as exc:  # a full disk, say: the run's checkpoints so far are intact
        print(
            f"error: {exc}. The checkpoints written before are kept: then run the same command "
            "with --resume",
            file=sys.stderr,
        )
        return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        name, code = interruption(exc)
        print(
            f"interrupted ({name}): the checkpoints written so far are kept; run the same "
            "command with --resume to continue from the last one",
            file=sys.stderr,
        )
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
