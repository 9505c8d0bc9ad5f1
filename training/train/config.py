"""Typed training configuration: the single source of truth (YAML and flags only override it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import StorageConfig, layered_config


class TrainConfigError(ValueError):
    pass


@dataclass
class DataSection:
    uri: str = ""
    """A preprocessing output (its manifest.json is read; never a raw listing)."""
    shuffle_seed: int = 0
    """Seed of the epoch shard order and the chunk shuffle; recorded in checkpoints."""
    shuffle_chunk_rows: int = 256
    """Rows shuffled together inside a rank's stream (a resume re-reads at most this many)."""
    pad_to_multiple: int = 8


@dataclass
class ModelSection:
    preset: str = "gpthf-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any ModelConfig field except the vocabulary and special ids (those come from the data)."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    total_steps: int = 200
    """Length of the schedule; --max-steps can stop earlier without changing the run."""
    weight_decay: float = 0.1
    """Applied to matrices only (not norms, not embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.total_steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise TrainConfigError(
                "optim: need 0 <= warmup_steps <= total_steps and total_steps >= 1"
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError("optim: lr must be > 0 and min_lr_ratio in [0, 1]")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    micro_batch_rows: int = 8
    """Blocks per worker per micro-batch."""
    grad_accum: int = 1
    bf16: bool | None = None
    """None: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainConfigError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        if self.micro_batch_rows < 1 or self.grad_accum < 1:
            raise TrainConfigError("deepspeed: micro_batch_rows and grad_accum must be >= 1")


@dataclass
class RunSection:
    output: str = ""
    """Run folder (local or s3://): checkpoints, metrics, export."""
    name: str = "train"
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD (one per node), STRICT_PACK."""
    max_steps: int | None = None
    """Stop after this global step (the schedule is unchanged: resume continues the same run)."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 50
    eval_rows: int = 64
    """Held-out blocks scored at each validation (a fixed sample, the same every time)."""
    log_every: int = 1
    seed: int = 0
    """Model initialisation seed."""
    resume: bool = False
    max_failures: int = 0
    peak_flops_per_worker: float | None = None
    """Peak FLOP/s of one worker's device, for MFU; None: known GPUs only."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise TrainConfigError("run.workers must be >= 1")
        if self.checkpoint_every < 1 or self.eval_every < 1 or self.log_every < 1:
            raise TrainConfigError("run: checkpoint_every, eval_every, log_every must be >= 1")


@dataclass
class TrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/credentials (default: the AWS_* variables)."""

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if redact:
            out["storage"] = self.storage.redacted()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        sections = {
            "data": DataSection,
            "model": ModelSection,
            "optim": OptimSection,
            "deepspeed": DeepSpeedSection,
            "run": RunSection,
            "storage": StorageConfig,
        }
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise TrainConfigError(
                f"unknown config section(s) {unknown}; known: {sorted(sections)}"
            )
        kwargs = {}
        for name, section in sections.items():
            values = data.get(name) or {}
            known = {f.name for f in dataclasses.fields(section)}
            bad = sorted(set(values) - known)
            if bad:
                raise TrainConfigError(f"unknown key(s) {bad} in {name}; known: {sorted(known)}")
            kwargs[name] = section(**values)
        return cls(**kwargs)

    def schedule_hash(self) -> str:
        """What must not change between a run and its resume (the run's identity)."""
        data = dataclasses.asdict(self.data)
        data.pop("uri")  # the same data may move
        ident = {
            "data": data,
            "model": dataclasses.asdict(self.model),
            "optim": dataclasses.asdict(self.optim),
            "deepspeed": {
                k: v
                for k, v in dataclasses.asdict(self.deepspeed).items()
                if k != "activation_checkpointing"
            },
            "seed": self.run.seed,
            "workers": self.run.workers,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def validate_for_run(self) -> None:
        if not self.data.uri:
            raise TrainConfigError("--data is required (a preprocessing output with a manifest)")
        if not self.run.output:
            raise TrainConfigError("--output is required")


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``optim.lr``; None = unset)."""
    return TrainConfig.from_dict(layered_config(path, overrides, TrainConfigError))
