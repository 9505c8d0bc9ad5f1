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


def _process_batch(batch: dict[str, np.ndarray], ctx: UnitContext) -> dict[str, np.ndarray]:
    records = []
    for uri, size, fingerprint in zip(
        batch["uri"], batch["size"], batch["fingerprint"], strict=True
    ):
        f = InputFile(uri=str(uri), size=int(size), fingerprint=str(fingerprint))
        try:
            record = process_unit(f, ctx)
        except (StrictModeError, StorageError) as exc:
            # Returned, not raised: the driver re-raises it as itself, without Ray's wrapping
            # and without retrying a failure that is not transient.
            record = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        records.append(json.dumps(record))
    return {"record": np.array(records, dtype=object)}


def run_units(
    units: list[InputFile],
    ctx: UnitContext,
    *,
    workers: int = 0,
    cpus_per_worker: float = 1.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Process every unit on Ray Data; one task per unit, at most ``workers`` at once."""
    import ray
    from ray.data import DataContext

    init_ray()
    if not units:
        return []
    if workers <= 0:
        workers = max(1, int(ray.available_resources().get("CPU", 1) // cpus_per_worker))
    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = progress
    items = [{"uri": u.uri, "size": u.size, "fingerprint": u.fingerprint} for u in units]
    threads = str(max(1, int(cpus_per_worker)))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _process_batch,  # type: ignore[arg-type]
        batch_size=1,
        fn_kwargs={"ctx": ctx},
        num_cpus=cpus_per_worker,
        compute=ray.data.TaskPoolStrategy(size=min(workers, len(units))),
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
