"""The thin Ray layer: work units -> Ray Data -> per-unit records. No pipeline logic lives here."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.counters import Counters, StrictModeError
from pipeline.errors import keep_sigterm_unwinding
from pipeline.pieces import WorkUnit
from pipeline.steps import Drop
from pipeline.storage import StorageError
from pipeline.unit import UnitContext, process_unit

UnitFn = Callable[[WorkUnit, UnitContext, "dict[int, Drop] | None"], dict[str, Any]]
"""A pass over one work unit: ``process_unit``, or deduplication's ``fingerprint_unit``."""
Drops = dict[str, dict[int, Drop]]
"""Work unit key -> the ordinals of its documents to skip as copies, and why."""


def init_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start the embedded in-process Ray; True when
    this call started an embedded Ray (whose workers end with this process)."""
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
            started = True
    keep_sigterm_unwinding()  # ray.init replaced our SIGTERM handler (gpthf commands' clean-up)
    return started


_USER_ERRORS: dict[str, type[Exception]] = {
    "StrictModeError": StrictModeError,
    "StorageError": StorageError,
}


TASK_MAX_RETRIES = 2
"""Ray re-runs a task whose worker process died (OOM kill, node lost) this many times; the worker
(a Ray Data actor) itself is restarted as often as it dies, so deaths spread over a long night
cost nothing, while one group that kills its worker every time fails the run instead of running
forever (Ray Data's default retries a task forever). Errors raised by our code are not retried
by Ray: storage faults are retried per request inside the task (pipeline.storage), and a bad
input file is counted, not raised."""


# A task handles a group of units (files or pieces): Ray's per-task cost (tens of ms) would
# dominate small files, and each unit still gets its own deterministic shards. A large run is
# cut into about GROUPS_PER_WORKER groups per worker of at least MIN_TASK_BYTES: a worker that
# finishes early takes the next group, so the run's tail (workers idle while the last groups
# finish) is at most about one small group, where two large groups per worker could leave one
# worker to finish a whole large group alone. A 4 MiB group is a few seconds of one core at
# the per-token rate benchmarks/preprocess.py reports. A run too small for that still gets two
# groups per worker (when its units allow), so that every worker has work.
TASK_BYTES = 64 << 20
MIN_TASK_BYTES = 4 << 20
GROUPS_PER_WORKER = 8


def group_target(total: int, workers: int) -> int:
    """Bytes a group of units aims at, for ``total`` bytes over ``workers`` (see above)."""
    workers = max(1, workers)
    small_run = min(MIN_TASK_BYTES, total // (2 * workers))
    return max(1, min(TASK_BYTES, max(small_run, total // (GROUPS_PER_WORKER * workers))))


def group_units(units: list[WorkUnit], workers: int) -> list[list[WorkUnit]]:
    """Consecutive groups of units of about ``group_target`` bytes each."""
    target = group_target(sum(u.size for u in units), workers)
    groups: list[list[WorkUnit]] = [[]]
    size = 0
    for u in units:
        if groups[-1] and size + u.size > target:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.size
    return groups


def _process_one(
    u: WorkUnit, ctx: UnitContext, fn: UnitFn = process_unit, drop: dict[int, Drop] | None = None
) -> dict[str, Any]:
    try:
        return fn(u, ctx, drop)
    except (StrictModeError, StorageError) as exc:
        # Returned, not raised: the driver re-raises it as itself, without Ray's wrapping
        # and without retrying a failure that is not transient.
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def _drops_to_json(drop: dict[int, Drop]) -> list[list[Any]]:
    return [[ordinal, *d.to_list()] for ordinal, d in sorted(drop.items())]


def _drops_from_json(items: list[list[Any]]) -> dict[int, Drop]:
    return {int(o): Drop(reason, original) for o, reason, original in items}


def _process_batch(
    batch: dict[str, np.ndarray], ctx: UnitContext, fn: UnitFn = process_unit
) -> dict[str, np.ndarray]:
    records = []
    for group, payload in zip(batch["group"], batch["units"], strict=True):
        t0 = time.perf_counter()
        for item in json.loads(payload):
            drop = _drops_from_json(item.get("drop", []))
            record = _process_one(WorkUnit.from_dict(item), ctx, fn, drop)
            record["group"] = int(group)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            records.append(json.dumps(record))
            if "error" in record:
                # The run fails at this error: the group's other files would only try (and
                # wait out the storage retry budget) in vain.
                return {"record": np.array(records, dtype=object)}
    return {"record": np.array(records, dtype=object)}


class _GroupProcessor:
    """A Ray Data actor over groups of units: alive for the whole run, so that the next group is
    queued at it while it works. A task pool leaves each worker idle between tasks until Ray
    Data's scheduling loop, which polls for finished tasks every 0.1 s, notices the end and
    submits the next one."""

    def __init__(self, ctx: UnitContext, fn: UnitFn = process_unit) -> None:
        self.ctx = ctx
        self.fn = fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _process_batch(batch, self.ctx, self.fn)


def ray_map(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    """``fn`` over argument tuples as Ray tasks (one CPU each), results in order; an error of
    ours raised in a task is raised here as itself."""
    import ray

    init_ray()
    task = ray.remote(fn).options(num_cpus=1, max_retries=TASK_MAX_RETRIES)
    try:
        return list(ray.get([task.remote(*a) for a in args]))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (StorageError, StrictModeError)):
            raise exc.cause from None
        raise


class GroupLog:
    """One line per finished group of units in the driver's log: what a person following a
    long run (or reading its log the next morning) needs, as the groups finish."""

    def __init__(self, groups: list[list[WorkUnit]], fn: UnitFn = process_unit) -> None:
        self.groups = groups
        # (The fingerprint pass of deduplication reads the same groups before processing.)
        self.label = "" if fn is process_unit else f"{fn.__name__.removesuffix('_unit')}s: "
        self.left = [len(g) for g in groups]
        self.counters = [Counters() for _ in groups]
        self.total_bytes = sum(u.size for g in groups for u in g)
        self.done_bytes = 0
        self.t0 = time.perf_counter()

    def add(self, record: dict[str, Any]) -> None:
        g = record.get("group", 0)
        self.counters[g].merge(Counters.from_dict(record["stats"]))
        self.left[g] -= 1
        if self.left[g] == 0:
            self._line(g, record.get("seconds", 0.0))

    def _line(self, g: int, seconds: float) -> None:
        units = self.groups[g]
        size = sum(u.size for u in units)
        self.done_bytes += size
        c = self.counters[g].counts
        files = {u.file.uri for u in units}
        pieces = sum(1 for u in units if u.pieces > 1)
        what = f"{len(files)} file(s)" + (f", {pieces} piece(s) of split files" if pieces else "")
        skipped = self.counters[g].skipped
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
        done = sum(1 for n in self.left if n == 0)
        print(
            f"[preprocess] {self.label}group {g + 1} done ({done}/{len(self.groups)}): {what}, "
            f"{size / 1e6:.1f} MB in {seconds:.1f}s, {c.get('documents', 0):,} documents, "
            f"{c.get('tokens', 0):,} tokens, skipped: {skips}; run: "
            f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB "
            f"after {time.perf_counter() - self.t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )


def run_units_here(
    units: list[WorkUnit],
    ctx: UnitContext,
    *,
    fn: UnitFn = process_unit,
    drops: Drops | None = None,
) -> list[dict[str, Any]]:
    """Process every unit in this process, one after the other: for runs too small to pay for
    starting Ray (see ``PreprocessConfig.local_below_bytes``)."""
    log = GroupLog([units], fn)
    records = []
    t0 = time.perf_counter()
    for u in units:
        record = _process_one(u, ctx, fn, (drops or {}).get(u.key))
        if "error" in record:
            err = record["error"]
            raise _USER_ERRORS[err["type"]](err["message"])
        record["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(record)
        log.add(record)
    return records


def run_units(
    units: list[WorkUnit],
    ctx: UnitContext,
    *,
    workers: int = 0,
    cpus_per_worker: float = 1.0,
    progress: bool = False,
    fn: UnitFn = process_unit,
    drops: Drops | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn`` over every unit on Ray Data: groups of units over ``workers`` actors at once
    (``drops``: the documents each unit skips as copies)."""
    import ray
    from ray.data import DataContext

    init_ray()
    if not units:
        return []
    if workers <= 0:
        workers = max(1, int(ray.available_resources().get("CPU", 1) // cpus_per_worker))
    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = progress
    groups = group_units(units, workers)
    drops = drops or {}
    items = [
        {
            "group": i,
            "units": json.dumps(
                [{**u.to_dict(), "drop": _drops_to_json(drops.get(u.key, {}))} for u in g]
            ),
        }
        for i, g in enumerate(groups)
    ]
    log = GroupLog(groups, fn)
    threads = str(max(1, int(cpus_per_worker)))
    with warnings.catch_warnings():
        # Ray 2.60 takes max_retries only as a plain remote arg, which it flags as deprecated
        # (named parameters arrive in 2.64); revisit when upgrading Ray.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _GroupProcessor,
            batch_size=1,
            fn_constructor_kwargs={"ctx": ctx, "fn": fn},
            num_cpus=cpus_per_worker,
            compute=ray.data.ActorPoolStrategy(
                size=min(workers, len(groups)), max_tasks_in_flight_per_actor=2
            ),
            max_restarts=-1,
            max_task_retries=TASK_MAX_RETRIES,
            # The tokenizer's thread pool must stay within the CPUs this task reserved.
            runtime_env={
                "env_vars": {"RAYON_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "true"}
            },
        )
    records = []
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            record = json.loads(row["record"])
            if "error" in record:
                # The first failed unit fails the run now (rows arrive as tasks finish).
                err = record["error"]
                raise _USER_ERRORS[err["type"]](err["message"])
            records.append(record)
            log.add(record)
    finally:
        # Stops the streaming executor at once, cancelling the tasks still running or queued,
        # instead of whenever the garbage collector reaches the iterator.
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    return records
