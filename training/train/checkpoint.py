"""Checkpoint contents and discovery (the consolidated export is ``training.export``).

A checkpoint directory (what ``ray.train.report`` uploads, or what ``training.train.local``
writes; every rank contributes its files)::

    ds/...                 DeepSpeed shards of all ranks (tag "ds")
    trainer_state.json     TrainState: step, tokens seen, data cursor, seeds, world size, hashes
                           (rank 0, written last: a directory without it is incomplete)
    model_config.json      ModelConfig (rank 0)
    train_config.json      the resolved TrainConfig (rank 0)
    rng_rank{r}.pt         torch RNG state of each rank
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.storage import filesystem_for, full_uri
from training.model import ModelConfig

DS_TAG = "ds"
_STATE_FILE = "trainer_state.json"
STATE_FORMAT = 1
"""Version of trainer_state.json. Version 1 is also what files without the key are (written
before the key existed): same keys, same meaning."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from, or does not belong to this run."""


@dataclass(frozen=True)
class DataCursor:
    """Where the data order stands: the next global step, its epoch, global rows per step."""

    global_step: int
    epoch: int
    rows_per_step: int


@dataclass(frozen=True)
class TrainState:
    """Everything a resume needs besides the DeepSpeed shards and RNG states (STYLE.md 8)."""

    step: int
    """Global steps done (the next step to run)."""
    tokens_seen: int
    data_cursor: DataCursor
    seed: int
    """Model initialisation seed."""
    shuffle_seed: int
    world_size: int
    schedule_hash: str
    """``TrainConfig.schedule_hash``: what must not change between a run and its resume."""
    tokenizer_sha256: str
    manifest_version: int
    model_config: ModelConfig
    zero_stage: int

    def __post_init__(self) -> None:
        problems = []
        if self.step < 0 or self.tokens_seen < 0:
            problems.append(f"step {self.step} and tokens_seen {self.tokens_seen} must be >= 0")
        if self.data_cursor.global_step != self.step:
            problems.append(
                f"data_cursor.global_step {self.data_cursor.global_step} != step {self.step}"
            )
        if self.world_size < 1 or self.data_cursor.rows_per_step < 1:
            problems.append("world_size and data_cursor.rows_per_step must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage {self.zero_stage} is not 0-3")
        if problems:
            raise CheckpointError("invalid trainer state: " + "; ".join(problems))

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_config"] = self.model_config.to_dict()
        out["format_version"] = STATE_FORMAT
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = _STATE_FILE) -> TrainState:
        version = data.get("format_version", 1)
        if version != STATE_FORMAT:
            raise CheckpointError(
                f"{where} is trainer-state format {version}; this code reads format "
                f"{STATE_FORMAT}: resume it with the gpthf version that wrote it"
            )
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}: the checkpoint is damaged or foreign")
        try:
            cursor = DataCursor(**{k: int(v) for k, v in data["data_cursor"].items()})
            return cls(
                step=int(data["step"]),
                tokens_seen=int(data["tokens_seen"]),
                data_cursor=cursor,
                seed=int(data["seed"]),
                shuffle_seed=int(data["shuffle_seed"]),
                world_size=int(data["world_size"]),
                schedule_hash=str(data["schedule_hash"]),
                tokenizer_sha256=str(data["tokenizer_sha256"]),
                manifest_version=int(data["manifest_version"]),
                model_config=ModelConfig.from_dict(data["model_config"]),
                zero_stage=int(data["zero_stage"]),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{where} is malformed: {exc}") from exc

    def write(self, directory: str | Path) -> None:
        """Into a local checkpoint directory (rank 0, after every other file of the checkpoint)."""
        Path(directory, _STATE_FILE).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        """From a local checkpoint directory."""
        path = Path(directory, _STATE_FILE)
        if not path.exists():
            raise CheckpointError(f"{directory} has no {_STATE_FILE}: not a complete checkpoint")
        return cls.from_dict(json.loads(path.read_text()), str(path))

    @classmethod
    def read(cls, checkpoint_uri: str, storage: Any = None) -> TrainState:
        """From a checkpoint directory anywhere (local or s3://)."""
        fs, path = filesystem_for(checkpoint_uri, storage)
        with fs.open(f"{path}/{_STATE_FILE}", "rb") as f:
            return cls.from_dict(json.loads(f.read()), f"{checkpoint_uri}/{_STATE_FILE}")

    @staticmethod
    def exists_in(fs: Any, path: str) -> bool:
        """Whether the checkpoint directory ``path`` on ``fs`` is complete."""
        return bool(fs.exists(f"{path.rstrip('/')}/{_STATE_FILE}"))

    @staticmethod
    def is_state_file(name: str) -> bool:
        """Whether a checkpoint file is the state (the one written last)."""
        return Path(name).name == _STATE_FILE

    # -- validation ------------------------------------------------------------------------------

    def check_resumable(
        self, model_config: ModelConfig, schedule_hash: str, world: int, tokenizer_sha: str
    ) -> None:
        """Refuse a resume that could not continue the same run, naming what differs."""
        theirs = self.model_config
        shape = (
            "arch",
            "vocab_size",
            "d_model",
            "n_heads",
            "n_layers",
            "n_encoder_layers",
            "ffn_dim",
        )
        diff = [
            f"{k}: checkpoint {getattr(theirs, k)}, config {getattr(model_config, k)}"
            for k in shape
            if getattr(theirs, k) != getattr(model_config, k)
        ]
        if diff:
            raise CheckpointError(
                "the checkpoint is of another model shape (" + "; ".join(diff) + "). Resume with "
                "the model it was trained with, or start a new run in another --output."
            )
        if self.tokenizer_sha256 != tokenizer_sha:
            raise CheckpointError(
                "the checkpoint was trained on data of another tokenizer "
                f"({self.tokenizer_sha256[:12]}... vs {tokenizer_sha[:12]}...)"
            )
        if self.world_size != world:
            raise CheckpointError(
                f"the checkpoint was written by {self.world_size} workers; an exact resume needs "
                f"the same number (got --workers {world})"
            )
        if self.schedule_hash != schedule_hash:
            raise CheckpointError(
                "the training config (data order, batch, optimiser or schedule) differs from the "
                "checkpoint's: resuming would not continue the same run. Start a new --output "
                "instead."
            )


def list_checkpoints(run_dir: str, storage: Any = None) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a readable trainer state) under a run dir, by step: its
    ``checkpoint_*`` folders and those of its ``attempt-*`` folders (one per ``fit``)."""
    fs, root = filesystem_for(run_dir, storage)
    if not fs.exists(root):
        return []
    found = []
    entries = [e.rstrip("/") for e in fs.ls(root, detail=False)]
    for attempt in [e for e in entries if e.rsplit("/", 1)[-1].startswith("attempt-")]:
        entries += [e.rstrip("/") for e in fs.ls(attempt, detail=False)]
    for path in entries:
        if not path.rsplit("/", 1)[-1].startswith("checkpoint_"):
            continue
        if not TrainState.exists_in(fs, path):
            continue  # an upload that never finished
        uri = full_uri(fs, path)
        try:
            found.append((TrainState.read(uri, storage).step, uri))
        except (CheckpointError, ValueError, OSError) as exc:
            print(f"[train] warning: skipping {uri}: unreadable trainer state ({exc})", flush=True)
    return sorted(found)


def read_state(checkpoint_uri: str, storage: Any = None) -> TrainState:
    return TrainState.read(checkpoint_uri, storage)


def check_resumable(
    state: TrainState,
    model_config: ModelConfig,
    schedule_hash: str,
    world: int,
    tokenizer_sha: str,
) -> None:
    """Refuse a resume that could not continue the same run, naming what differs."""
    state.check_resumable(model_config, schedule_hash, world, tokenizer_sha)


def consolidate(checkpoint_dir: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a local checkpoint directory holding every rank's shards."""
    if zero_stage == 0:
        path = Path(checkpoint_dir) / DS_TAG / "mp_rank_00_model_states.pt"
        module: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=False)[
            "module"
        ]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    return {k: v.float().contiguous() for k, v in sd.items()}
