"""Checkpoint contents, discovery, and the consolidated fp32 export (safetensors + config JSON).

A checkpoint directory (what ``ray.train.report`` uploads; every rank contributes its files)::

    ds/...                 DeepSpeed shards of all ranks (tag "ds")
    trainer_state.json     step, tokens seen, data cursor, seed, world size, hashes (rank 0)
    model_config.json      ModelConfig (rank 0)
    train_config.json      the resolved TrainConfig (rank 0)
    rng_rank{r}.pt         torch RNG state of each rank

The export (``OUT/export``) loads without DeepSpeed: ``model.safetensors``, ``config.json``
(model config, tokenizer sha256, special ids, step) and ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.storage import filesystem_for, full_uri
from training.model import ModelConfig, Transformer, build_model

DS_TAG = "ds"
STATE = "trainer_state.json"
TIED = "lm_head.weight"


class CheckpointError(ValueError):
    pass


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


def write_export(
    out_dir: str,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer_json: str,
    storage: Any = None,
) -> None:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in state_dict.items() if k != TIED}
    fs, root = filesystem_for(out_dir, storage)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        Path(tmp, "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        Path(tmp, "tokenizer.json").write_text(tokenizer_json)
        fs.makedirs(root, exist_ok=True)
        for name in ("model.safetensors", "tokenizer.json", "config.json"):  # config last
            fs.put_file(os.path.join(tmp, name), f"{root}/{name}")


@dataclass
class Exported:
    model: Transformer
    config: dict[str, Any]
    tokenizer_json: str

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def load_export(uri: str, storage: Any = None, device: str | torch.device = "cpu") -> Exported:
    """Load an export (local or URL) into a ready model, without DeepSpeed."""
    from safetensors.torch import load as load_safetensors

    fs, root = filesystem_for(uri, storage)
    try:
        with fs.open(f"{root}/config.json", "rb") as f:
            config = json.loads(f.read())
        with fs.open(f"{root}/model.safetensors", "rb") as f:
            weights = load_safetensors(f.read())
        with fs.open(f"{root}/tokenizer.json", "rb") as f:
            tokenizer_json = f.read().decode()
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{uri} is not a gpthf export (missing {exc.filename or exc}); point at OUT/export"
        ) from exc
    except (ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{uri}: unreadable export ({exc})") from exc
    model = build_model(ModelConfig.from_dict(config["model"]))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != TIED]
    if missing or unexpected:
        raise CheckpointError(
            f"{uri}: weights do not fit the model config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return Exported(model=model.to(device).eval(), config=config, tokenizer_json=tokenizer_json)
