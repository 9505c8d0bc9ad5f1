"""What a training worker needs besides the TrainConfig: decided once by the driver (or by
``training.train.local`` on every rank), passed to Ray Train through ``train_loop_config``
(STYLE.md 11), never through module globals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.data.order import Shard
from training.model import ModelConfig


@dataclass(frozen=True)
class WorkerContext:
    model_config: ModelConfig
    """Sized to the data's tokenizer (``driver.model_config_for``)."""
    shards: tuple[Shard, ...]
    """The manifest's train shards (paths relative to ``data_root``, row counts)."""
    data_root: str
    """The preprocessing output the shard paths are relative to."""
    dataset_start_step: int
    """The global step the driver's per-rank datasets start at (a restart after a failure
    from a later checkpoint reads its own stream)."""
    resume_from: str | None
    """Checkpoint URI to continue from when Ray Train has none of its own."""
    val_rows: tuple[dict[str, Any], ...]
    """The fixed held-out sample scored at every validation."""
    output: str
    """The run folder: metrics.jsonl, tb/, export/."""
    schedule_hash: str
    tokenizer_sha256: str
    manifest_version: int
