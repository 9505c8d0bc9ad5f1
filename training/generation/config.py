"""Typed generation configuration (``gpthf generate``): flags and YAML only override it.

``pipeline.settings`` generates the flags from these fields and docstrings. Imports neither
torch nor ray, so the CLI can build its parser without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import StorageConfig
from pipeline.settings import ConfigError, cli


class GenerateConfigError(ConfigError):
    """A generation option the decoder cannot honour."""


Mode = Literal["kv", "sentence-cache", "full"]
PruneRule = Literal["step", "soft"]
"""The values of ``training.model.pruning.PRUNE_RULES``."""
"""The modes of ``training.generation.decode.MODES`` (the GPT has kv and full only)."""


@dataclass(frozen=True)
class GenerateConfig:
    """Text generation from a trained export with GPTHF's caches (``gpthf generate``)."""

    checkpoint: str
    """An export folder (RUN/export of `gpthf train`, or the run folder), local or s3://."""
    prompts: list[str] = field(metadata=cli("--prompt"))
    """Prompt text; several prompts are generated as one batch."""
    max_new_tokens: int = field(default=64, metadata=cli("--max-new-tokens"))
    """New tokens per prompt at most (a row also stops at end-of-document)."""
    mode: Mode = "kv"
    """kv (exact encoder + sentence-end KV caches), sentence-cache (the paper's) or full (the reference); the GPT has kv and full."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_k: int = field(default=0, metadata=cli("--top-k"))
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = field(default=1.0, metadata=cli("--top-p"))
    """Nucleus sampling: the smallest set of tokens with this much probability (1: all)."""
    seed: int = 0
    """Seed of the sampling generator."""
    gpu: bool = False
    """Generate on the GPU (cuda)."""
    prune_rule: PruneRule = field(default="step", metadata=cli("--prune-rule"))
    """A model fine-tuned with --prune: how its gates decide. step (the paper's inference rule: keep an interaction iff its gate logit is > 0, evict exactly there) or soft (the gate at the final alpha it was trained towards, evicting only at keep 0)."""
    show_pruning: bool = field(default=False, metadata=cli("--show-pruning"))
    """Print, for each prompt and its continuation, which sentences (GPTHF) or tokens (GPT) each pruned layer dropped and when (a model fine-tuned with --prune)."""
    pruning_html: str = field(default="", metadata=cli("--pruning-html"))
    """With --show-pruning: also write the same as an HTML page to this local path."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/credentials (default: the AWS_* variables)."""

    def __post_init__(self) -> None:
        # What the decoder requires, refused here with the option's name (and the CLI's exit
        # code) instead of a ValueError from deep inside sampling.
        if not self.prompts:
            raise GenerateConfigError("give at least one --prompt")
        if self.max_new_tokens < 1:
            raise GenerateConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise GenerateConfigError(
                f"temperature must be >= 0 (0: greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise GenerateConfigError(f"top_k must be >= 0 (0: all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateConfigError(f"top_p must be in (0, 1] (1: all tokens), got {self.top_p}")
