"""The consolidated fp32 export: what evaluation, generation and other tools load.

A folder (local or ``s3://``)::

    model.safetensors   fp32 weights (the tied ``lm_head.weight`` is not stored twice)
    tokenizer.json      the exact tokenizer of the training data, special tokens included
    config.json         ``ExportConfig`` (written last: its presence means the export is whole)

It lives beside the model, not in the trainer: loading an export needs torch, safetensors and
the storage layer only, never DeepSpeed or Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.storage import filesystem_for
from training.model import ModelConfig, Transformer, build_model

FORMAT = "gpthf-export/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TIED = "lm_head.weight"


class ExportError(UserError):
    """An export that is missing, unreadable, or does not fit its own config."""


@dataclass(frozen=True)
class ExportConfig:
    """``config.json`` of an export: the model and where it came from."""

    model: ModelConfig
    step: int
    """Global training step the weights are from."""
    tokens_seen: int
    tokenizer_sha256: str
    """sha256 of the training data's tokenizer.json (data scored with another is refused)."""
    special_ids: dict[str, int]
    """Role -> id of the special tokens (end_of_sentence, end_of_document, pad)."""
    data: str = ""
    """The preprocessing output the model was trained on."""
    manifest_version: int = 0
    schedule_hash: str = ""
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (e.g. the redacted train config) that no loader depends on."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> ExportConfig:
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise ExportError(f"{where}: export format {fmt!r}, this version reads {FORMAT!r}")
        try:
            special = data.get("special_ids")
            if special is None:  # exports written before special_ids was typed
                special = {k: int(v["id"]) for k, v in data["special_tokens"].items()}
            return cls(
                model=ModelConfig.from_dict(data["model"]),
                step=int(data["step"]),
                tokens_seen=int(data["tokens_seen"]),
                tokenizer_sha256=str(data["tokenizer_sha256"]),
                special_ids={str(k): int(v) for k, v in special.items()},
                data=str(data.get("data", "")),
                manifest_version=int(data.get("manifest_version", 0)),
                schedule_hash=str(data.get("schedule_hash", "")),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where}: not a valid export config ({exc!r})") from exc


@dataclass
class Exported:
    model: Transformer
    config: ExportConfig
    tokenizer_json: str

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def write_export(
    out_dir: str,
    state_dict: dict[str, torch.Tensor],
    config: ExportConfig,
    tokenizer_json: str,
    storage: Any = None,
) -> None:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in state_dict.items() if k != TIED}
    fs, root = filesystem_for(out_dir, storage)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, os.path.join(tmp, WEIGHTS))
        Path(tmp, CONFIG).write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
        Path(tmp, TOKENIZER).write_text(tokenizer_json)
        fs.makedirs(root, exist_ok=True)
        for name in (WEIGHTS, TOKENIZER, CONFIG):  # config last: the export is whole
            fs.put_file(os.path.join(tmp, name), f"{root}/{name}")


def resolve_export(uri: str, storage: Any = None) -> str:
    """An export folder, or a training run folder (its ``export/``), as the export's URI."""
    fs, root = filesystem_for(uri, storage)
    if not fs.exists(f"{root}/{CONFIG}") and fs.exists(f"{root}/export/{CONFIG}"):
        return f"{uri.rstrip('/')}/export"
    return uri


def load_export(uri: str, storage: Any = None, device: str | torch.device = "cpu") -> Exported:
    """Load an export (local or URL; a run folder means its ``export/``) without DeepSpeed."""
    from safetensors.torch import load as load_safetensors

    uri = resolve_export(uri, storage)
    fs, root = filesystem_for(uri, storage)
    try:
        with fs.open(f"{root}/{CONFIG}", "rb") as f:
            raw = json.loads(f.read())
        with fs.open(f"{root}/{WEIGHTS}", "rb") as f:
            weights = load_safetensors(f.read())
        with fs.open(f"{root}/{TOKENIZER}", "rb") as f:
            tokenizer_json = f.read().decode()
    except FileNotFoundError as exc:
        raise ExportError(
            f"{uri} is not a gpthf export (missing {exc.filename or exc}); point at a training "
            "run folder or its export/"
        ) from exc
    except Exception as exc:  # safetensors, JSON and UTF-8 errors of a damaged file
        raise ExportError(f"{uri}: unreadable export ({type(exc).__name__}: {exc})") from exc
    config = ExportConfig.from_dict(raw, f"{uri}/{CONFIG}")
    tok_sha = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if tok_sha != config.tokenizer_sha256:
        raise ExportError(
            f"{uri}/{TOKENIZER} has sha256 {tok_sha[:12]}... but the model was trained with "
            f"{str(config.tokenizer_sha256)[:12]}... ({CONFIG}): the tokenizer was replaced, and "
            "with another vocabulary generation would silently drop or misread ids. Put back "
            "the tokenizer.json of the data the model was trained on."
        )
    model = model_from_weights(config.model, weights, uri)
    return Exported(model=model.to(device).eval(), config=config, tokenizer_json=tokenizer_json)


def model_from_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], where: str
) -> Transformer:
    """The model of ``config`` with ``weights`` (the tied head may be absent); weights that do
    not fit the config are an ``ExportError`` naming ``where``."""
    model = build_model(config)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a weight of another shape (e.g. another prune_dim)
        raise ExportError(
            f"{where}: weights do not fit the model config ({str(exc).splitlines()[-1].strip()}); "
            "the files are damaged or the config belongs to another model"
        ) from exc
    missing = [k for k in missing if k != TIED]
    if missing or unexpected:
        raise ExportError(
            f"{where}: weights do not fit the model config (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); the files are damaged or the config belongs to another model"
        )
    return model.eval()
