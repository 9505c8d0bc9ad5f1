"""Training driver: check everything early, build per-rank datasets, run TorchTrainer, export.

The steps before and after the workers (``setup_run``, ``find_resume``, ``worker_context``,
``export_run``, ``finish``) are shared with the Ray-free ``training.train.local``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.blocks import SCORING_COLUMNS
from pipeline.errors import UserError
from pipeline.manifest import SPLITS, Manifest
from pipeline.storage import (
    StorageError,
    absolute_uri,
    filesystem_for,
    full_uri,
    storage_errors,
    write_bytes_atomic,
)
from training.data.order import (
    EpochPlan,
    Shard,
    dropped_rows,
    plans_until,
    resume_point,
    stream_paths,
)
from training.data.shards import arrow_filesystem, read_shards
from training.export import ExportConfig, write_export
from training.model import ModelConfig
from training.train.checkpoint import (
    CheckpointError,
    TrainState,
    check_resumable,
    consolidate,
    list_checkpoints,
    read_state,
)
from training.train.config import TrainConfig, TrainConfigError
from training.train.context import WorkerContext
from training.train.finetune import check_init_from
from training.train.integrity import inspect, no_code_execution
from training.train.lease import RunLease
from training.train.metrics import parse_metrics

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
    if {"prune", "prune_alpha"} & set(overrides):
        raise TrainConfigError(
            "switch pruning on with --prune and set its final alpha with --prune-alpha "
            "(pruning.enabled, pruning.alpha_final), not through model.overrides"
        )
    if cfg.pruning.enabled:
        overrides.update(prune=True, prune_alpha=cfg.pruning.alpha_final)
    try:
        return ModelConfig.preset(cfg.model.preset, **data, **overrides)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model: {exc}") from exc


DATA_TASK_CPUS = 1.0
"""CPUs a CPU run leaves free for the Ray Data tasks that feed the workers: a parquet read
task takes 1 CPU, so 0.5 left over hangs as surely as none (the 2-CPU deadlock of STACK.md)."""


def default_cpus_per_worker(workers: int, cluster_cpus: float, gpu: bool) -> float:
    """``run.cpus_per_worker`` when unset: 1 on GPU; on CPU as much as leaves DATA_TASK_CPUS
    free for the data tasks, at most 1, in steps of 0.05 (0 when the workers do not fit)."""
    if gpu:
        return 1.0
    share = (cluster_cpus - DATA_TASK_CPUS) / workers
    return max(0.0, min(1.0, math.floor(share * 20 + 1e-9) / 20))


def check_resources(cfg: TrainConfig) -> float:
    """The CPUs each worker reserves; a run whose workers would leave no CPU for the Ray Data
    tasks that feed them is refused, and so is a GPU run on a cluster with too few GPUs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    cpus = cfg.run.cpus_per_worker
    if cpus is None:
        cpus = default_cpus_per_worker(cfg.run.workers, total, cfg.run.gpu)
        if cpus <= 0:
            raise TrainConfigError(
                f"{cfg.run.workers} CPU workers do not fit on the cluster's {total:g} CPUs with "
                f"{DATA_TASK_CPUS:g} left for the data tasks that feed them (the run would hang, "
                "see STACK.md): lower run.workers or add CPUs."
            )
        left = f", leaving {total - cfg.run.workers * cpus:g} of {total:g} for the data tasks"
        print(
            f"[train] --cpus-per-worker not given: {cpus:g} CPU per worker"
            + ("" if cfg.run.gpu else left),
            flush=True,
        )
    need = cfg.run.workers * cpus
    if not cfg.run.gpu and total - need < DATA_TASK_CPUS:
        raise TrainConfigError(
            f"{cfg.run.workers} worker(s) x {cfg.run.cpus_per_worker} CPU leave {total - need:g} of the "
            f"cluster's {total:g} CPUs for the data tasks that feed them: the run would hang without "
            "an error (see STACK.md). Lower run.cpus_per_worker (e.g. 0.5) or run.workers."
        )
    if cfg.run.gpu and ray.cluster_resources().get("GPU", 0.0) < cfg.run.workers:
        raise TrainConfigError(
            f"--gpu with {cfg.run.workers} workers, but the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs"
        )
    return cpus


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


@dataclass(frozen=True)
class RunSetup:
    """What is decided before any worker starts, from the config and the data's manifest."""

    cfg: TrainConfig
    data_uri: str
    output: str
    manifest: Manifest
    model_config: ModelConfig
    train_shards: tuple[Shard, ...]
    world: int
    plans: list[EpochPlan]
    rows_per_step: int
    """Rows per rank per step (micro_batch_rows x grad_accum)."""
    end_step: int
    """Where this invocation stops: run.max_steps, or the schedule's end."""


def setup_run(cfg: TrainConfig, verify: bool = True) -> RunSetup:
    """Check the config against the data before a cluster spends time: the manifest, the data
    folder against it (``data.verify``; ``verify=False`` where another process of the same run
    checks it), the model it sizes, enough rows for a step."""
    cfg.validate_for_run()
    data_uri, output = cfg.data.uri.rstrip("/"), cfg.run.output.rstrip("/")
    manifest = Manifest.require(data_uri, cfg.storage)
    if verify:
        check = manifest.verify_data(data_uri, SPLITS, cfg.storage, cfg.data.verify)
        print(f"[train] {check.describe()}", flush=True)
    mc = model_config_for(cfg, manifest)
    if cfg.model.init_from:
        # Resolved here: the workers load it from Ray Train's working directory.
        init_from = absolute_uri(cfg.model.init_from)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from))
        check_init_from(cfg.model.init_from, mc, manifest.tokenizer.sha256, cfg.storage)
    train_shards = [Shard(s.path, s.rows) for s in manifest.shards("train")]
    world = cfg.run.workers
    rps = cfg.deepspeed.micro_batch_rows * cfg.deepspeed.grad_accum
    plans = plans_until(train_shards, world, rps, cfg.data.shuffle_seed, cfg.optim.total_steps)
    end = (
        min(cfg.optim.total_steps, cfg.run.max_steps)
        if cfg.run.max_steps is not None
        else cfg.optim.total_steps
    )
    return RunSetup(
        cfg, data_uri, output, manifest, mc, tuple(train_shards), world, plans, rps, end
    )


def find_resume(
    setup: RunSetup, run_dir: str, verbose: bool = True, resuming: bool = False
) -> tuple[int, str | None]:
    """(start step, checkpoint to continue from) for the checkpoints under ``run_dir``: an
    output with checkpoints needs --resume (``resuming``: this run's own, after a crash), and
    the last one must belong to this run."""
    cfg, output = setup.cfg, setup.output
    existing = list_checkpoints(run_dir, cfg.storage)
    if existing and not (cfg.run.resume or resuming):
        raise TrainConfigError(
            f"{output} already holds checkpoints (last at step {existing[-1][0]}): pass --resume to continue that run, or choose another --output"
        )
    if not existing:
        if cfg.run.resume:
            print(
                f"[train] --resume: no checkpoint under {run_dir}, starting from step 0", flush=True
            )
        return 0, None
    skipped = []
    for step, uri in reversed(existing):
        state = read_state(uri, cfg.storage)
        problems = inspect(uri, state.world_size, cfg.storage)
        if not problems:
            break
        skipped.append(f"{uri} (step {step}): {'; '.join(problems[:3])}")
    else:
        raise CheckpointError(
            f"no intact checkpoint under {run_dir}: " + " | ".join(skipped) + ". Restore one "
            "from a backup or start a new --output."
        )
    for line in skipped:
        print(f"[train] warning: not resuming from a damaged checkpoint: {line}", flush=True)
    check_resumable(
        state, setup.model_config, cfg.schedule_hash(), setup.world, setup.manifest.tokenizer.sha256
    )
    if verbose:
        print(f"[train] resuming from {uri} (step {step})", flush=True)
    return step, uri


RUN_DIRS = {"ray": "gpthf train", "local": "python -m training.train.local"}
"""RUN/<kind>/<name>: where each driver keeps its checkpoints, and how it is run."""


def run_dir(setup: RunSetup, kind: str) -> str:
    """The checkpoint folder of this run's driver ``kind``; an output with checkpoints of the
    other driver is refused (their metrics would be overwritten, and neither resumes the other's
    layout)."""
    for other, how in RUN_DIRS.items():
        folder = f"{setup.output}/{other}/{setup.cfg.run.name}"
        if other != kind and list_checkpoints(folder, setup.cfg.storage):
            raise TrainConfigError(
                f"{setup.output} holds checkpoints of a `{how}` run ({folder}): continue it with "
                f"`{how} --resume`, or choose another --output"
            )
    return f"{setup.output}/{kind}/{setup.cfg.run.name}"


def write_run_config(setup: RunSetup) -> None:
    """RUN/train_config.json: the resolved config, secrets redacted."""
    fs, root = filesystem_for(setup.output, setup.cfg.storage)
    data = json.dumps(setup.cfg.to_dict(redact=True), indent=1).encode()
    write_bytes_atomic(fs, f"{root}/train_config.json", data)


def worker_context(setup: RunSetup, start_step: int, resume_from: str | None) -> WorkerContext:
    cfg, manifest = setup.cfg, setup.manifest
    return WorkerContext(
        model_config=setup.model_config,
        shards=setup.train_shards,
        data_root=setup.data_uri,
        dataset_start_step=start_step,
        resume_from=resume_from,
        val_rows=tuple(_val_rows(setup.data_uri, manifest, cfg.run.eval_rows, cfg.storage)),
        output=setup.output,
        schedule_hash=cfg.schedule_hash(),
        tokenizer_sha256=manifest.tokenizer.sha256,
        manifest_version=manifest.version,
    )


def nothing_to_do(setup: RunSetup, start_step: int) -> TrainResult:
    note = {"note": "nothing to do: already at the requested step"}
    return TrainResult(setup.output, start_step, start_step, None, note)


EMBEDDED_TRAIN_ENV = {
    # The controller polls its workers every 2 s by default, and each poll is where it notices
    # the group started or finished: up to 2 s at either end of every fit (measured: worker
    # start 13.6 -> 11.6 s, worker stop 4.8 -> 1.0 s with both settings, gpthf-tiny, 2 cores).
    # On one machine a poll is a local call; a cluster keeps Ray's default.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # The preemption watcher (one more actor process to start) watches for spot nodes being
    # taken away: the embedded Ray is this machine alone, which nothing preempts.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train settings of the embedded (one-machine) Ray, set before the controller starts (Ray
Train passes them on from the driver's environment); a value already set is kept."""


def init_ray_for_training() -> None:
    """Join the cluster named by RAY_ADDRESS, or start the embedded Ray *with* the dashboard's
    state API: Ray Train V2's placement-group cleaner asks that API every second whether the
    train controller still lives, and without it (``include_dashboard=False``) every ask logs
    "Failed to query Ray Train Controller actor state"."""
    import ray

    from pipeline.distributed import init_ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        for var, value in EMBEDDED_TRAIN_ENV.items():
            os.environ.setdefault(var, value)  # a user's own setting wins
        ray.init(include_dashboard=None, log_to_driver=True)
    init_ray()


def run_training(cfg: TrainConfig) -> TrainResult:
    started = time.time()
    setup = setup_run(cfg)
    with RunLease(setup.output, setup.cfg.storage):  # one writer per run folder
        return _train_on_ray(setup, started)


def _train_on_ray(setup: RunSetup, started: float) -> TrainResult:
    """Fit until the run ends: a crashed attempt (a worker or node lost) is fitted again from
    the newest intact checkpoint, up to ``run.max_failures`` times; a deterministic error (a
    full disk, denied access, a user error) stops the run at once, as it would fail the same
    way again: redoing the steps since the last checkpoint only to meet it again costs a
    night. So Ray Train itself never retries (``max_failures=0``): it cannot tell the two
    apart, and this loop can (:func:`deterministic_failure`)."""
    cfg = setup.cfg
    marks = {"started": started, "ray_start": time.time()}  # epoch seconds, see run_phases
    init_ray_for_training()
    cpus = check_resources(cfg)
    marks["ray_ready"] = time.time()
    folder = run_dir(setup, "ray")
    first_step, resume_from = find_resume(setup, folder)
    write_run_config(setup)
    if first_step >= setup.end_step:
        return nothing_to_do(setup, first_step)
    start_step, failures, t0 = first_step, 0, time.perf_counter()
    marks["first_fit"] = time.time()
    while True:
        marks["fit"] = time.time()
        result = _fit(setup, cpus, start_step, resume_from)
        marks["fit_ended"] = time.time()
        if result.error is None:
            break
        remove_unfinished(folder, cfg.storage)
        fatal = deterministic_failure(result.error, folder)
        if fatal is not None:
            kept = list_checkpoints(folder, cfg.storage)
            # A half-written checkpoint holds the space the next run needs: removed, as long
            # as an intact one remains (pruning keeps the newest that verify).
            prune_checkpoints(folder, max(len(kept), 1), cfg.storage)
            if isinstance(fatal, StorageError):
                left = [step for step, _ in list_checkpoints(folder, cfg.storage)]
                kept_text = f"at steps {left}" if left else "none yet"
                raise StorageError(
                    f"{fatal}. Stopped without retrying (it would fail the same way again); "
                    f"the checkpoints written before are kept ({kept_text}): once fixed, run "
                    "the same command with --resume"
                ) from result.error
            raise fatal from result.error
        failures += 1
        if failures > cfg.run.max_failures:
            raise result.error
        start_step, resume_from = find_resume(setup, folder, verbose=False, resuming=True)
        where = f"the checkpoint of step {start_step}" if resume_from else "step 0"
        print(
            f"[train] attempt failed ({_first_line(result.error)}); fitting again from {where} "
            f"(failure {failures} of run.max_failures={cfg.run.max_failures})",
            flush=True,
        )
        if start_step >= setup.end_step:  # it crashed after its last checkpoint
            break
    wall = time.perf_counter() - t0
    with local_copy(list_checkpoints(folder, cfg.storage)[-1][1], cfg.storage) as d:
        state = export_run(setup, d)
    prune_checkpoints(folder, cfg.run.keep_checkpoints, cfg.storage)
    return finish(setup, first_step, state, wall, marks)


def _first_line(exc: BaseException) -> str:
    base = getattr(exc, "worker_failures", None)
    if base:
        rank, err = next(iter(base.items()))
        exc = getattr(err, "_base_exc", err)
        return f"rank {rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"


DETERMINISTIC_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
)
"""OS errors that a retry meets again: no space, no quota, no permission, a read-only disk."""


def deterministic_failure(error: BaseException, folder: str) -> UserError | None:
    """The user-facing error of a failed fit that would fail the same way on a retry: a
    UserError (StorageError included) raised by a worker, or an OS error of
    :data:`DETERMINISTIC_ERRNOS`; None for a crash (a lost worker or node, a collective cut
    short by one), which a retry from the last checkpoint can get past."""
    failures = dict(getattr(error, "worker_failures", {}))
    controller = getattr(error, "controller_failure", None)  # e.g. writing the run's state
    where = {f"rank {rank}": err for rank, err in sorted(failures.items())}
    if controller is not None:
        where["Ray Train's controller"] = controller
    for who, err in where.items():
        base = getattr(err, "_base_exc", err)  # Ray Train wraps the worker's exception
        if isinstance(base, UserError):
            return base
        if isinstance(base, OSError) and (
            base.errno in DETERMINISTIC_ERRNOS or "No space left on device" in str(base)
        ):
            try:  # the message storage errors get everywhere: where, how much space, the fix
                with storage_errors(folder, f"write ({who}) the run's files under"):
                    raise base
            except StorageError as exc:
                return exc
    return None


def _fit(setup: RunSetup, cpus: float, start_step: int, resume_from: str | None) -> _Fit:
    """One TorchTrainer fit from ``start_step``: its result, or the error that ended it."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    from training.train.worker import train_loop_per_worker

    cfg = setup.cfg  # with the paths the workers need resolved
    datasets = {}
    for r in range(setup.world):
        rp = resume_point(
            setup.plans, r, start_step, setup.rows_per_step, cfg.data.shuffle_chunk_rows
        )
        ds = read_shards(
            [f"{setup.data_uri}/{p}" for p in stream_paths(setup.plans, r, rp)], cfg.storage
        )
        # A rank's stream is read for the whole run: a progress bar of it only garbles the log.
        ds.context.enable_progress_bars = False
        datasets[f"train_rank{r}"] = ds
    context = worker_context(setup, start_step, resume_from)
    # One Ray run per fit, inside the run's folder: Ray never restores its own snapshot of an
    # earlier fit (which may name a checkpoint that was damaged or removed since); the resume
    # point is the newest intact checkpoint of any attempt, chosen by the caller.
    storage_fs, storage_path = arrow_filesystem(run_dir(setup, "ray"), cfg.storage)
    attempt = time.strftime("attempt-%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    env = {
        "DS_ACCELERATOR": "cuda" if cfg.run.gpu else "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        # Train V2 reroutes print() to a logger and, as Ray's own stdout wrapper looks like a
        # user redirect to it, also prints it: every worker line would reach the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.run.gpu else {})}
    run_config = RunConfig(  # type: ignore[call-arg]  # Train V2 RunConfig has worker_runtime_env
        name=attempt,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        failure_config=FailureConfig(max_failures=0),  # retried by _train_on_ray, or not
        worker_runtime_env={"env_vars": env},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "context": context},
        torch_config=TorchConfig(backend="nccl" if cfg.run.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=setup.world,
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
    try:
        return _Fit(trainer.fit(), None)
    except TrainingFailedError as exc:  # fit() raises what it would report as result.error
        return _Fit(None, exc)


@dataclass
class _Fit:
    result: Any  # ray.train.Result, where the fit ended well
    error: BaseException | None


@contextlib.contextmanager
def local_copy(uri: str, storage: Any = None) -> Iterator[str]:
    """A local directory with the files under ``uri`` (the directory itself where it is local)."""
    fs, path = filesystem_for(uri, storage)
    if full_uri(fs, path) == path:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gpthf-ckpt-") as tmp:
        for f in fs.find(path):
            dest = Path(tmp, f[len(path) :].lstrip("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest))
        yield tmp


_VERIFIED: set[str] = set()
"""Checkpoints this process has verified: a checkpoint is never rewritten, so each is hashed
once, not at every pruning."""


def checkpoint_problems(uri: str, storage: Any = None) -> list[str]:
    """What is wrong with a checkpoint (``integrity.inspect``; empty: it verifies)."""
    if uri in _VERIFIED:
        return []
    try:
        problems = inspect(uri, read_state(uri, storage).world_size, storage)
    except (CheckpointError, ValueError, OSError) as exc:
        problems = [f"unreadable ({exc})"]
    if not problems:
        _VERIFIED.add(uri)
    return problems


def remove_unfinished(folder: str, storage: Any = None) -> list[str]:
    """Remove the checkpoint folders under ``folder`` (and its attempts) that have no trainer
    state: uploads cut short, which no resume can use and which hold the space a full disk
    needs back. Only after a failed fit, under the run's lease (no other writer is mid-upload).
    Returns the URIs removed."""
    fs, root = filesystem_for(folder, storage)
    if not fs.exists(root):
        return []
    entries = [e.rstrip("/") for e in fs.ls(root, detail=False)]
    for attempt in [e for e in entries if e.rsplit("/", 1)[-1].startswith("attempt-")]:
        entries += [e.rstrip("/") for e in fs.ls(attempt, detail=False)]
    removed = []
    for path in entries:
        name = path.rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and fs.isdir(path) and not TrainState.exists_in(fs, path):
            print(f"[train] removing the unfinished checkpoint upload {path}", flush=True)
            fs.rm(path, recursive=True)
            removed.append(full_uri(fs, path))
    return removed


def prune_checkpoints(folder: str, keep: int, storage: Any = None) -> list[str]:
    """Keep the newest ``keep`` checkpoints *that verify*, over all attempts (Ray prunes within
    one); returns the URIs removed.

    A readable trainer state is not enough: a checkpoint truncated by a full disk, or altered,
    has one too, and keeping it in place of an intact one loses the run's last good state. So,
    newest first, checkpoints are verified (checksums of every rank's files) until ``keep`` of
    them have; the older ones go unread, and damaged ones go too (a resume skips them anyway,
    and they hold the disk a full-disk failure needs back). Where none verifies, nothing is
    removed: the damaged ones are all there is, for a person to look at.
    """
    fs, _ = filesystem_for(folder, storage)
    found = list_checkpoints(folder, storage)
    intact, damaged = 0, []
    remove = []
    for step, uri in reversed(found):
        if intact >= keep:
            remove.append(uri)
            continue
        problems = checkpoint_problems(uri, storage)
        if problems:
            damaged.append((step, uri, problems))
        else:
            intact += 1
    if intact == 0:
        for step, uri, problems in damaged:
            print(
                f"[train] warning: checkpoint {uri} (step {step}) does not verify "
                f"({'; '.join(problems[:2])}) and no checkpoint of this run does: kept",
                flush=True,
            )
        return []
    for step, uri, problems in damaged:
        print(
            f"[train] removing damaged checkpoint {uri} (step {step}): {'; '.join(problems[:2])}",
            flush=True,
        )
        remove.append(uri)
    for uri in remove:
        fs.rm(filesystem_for(uri, storage)[1], recursive=True)
        _VERIFIED.discard(uri)
    return remove


def export_run(setup: RunSetup, checkpoint_dir: str) -> TrainState:
    """RUN/export/ from a local checkpoint directory holding every rank's shards."""
    cfg, manifest, data_uri = setup.cfg, setup.manifest, setup.data_uri
    state = TrainState.load(checkpoint_dir)
    with no_code_execution(checkpoint_dir):
        weights = consolidate(checkpoint_dir, cfg.deepspeed.zero_stage)
    tok_fs, tok_path = filesystem_for(f"{data_uri}/tokenizer.json", cfg.storage)
    with tok_fs.open(tok_path, "rb") as f:
        tokenizer_json = f.read().decode()
    write_export(
        f"{setup.output}/export",
        weights,
        ExportConfig(
            # The attention backend is how a run computed, not part of the weights: the export
            # records the default (gathered SDPA), which runs on any device; a user on CUDA may
            # load it with attention="flex" again.
            model=dataclasses.replace(setup.model_config, attention="sdpa"),
            step=state.step,
            tokens_seen=state.tokens_seen,
            tokenizer_sha256=manifest.tokenizer.sha256,
            special_ids=manifest.special_ids,
            data=data_uri,
            manifest_version=manifest.version,
            schedule_hash=cfg.schedule_hash(),
        ),
        tokenizer_json,
        cfg.storage,
    )
    return state


def finish(
    setup: RunSetup,
    start_step: int,
    state: TrainState,
    wall: float,
    marks: dict[str, float] | None = None,
) -> TrainResult:
    """RUN/summary.json and the result, after the export; ``marks``: the driver's clock
    (:func:`run_phases`), for the summary's ``phases``."""
    cfg, output = setup.cfg, setup.output
    dropped = dropped_rows(setup.plans, setup.rows_per_step)
    summary = summarise(output, cfg, start_step, state.step, wall, dropped)
    worker = summary.pop("worker_phases")
    if marks is not None:
        summary["started_at"] = round(marks["started"], 3)  # epoch seconds
        summary["phases"] = run_phases({**marks, "exported": time.time()}, worker)
    fs, root = filesystem_for(output, cfg.storage)
    write_bytes_atomic(fs, f"{root}/summary.json", json.dumps(summary, indent=1).encode())
    return TrainResult(output, start_step, state.step, f"{output}/export", summary)


def read_metrics(output: str, storage: Any = None) -> list[dict[str, Any]]:
    fs, root = filesystem_for(output, storage)
    path = f"{root}/metrics.jsonl"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return parse_metrics(f.read(), path)


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
        "torch_threads": final[-1].get("torch_threads") if final else None,
        "dropped_tail_rows_per_epoch_total": dropped,
        "worker_phases": final[-1].get("phases") if final else None,
    }


def run_phases(marks: dict[str, float], worker: dict[str, float] | None) -> dict[str, float]:
    """Where a run's time went, in seconds, in order, from the driver's clock
    (``marks``, epoch seconds: started, ray_start, ray_ready, first_fit, fit, fit_ended,
    exported) and rank 0's (``worker``: the ``phases`` of its final metrics record, None
    where it has none); the parts add up to ``total``, exported - started.

    setup: config and data checks, the run's lease, the resume lookup; ray_start: starting (or
    joining) Ray; retries: fits that failed and were fitted again; worker_start: from the fit's
    start to rank 0 running (Ray Train's controller, the worker group, the process group);
    engine_build: model, optimizer and deepspeed.initialize (and a resume's restore);
    first_batch: the data pipeline's start to the first batch; steps: every step after it
    (data wait, collate, forward, backward, optimizer, metrics); validate and checkpoint:
    inside the loop; worker_stop: from rank 0's last step to the fit's return (its final
    metrics, the engine's and the worker group's shutdown); export: the consolidated weights,
    pruning old checkpoints, the summary; other: what the parts leave (rank 0's own set-up
    outside the engine). Without ``worker`` the fit is one part, ``fit``.
    """
    out = {
        "setup": marks["ray_start"] - marks["started"] + marks["first_fit"] - marks["ray_ready"],
        "ray_start": marks["ray_ready"] - marks["ray_start"],
        "retries": marks["fit"] - marks["first_fit"],
    }
    if worker:
        out |= {
            "worker_start": worker["started"] - marks["fit"],
            "engine_build": worker["build_s"] + worker["restore_s"],
            "first_batch": worker["first_batch_s"],
            "steps": worker["steps_s"],
            "validate": worker["validate_s"],
            "checkpoint": worker["checkpoint_s"],
            "worker_stop": marks["fit_ended"] - worker["ended"],
        }
    else:
        out["fit"] = marks["fit_ended"] - marks["fit"]
    out["export"] = marks["exported"] - marks["fit_ended"]
    total = marks["exported"] - marks["started"]
    out["other"] = total - sum(out.values())
    out["total"] = total
    return {k: round(v, 3) for k, v in out.items()}


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
