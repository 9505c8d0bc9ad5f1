"""Typed configuration of the preprocessing job: the single source of truth.

YAML files and CLI flags only override these dataclasses (``pipeline.settings`` reads both and
generates the flags, help included, from the fields and their docstrings); the resolved config
(secrets removed) is written into every manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.settings import ConfigError, cli, load_config

InputFormat = Literal["auto", "jsonl", "parquet", "text"]
TextDocument = Literal["file", "paragraph"]
OnChanged = Literal["error", "replace"]
DedupMode = Literal["none", "exact", "near"]

__all__ = [
    "ConfigError",
    "DedupConfig",
    "InputConfig",
    "PackingConfig",
    "PreprocessConfig",
    "StorageConfig",
    "config_hash",
    "load_preprocess_config",
]


@dataclass
class StorageConfig:
    """Object storage (s3://); empty fields fall back to the standard AWS variables."""

    endpoint_url: str | None = field(default=None, metadata=cli("--endpoint-url"))
    """S3-protocol endpoint, e.g. http://127.0.0.1:8333 (none: AWS_ENDPOINT_URL or AWS)."""
    key: str | None = field(default=None, metadata=cli(secret=True))
    """Access key id (default: AWS_ACCESS_KEY_ID). Never written to outputs."""
    secret: str | None = field(default=None, metadata=cli(secret=True))
    """Secret access key (default: AWS_SECRET_ACCESS_KEY). Never written to outputs."""
    region: str | None = None
    """Region name (none: AWS_DEFAULT_REGION)."""
    retries: int = 5
    """Retries of a storage request that failed transiently (throttling, 5xx, reset, timeout)."""
    retry_base_s: float = 0.5
    """First backoff in seconds; it doubles per retry (with jitter): 0.5, 1, 2, 4, 8."""
    retry_budget_s: float = 30.0
    """Seconds one request may spend retrying before the run fails naming the object."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_base_s < 0 or self.retry_budget_s < 0:
            raise ConfigError("storage.retries, retry_base_s and retry_budget_s must be >= 0")

    def redacted(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("key", "secret"):
            if out[name]:
                out[name] = "***"
        return out


@dataclass
class InputConfig:
    """What to read and how to find the text in it."""

    paths: list[str] = field(default_factory=list, metadata=cli("--input", positional="INPUT"))
    """Local paths or fsspec URLs (s3://...); a directory/prefix or a glob means all matching files."""
    format: InputFormat = field(default="auto", metadata=cli("--format"))
    """auto (by extension), jsonl, parquet or text."""
    text_field: str = field(default="text", metadata=cli("--text-field"))
    """Field (JSONL) or column (Parquet) that holds the document text."""
    id_field: str | None = field(default=None, metadata=cli("--id-field"))
    """Field holding a stable document id; none: derived from source path + record index."""
    text_document: TextDocument = field(default="file", metadata=cli("--text-document"))
    """For plain text: one document per file, or one per blank-line-separated paragraph."""
    max_record_bytes: int = 8 << 20
    """A longer JSONL line or text document is skipped as record_too_large (never held whole)."""
    split_bytes: int = field(default=16 << 20, metadata=cli("--split-bytes"))
    """A larger file is cut into pieces of about this many bytes that workers share: Parquet
    by row groups, plain JSONL by lines, plain text by paragraphs (0: never cut)."""

    def __post_init__(self) -> None:
        if self.split_bytes < 0:
            raise ConfigError("input.split_bytes must be >= 0 (0: never cut a file)")


@dataclass
class PackingConfig:
    """Sentence blocks and the held-out split (an existing output refuses changes to these)."""

    sentences_per_block: int = field(default=32, metadata=cli("-S", "--sentences-per-block"))
    """S: sentences per block (only the last block of a shard may hold fewer)."""
    max_sentence_tokens: int = field(default=64, metadata=cli("-M", "--max-sentence-tokens"))
    """M: a longer sentence is split into pieces of at most M tokens, each ending with EOS-S."""
    heldout_fraction: float = field(default=0.01, metadata=cli("--heldout-fraction"))
    """Fraction of documents (by seeded hash of the document id) held out for evaluation."""
    seed: int = field(default=0, metadata=cli("--seed"))
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
class DedupConfig:
    """Which documents count as copies of one already in the output (an existing output refuses
    changes to these: its index was built with them).

    ``exact`` (the default) skips a document whose normalised text (``pipeline.text.normalise``)
    is already in the output, from any night, file or worker. ``near`` also skips near-copies:
    MinHash over word n-grams with LSH banding, datatrove's setup (5-grams, 14 bands of 8
    hashes), which flags a pair with probability 1 - (1 - J^8)^14 for Jaccard similarity J:
    0.5 at J = 0.72, 0.92 at J = 0.8, 0.05 at J = 0.5 (tests/test_dedup.py plants both sides).
    Near is off by default because what is a copy depends on the corpus: two editions of a
    book, or a licence repeated in every file, are near-copies that a team may want to keep;
    exact copies never carry anything new.
    """

    mode: DedupMode = field(default="exact", metadata=cli("--dedup"))
    """none, exact (normalised text seen before), or near (exact plus MinHash near-copies)."""
    ngram: int = 5
    """Words per shingle of the near-duplicate MinHash."""
    bands: int = 14
    """LSH bands: a document sharing any band's hash with an earlier one is a near-copy."""
    rows: int = 8
    """MinHash values per band (bands x rows permutations in all)."""
    seed: int = 1
    """Seed of the MinHash permutations."""
    index_buckets: int = 64
    """The fingerprint index is cut into this many key ranges (a power of two); a night reads
    only the row groups of the ranges its own fingerprints fall in."""
    index_max_files: int = 8
    """A key range holding more index files than this (each run adds one) is merged into one
    by the run that adds to it, so that a night's reads stay a footer per file, not per night."""

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ConfigError("dedup.ngram, dedup.bands and dedup.rows must be >= 1")
        if self.index_max_files < 1:
            raise ConfigError("dedup.index_max_files must be >= 1")
        b = self.index_buckets
        if b < 1 or b > 4096 or b & (b - 1):
            raise ConfigError("dedup.index_buckets must be a power of two from 1 to 4096")

    def identity(self) -> dict[str, Any]:
        """What decides which documents are copies (the bucket count only lays out the index)."""
        out: dict[str, Any] = {"mode": self.mode, "index_buckets": self.index_buckets}
        if self.mode == "near":
            out.update(ngram=self.ngram, bands=self.bands, rows=self.rows, seed=self.seed)
        return out


@dataclass
class PreprocessConfig:
    """Raw corpora -> packed sentence blocks + manifest (``gpthf preprocess``)."""

    input: InputConfig = field(default_factory=InputConfig)
    output: str = ""
    """Output location (local path or fsspec URL); holds train/, heldout/ and manifest.json."""
    tokenizer: str = ""
    """Path or URL of a tokenizers JSON file (missing special tokens are added)."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    strict: bool = False
    """Make every skipped record fatal instead of counted."""
    workers: int = 0
    """Concurrent processing tasks (0: one per available CPU)."""
    cpus_per_worker: float = field(default=1.0, metadata=cli("--cpus-per-worker"))
    """Logical CPUs each processing task reserves in Ray."""
    on_changed: OnChanged = field(default="error", metadata=cli("--on-changed"))
    """An input whose size/etag changed since it was processed: error, or replace its shards."""
    plot: bool = True
    """Write stats.png next to stats.json."""
    local_below_bytes: int = field(default=8 << 20, metadata=cli("--local-below-bytes"))
    """New input smaller than this is processed in this process, without starting Ray (which
    alone takes about 5 s), when no cluster is named (RAY_ADDRESS) and Ray is not running here
    already; 0: always on Ray."""

    def __post_init__(self) -> None:
        if self.local_below_bytes < 0:
            raise ConfigError("local_below_bytes must be >= 0 (0: always on Ray)")
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
        out: dict[str, Any] = {
            "sentences_per_block": p.sentences_per_block,
            "max_sentence_tokens": p.max_sentence_tokens,
            "heldout_fraction": p.heldout_fraction,
            "seed": p.seed,
        }
        if self.dedup.mode != "none":
            # (Absent for none, so that outputs written before deduplication existed match.)
            out["dedup"] = self.dedup.identity()
        return out


def config_hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_preprocess_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> PreprocessConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``packing.seed``; None = unset)."""
    return load_config(PreprocessConfig, path, overrides)
