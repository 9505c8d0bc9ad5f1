"""Checkpoint contents and discovery (the consolidated export is ``training.export``).

A checkpoint directory (what ``ray.train.report`` uploads; every rank contributes its files)::

    ds/...                 DeepSpeed shards of all ranks (tag "ds")
    trainer_state.json     step, tokens seen, data cursor, seed, world size, hashes (rank 0)
    model_config.json      ModelConfig (rank 0)
    train_config.json      the resolved TrainConfig (rank 0)
    rng_rank{r}.pt         torch RNG state of each rank
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.storage import filesystem_for, full_uri
from training.model import ModelConfig

DS_TAG = "ds"
STATE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from, or does not belong to this run."""


def list_checkpoints(ray_run_dir: str, storage: Any = None) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a trainer_state.json) under a Ray run dir, by step."""
    fs, root = filesystem_for(ray_run_dir, storage)
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_"):
            continue
        state_path = f"{entry.rstrip('/')}/{STATE}"
        if not fs.exists(state_path):
            continue  # an upload that never finished
        with fs.open(state_path, "rb") as f:
            state = json.loads(f.read())
        found.append((int(state["step"]), full_uri(fs, entry.rstrip("/"))))
    return sorted(found)


def read_state(checkpoint_uri: str, storage: Any = None) -> dict[str, Any]:
    fs, path = filesystem_for(checkpoint_uri, storage)
    with fs.open(f"{path}/{STATE}", "rb") as f:
        state: dict[str, Any] = json.loads(f.read())
    return state


def check_resumable(
    state: dict[str, Any],
    model_config: ModelConfig,
    schedule_hash: str,
    world: int,
    tokenizer_sha: str,
) -> None:
    """Refuse a resume that could not continue the same run, naming what differs."""
    theirs = ModelConfig.from_dict(state["model_config"])
    shape = ("arch", "vocab_size", "d_model", "n_heads", "n_layers", "n_encoder_layers", "ffn_dim")
    diff = [
        f"{k}: checkpoint {getattr(theirs, k)}, config {getattr(model_config, k)}"
        for k in shape
        if getattr(theirs, k) != getattr(model_config, k)
    ]
    if diff:
        raise CheckpointError(
            "the checkpoint is of another model shape (" + "; ".join(diff) + "). Resume with the "
            "model it was trained with, or start a new run in another --output."
        )
    if state["tokenizer_sha256"] != tokenizer_sha:
        raise CheckpointError(
            "the checkpoint was trained on data of another tokenizer "
            f"({state['tokenizer_sha256'][:12]}... vs {tokenizer_sha[:12]}...)"
        )
    if state["world_size"] != world:
        raise CheckpointError(
            f"the checkpoint was written by {state['world_size']} workers; an exact resume needs the "
            f"same number (got --workers {world})"
        )
    if state["schedule_hash"] != schedule_hash:
        raise CheckpointError(
            "the training config (data order, batch, optimiser or schedule) differs from the "
            "checkpoint's: resuming would not continue the same run. Start a new --output instead."
        )


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
