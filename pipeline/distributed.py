"""The thin Ray layer: work units -> Ray Data -> per-unit records. No pipeline logic lives here."""

from __future__ import annotations

import json
import os
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
    records = [
        json.dumps(_process_one(InputFile(**item), ctx))
        for group in batch["units"]
        for item in json.loads(group)
    ]
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
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _process_batch,  # type: ignore[arg-type]
        batch_size=1,
        fn_kwargs={"ctx": ctx},
        num_cpus=cpus_per_worker,
        compute=ray.data.TaskPoolStrategy(size=min(workers, len(groups))),
        # The tokenizer's thread pool must stay within the CPUs this task reserved.
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "true"}},
    )
    records = []
    for row in ds.iter_rows():
        record = json.loads(row["record"])
        if "error" in record:
            err = record["error"]
            raise _USER_ERRORS[err["type"]](err["message"])
        records.append(record)
    return records
