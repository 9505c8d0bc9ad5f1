"""Typed evaluation configuration (``gpthf eval``): YAML files and flags only override it.

``pipeline.settings`` reads both and generates the flags from these fields and docstrings.
Imports neither torch nor ray, so the CLI can build its parser without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import StorageConfig
from pipeline.settings import ConfigError, cli, load_config

Batching = Literal["prepack", "pad"]
PruneRule = Literal["step", "soft"]
"""The values of ``training.model.pruning.PRUNE_RULES`` (tests/test_pruning_eval.py checks)."""
Verify = Literal["sha256", "exists"]
"""The values of ``training.eval.scoring.BATCHINGS`` (tests/test_cli.py checks they agree)."""


class EvalConfigError(ConfigError):
    """An evaluation config value is invalid; the message names it."""


@dataclass(frozen=True)
class EvalConfig:
    """Batch perplexity evaluation of exports over a split's shards (``gpthf eval``)."""

    checkpoints: list[str] = field(metadata=cli("--checkpoint"))
    """Export folders (OUT/export of a training run, or the run folder), local or s3://; several are compared."""
    data: str
    """A `gpthf preprocess` output (its manifest is read)."""
    output: str
    """Folder for report.json, report.md and report.png."""
    split: str = "heldout"
    """Split of the manifest to score."""
    local: bool = False
    """Score in this process without Ray (shards read with pyarrow, one model at a time): for a machine without Ray, e.g. one GPU; same numbers as the Ray job. No actor pool, so --actors stays 1."""
    actors: int = 1
    """Size of the scoring actor pool (one model per actor; with --local: refused above 1)."""
    threads: int = 0
    """Torch CPU threads per scoring actor (0: the node's cores shared among the actors; Ray would give each actor one). With --local, of this process (0: all its cores)."""
    gpu: bool = False
    """One GPU per actor (with --local: this process's GPU, or its CPU where CUDA is unavailable)."""
    batching: Batching = "prepack"
    """prepack (first-fit decreasing into token-budget rows, per-block masks) or pad (one block a row); same numbers."""
    token_budget: int = field(default=1024, metadata=cli("--token-budget"))
    """Prepack: tokens per packed row."""
    batch_rows: int = field(default=64, metadata=cli("--batch-rows"))
    """Blocks per actor call (one forward)."""
    pruning: bool = False
    """Score pruning exports with their gates on, and report the kept fraction and cache size beside the perplexity (refused for an export without gates); off: a pruning export scores as its model without the gates."""
    prune_rule: PruneRule = field(default="step", metadata=cli("--prune-rule"))
    """With --pruning: how the gates decide. step (the paper's inference rule: keep an interaction iff its gate logit is > 0, keeps 0 or 1) or soft (the gate at the final alpha the model was trained towards, keeps fractional); the report names the rule its perplexity is under."""
    verify: Verify = "sha256"
    """Before scoring: the tokenizer's sha256 always, every shard of the split present, and with "sha256" every shard hashed against the manifest ("exists": no hashing, for a split too large to read twice)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/credentials (default: the AWS_* variables)."""

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise EvalConfigError("give at least one --checkpoint (an export folder)")
        if self.threads < 0:
            raise EvalConfigError(f"threads must be >= 0 (0: automatic), got {self.threads}")
        for name in ("actors", "token_budget", "batch_rows"):
            if getattr(self, name) < 1:
                raise EvalConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local and self.actors > 1:
            raise EvalConfigError(
                f"--local scores in this process, one model at a time: --actors {self.actors} "
                "does not apply; leave out --actors, or drop --local for a Ray actor pool"
            )


def load_eval_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> EvalConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``storage.endpoint_url``)."""
    return load_config(EvalConfig, path, overrides, error=EvalConfigError)
