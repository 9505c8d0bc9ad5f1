"""Fine-tuning: a run that starts from an export's weights (``model.init_from``), e.g. to switch
Dynamic Context Pruning on for a trained model. The model must be the export's model; only the
pruning fields may differ, and the pruning parameters the export lacks keep their
initialisation (gates open: nothing is pruned at the start)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from training.export import CONFIG, ExportConfig, ExportError, load_export, resolve_export
from training.model import ModelConfig, Transformer
from training.train.config import TrainConfigError

FREE_FIELDS = (
    "prune",
    "prune_dim",
    "prune_alpha",
    "prune_init_bias",
    "activation_checkpointing",
    "attention",
)
"""ModelConfig fields a fine-tune may change (they add parameters or change no weight)."""


def check_init_from(uri: str, model: ModelConfig, tokenizer_sha256: str, storage: Any) -> None:
    """Refuse, before any worker starts, an ``init_from`` that is not an export of this model
    trained with this tokenizer (reads config.json only)."""
    from pipeline.storage import filesystem_for

    where = resolve_export(uri, storage)
    fs, root = filesystem_for(where, storage)
    try:
        with fs.open(f"{root}/{CONFIG}", "rb") as f:
            exported = ExportConfig.from_dict(json.loads(f.read()), f"{where}/{CONFIG}")
    except FileNotFoundError as exc:
        raise TrainConfigError(
            f"--init-from {uri}: no export there (no {CONFIG}); point at a training run folder "
            "or its export/"
        ) from exc
    except ExportError as exc:
        raise TrainConfigError(f"--init-from: {exc}") from exc
    theirs, ours = exported.model.to_dict(), model.to_dict()
    differ = [k for k in ours if k not in FREE_FIELDS and theirs.get(k) != ours[k]]
    if differ:
        detail = ", ".join(f"{k}: export {theirs.get(k)!r}, this run {ours[k]!r}" for k in differ)
        raise TrainConfigError(
            f"--init-from {uri} holds another model ({detail}); fine-tune with the export's "
            "--model preset and overrides (only the pruning fields may change)"
        )
    if exported.tokenizer_sha256 != tokenizer_sha256:
        raise TrainConfigError(
            f"--init-from {uri} was trained with another tokenizer (sha256 "
            f"{exported.tokenizer_sha256[:12]}, the data's is {tokenizer_sha256[:12]}): "
            "preprocess with the export's tokenizer.json"
        )


def load_init_weights(model: Transformer, uri: str, storage: Any) -> list[str]:
    """Copy the export's weights into ``model``; returns the parameters left at their init
    (pruning parameters the export lacks). A model the export's pruning differs from in shape
    is refused."""
    exported = load_export(uri, storage).model
    if dataclasses.replace(exported.config, **_free(model.config)) != model.config:
        raise TrainConfigError(f"--init-from {uri}: the export is another model")
    state = {k: v for k, v in exported.state_dict().items() if k in model.state_dict()}
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch, e.g. another prune_dim
        raise TrainConfigError(f"--init-from {uri}: weights do not fit this model ({exc})") from exc
    unexpected_missing = [k for k in missing if ".pruner." not in k]
    if unexpected_missing:
        raise TrainConfigError(f"--init-from {uri}: the export lacks {unexpected_missing[:5]}")
    return list(missing)


def _free(config: ModelConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in FREE_FIELDS}
