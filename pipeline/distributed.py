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


def _process_batch(batch: dict[str, np.ndarray], ctx: UnitContext) -> dict[str, np.ndarray]:
    records = []
    for uri, size, fingerprint in zip(batch["uri"], batch["size"], batch["fingerprint"], strict=True):
        f = InputFile(uri=str(uri), size=int(size), fingerprint=str(fingerprint))
        records.append(json.dumps(process_unit(f, ctx)))
    return {"record": np.array(records, dtype=object)}


def _user_error(exc: BaseException) -> BaseException | None:
    """Find our own error (strict mode, storage) inside Ray's wrappers, to re-raise it plainly."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StrictModeError | StorageError):
            return type(seen)(str(seen).splitlines()[-1] if "\n" in str(seen) else str(seen))
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return None


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
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    threads = str(max(1, int(cpus_per_worker)))
    ds = ds.map_batches(
        _process_batch,
        batch_size=1,
        fn_kwargs={"ctx": ctx},
        num_cpus=cpus_per_worker,
        compute=ray.data.TaskPoolStrategy(size=min(workers, len(units))),
        # The tokenizer's thread pool must stay within the CPUs this task reserved.
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "true"}},
    )
    try:
        return [json.loads(row["record"]) for row in ds.iter_rows()]
    except Exception as exc:
        plain = _user_error(exc)
        if plain is not None:
            raise plain from None
        raise
