"""Typed configuration of the preprocessing job: the single source of truth.

YAML files and CLI flags only override these dataclasses; the resolved config (secrets
removed) is written into every manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

INPUT_FORMATS = ("auto", "jsonl", "parquet", "text")
TEXT_DOCUMENT_UNITS = ("file", "paragraph")
ON_CHANGED = ("error", "replace")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what to do."""


@dataclass
class StorageConfig:
    """How to reach object storage. Empty fields fall back to the standard AWS variables."""

    endpoint_url: str | None = None
    """S3-protocol endpoint, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL or AWS)."""
    key: str | None = None
    """Access key id (default: AWS_ACCESS_KEY_ID). Never written to outputs."""
    secret: str | None = None
    """Secret access key (default: AWS_SECRET_ACCESS_KEY). Never written to outputs."""
    region: str | None = None
    """Region name (default: AWS_DEFAULT_REGION)."""

    def redacted(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("key", "secret"):
            if out[name]:
                out[name] = "***"
        return out


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)
    """Local paths or fsspec URLs (s3://...); a directory/prefix or a glob means all matching files."""
    format: str = "auto"
    """auto (by extension), jsonl, parquet or text."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) that holds the document text."""
    id_field: str | None = None
    """Field holding a stable document id; default: derived from source path + record index."""
    text_document: str = "file"
    """For plain text: one document per file, or one per blank-line-separated paragraph."""

    def __post_init__(self) -> None:
        if self.format not in INPUT_FORMATS:
            raise ConfigError(f"input.format must be one of {INPUT_FORMATS}, got {self.format!r}")
        if self.text_document not in TEXT_DOCUMENT_UNITS:
            raise ConfigError(
                f"input.text_document must be one of {TEXT_DOCUMENT_UNITS}, got {self.text_document!r}"
            )


@dataclass
class PackingConfig:
    sentences_per_block: int = 32
    """S: sentences per block (only the last block of a shard may hold fewer)."""
    max_sentence_tokens: int = 64
    """M: a longer sentence is split into pieces of at most M tokens, each ending with EOS-S."""
    heldout_fraction: float = 0.01
    """Fraction of documents (by seeded hash of the document id) held out for evaluation."""
    seed: int = 0
    """Seed of the held-out hash; recorded in the manifest."""
    row_group_blocks: int = 1024
    """Blocks per Parquet row group."""

    def __post_init__(self) -> None:
        if self.sentences_per_block < 1:
            raise ConfigError("packing.sentences_per_block (S) must be >= 1")
        if self.max_sentence_tokens < 3:
            # A piece needs room for one content token, end-of-document and end-of-sentence.
            raise ConfigError("packing.max_sentence_tokens (M) must be >= 3")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError("packing.heldout_fraction must be in [0, 1)")
        if self.row_group_blocks < 1:
            raise ConfigError("packing.row_group_blocks must be >= 1")


@dataclass
class PreprocessConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: str = ""
    """Output location (local path or fsspec URL); holds train/, heldout/ and manifest.json."""
    tokenizer: str = ""
    """Path or URL of a tokenizers JSON file (missing special tokens are added)."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    strict: bool = False
    """Make every skipped record fatal instead of counted."""
    workers: int = 0
    """Concurrent processing tasks (0: one per available CPU)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each processing task reserves in Ray."""
    on_changed: str = "error"
    """An input whose size/etag changed since it was processed: error, or replace its shards."""
    plot: bool = True
    """Write stats.png next to stats.json."""

    def __post_init__(self) -> None:
        if self.on_changed not in ON_CHANGED:
            raise ConfigError(f"on_changed must be one of {ON_CHANGED}, got {self.on_changed!r}")
        if self.workers < 0:
            raise ConfigError("workers must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be > 0")

    def validate_for_run(self) -> None:
        if not self.input.paths:
            raise ConfigError("no INPUT given: name at least one file, prefix or glob")
        if not self.output:
            raise ConfigError("--output is required")
        if not self.tokenizer:
            raise ConfigError(
                "--tokenizer is required (train one with `gpthf tokenizer train INPUT --output PATH`)"
            )

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if redact:
            out["storage"] = self.storage.redacted()
        return out

    def output_identity(self) -> dict[str, Any]:
        """The settings an existing output was built with; changing any of them is refused."""
        p = self.packing
        return {
            "sentences_per_block": p.sentences_per_block,
            "max_sentence_tokens": p.max_sentence_tokens,
            "heldout_fraction": p.heldout_fraction,
            "seed": p.seed,
        }


def config_hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = {
            "input": InputConfig,
            "packing": PackingConfig,
            "storage": StorageConfig,
        }.get(name)
        if cls is PreprocessConfig and sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name} must be a mapping")
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def layered_config(
    path: str | Path | None, overrides: dict[str, Any] | None, error: type[Exception] = ConfigError
) -> dict[str, Any]:
    """The YAML file's mapping with dotted-key overrides applied (``packing.seed``; None = unset)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise error(f"{path}: the config file must be a YAML mapping")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def load_preprocess_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> PreprocessConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``packing.seed``; None = unset)."""
    data = layered_config(path, overrides)
    cfg = _build(PreprocessConfig, data, str(path) if path else "config")
    assert isinstance(cfg, PreprocessConfig)
    return cfg
