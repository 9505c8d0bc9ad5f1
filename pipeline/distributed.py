"""The thin Ray layer: work units -> Ray Data -> per-unit records. No pipeline logic lives here."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from pipeline.counters import StrictModeError
from pipeline.storage import InputFile, StorageError
from pipeline.unit import UnitContext, process_unit


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start the embedded in-process Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


_USER_ERRORS: dict[str, type[Exception]] = {
    "StrictModeError": StrictModeError,
    "StorageError": StorageError,
}


TASK_MAX_RETRIES = 2
"""Ray re-runs a task whose worker process died (OOM kill, node lost) this many times. Ray Data's
default is forever, which turns a file that kills its worker into a run that never ends. Errors
raised by our code are not retried by Ray: storage faults are retried per request inside the
task (pipeline.storage), and a bad input file is counted, not raised."""


# A task handles a group of files of about this many bytes: Ray's per-task cost (tens of ms)
# would dominate small files, and each file still gets its own deterministic shards.
TASK_BYTES = 64 << 20


def group_units(units: list[InputFile], workers: int) -> list[list[InputFile]]:
    """Consecutive groups of about TASK_BYTES, at least two per worker when files allow."""
    total = sum(u.size for u in units)
    target = max(1, min(TASK_BYTES, total // max(1, 2 * workers)))
    groups: list[list[InputFile]] = [[]]
    size = 0
    for u in units:
        if groups[-1] and size + u.size > target:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.size
    return groups


def _process_one(f: InputFile, ctx: UnitContext) -> dict[str, Any]:
    try:
        return process_unit(f, ctx)
    except (StrictModeError, StorageError) as exc:
        # Returned, not raised: the driver re-raises it as itself, without Ray's wrapping
        # and without retrying a failure that is not transient.
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def _process_batch(batch: dict[str, np.ndarray], ctx: UnitContext) -> dict[str, np.ndarray]:
    records = []
    for group in batch["units"]:
        for item in json.loads(group):
            record = _process_one(InputFile(**item), ctx)
            records.append(json.dumps(record))
            if "error" in record:
                # The run fails at this error: the group's other files would only try (and
                # wait out the storage retry budget) in vain.
                return {"record": np.array(records, dtype=object)}
    return {"record": np.array(records, dtype=object)}


def run_units(
    units: list[InputFile],
    ctx: UnitContext,
    *,
    workers: int = 0,
    cpus_per_worker: float = 1.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Process every unit on Ray Data: tasks over groups of units, at most ``workers`` at once."""
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
    items = [
        {
            "units": json.dumps(
                [{"uri": u.uri, "size": u.size, "fingerprint": u.fingerprint} for u in g]
            )
        }
        for g in groups
    ]
    threads = str(max(1, int(cpus_per_worker)))
    with warnings.catch_warnings():
        # Ray 2.60 takes max_retries only as a plain remote arg, which it flags as deprecated
        # (named parameters arrive in 2.64); revisit when upgrading Ray.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _process_batch,  # type: ignore[arg-type]
            batch_size=1,
            fn_kwargs={"ctx": ctx},
            num_cpus=cpus_per_worker,
            compute=ray.data.TaskPoolStrategy(size=min(workers, len(groups))),
            max_retries=TASK_MAX_RETRIES,
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
    finally:
        # Stops the streaming executor at once, cancelling the tasks still running or queued,
        # instead of whenever the garbage collector reaches the iterator.
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    return records
