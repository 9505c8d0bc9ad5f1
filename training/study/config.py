"""Typed study configuration (``gpthf study``): YAML files and flags only override it.

A study trains a grid of models (presets plus overrides) x seeds on one data set with one token
budget and one schedule, evaluates every export on the held-out split, measures generation of
the trained models, and writes one report. Imports neither torch nor ray (the CLI builds its
parser from these fields).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import StorageConfig
from pipeline.settings import ConfigError, cli, load_config

PRESETS_DIR = Path(__file__).with_name("presets")
"""The shipped study presets (``--preset cpu`` is ``PRESETS_DIR/cpu.yaml``)."""


class StudyConfigError(ConfigError):
    """A study config is invalid; the message names the setting and the fix."""


@dataclass
class StudyData:
    """The data every run trains on and is scored on."""

    uri: str = field(default="", metadata=cli("--data"))
    """A `gpthf preprocess` output (its manifest.json); empty with sample_corpus: prepared in OUTPUT/data."""
    sample_corpus: bool = False
    """Prepare the data from the sample corpus (`gpthf sample-corpus`) in OUTPUT/data: a tokenizer of vocab_size, then preprocessing with the packing below. Done once; a re-run reuses it."""
    vocab_size: int = 4096
    """sample_corpus: the tokenizer's vocabulary."""
    sentences_per_block: int = 64
    """sample_corpus: S, sentences per block. Positions restart at every block, so S fixes the longest context the models see in training."""
    heldout_fraction: float = 0.05
    """sample_corpus: fraction of documents held out (the evaluation and the generation prompts come from them)."""


@dataclass
class StudyModel:
    """One model of the grid."""

    name: str
    """Its name in the report and its run folders (letters, digits, '-', '_', '.')."""
    preset: str
    """A model preset (gpthf-tiny, gpt-tiny, gpthf-8-4, gpt-12, gpthf-16-8, gpt-24)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change (e.g. {"n_layers": 3} for a shallower GPT)."""
    lr: float | None = None
    """Peak learning rate of this model's runs; none: the study's train.lr (a study that sets it per model says so in its report)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name or ""):
            raise StudyConfigError(
                f"models: name {self.name!r} must be letters, digits, '-', '_' or '.' (it names "
                "the run folders)"
            )


@dataclass
class StudyTrain:
    """The batch and schedule shared by every run (the token budget sets the steps)."""

    lr: float = 2e-3
    """Peak learning rate (every model, unless the model sets its own)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x this."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    micro_batch_rows: int = 2
    """Blocks per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    workers: int = 1
    """Data-parallel workers of each run."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage."""
    shuffle_seed: int = 0
    """Data order seed: the same for every run (seeds vary the initialisation only)."""
    eval_every: int = 50
    """Steps between held-out validations (the loss curves)."""
    eval_rows: int = 64
    """Held-out blocks each validation scores."""
    parallel_runs: int = 0
    """Runs trained at once on Ray: 0 = as many as the cluster holds (each run's workers plus
    one CPU for the data tasks that feed them; on --gpu, one GPU per worker too); 1 = one after
    another. --local trains one at a time."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a killed study resumes each run from its last one)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further `gpthf train` settings by dotted key (e.g. {"run.compile": true}); not the model, data, seed, output or schedule (those are the study's)."""

    def __post_init__(self) -> None:
        owned = ("data.", "model.", "optim.", "run.seed", "run.output", "run.name")
        clash = [k for k in self.extra if k.startswith(owned)]
        if clash:
            raise StudyConfigError(
                f"train.extra sets {clash}: the data, model, schedule, seed and output are the "
                "study's own settings (data, models, seeds, budget_tokens, train.*)"
            )
        if self.parallel_runs < 0:
            raise StudyConfigError(
                "train.parallel_runs must be 0 (as many as the cluster holds) or a count"
            )


@dataclass
class StudyGeneration:
    """How generation of the trained models is measured."""

    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    """Prompt lengths in tokens: whole sentences cut from held-out documents, up to this many."""
    prompts: int = 4
    """Prompts per context (one batch), from different places of the held-out documents."""
    new_tokens: int = 128
    """New tokens per prompt for the text statistics and samples (seeded sampling, kv mode)."""
    speed_tokens: int = 32
    """New tokens per prompt in each timed run (every mode the same prompts and count)."""
    repeats: int = 3
    """Timed runs per mode and context (modes interleaved, after one untimed warm-up each)."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    top_k: int = 40
    """Sample from the k most likely tokens (0: all)."""
    seed: int = 0
    """Seed of the prompt choice and of the sampling."""
    samples: int = 2
    """Continuations shown in the report per model (shortest context)."""

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 8:
            raise StudyConfigError("generation.contexts: give at least one length >= 8 tokens")
        for name in ("prompts", "new_tokens", "speed_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise StudyConfigError(f"generation.{name} must be >= 1")
        if self.temperature < 0 or self.top_k < 0:
            raise StudyConfigError("generation: need temperature >= 0 and top_k >= 0")


@dataclass
class StudyConfig:
    """GPTHF against the GPT as the paper compares them: train a grid, evaluate, generate, report (``gpthf study``)."""

    output: str = field(default="", metadata=cli("--output"))
    """Study folder (local or s3://): data/ (sample_corpus), runs/<model>-s<seed>/, eval/, generation/, study.{md,json,png}."""
    models: list[StudyModel] = field(default_factory=list)
    """The grid: every GPTHF needs a GPT of its size (d_model, heads, layers, ffn) in it; a GPT of its width with fewer layers is the paper's shallower GPT. A flag takes one model as JSON."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Initialisation seeds: every model is trained once per seed."""
    budget_tokens: int = field(default=1_500_000, metadata=cli("--budget-tokens"))
    """Training tokens of every run: steps = ceil(budget / tokens per step), tokens per step from the manifest's mean block."""
    data: StudyData = field(default_factory=StudyData)
    train: StudyTrain = field(default_factory=StudyTrain)
    generation: StudyGeneration = field(default_factory=StudyGeneration)
    local: bool = field(default=False, metadata=cli("--local"))
    """Without Ray: train with training.train.local and score in this process (a machine with torch but no Ray)."""
    gpu: bool = field(default=False, metadata=cli("--gpu"))
    """Train, score and generate on GPU."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/credentials (default: the AWS_* variables)."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StudyConfigError(f"models: names {dup} appear twice; give each model its own")
        if len(set(self.seeds)) != len(self.seeds):
            raise StudyConfigError(f"seeds {self.seeds} repeat a seed")
        if self.budget_tokens < 1:
            raise StudyConfigError("budget_tokens must be >= 1")
        if self.data.uri and self.data.sample_corpus:
            raise StudyConfigError(
                "data.uri and data.sample_corpus both set: give a preprocessed data set or "
                "let the study prepare the sample corpus, not both"
            )

    def validate_for_run(self) -> None:
        if not self.output:
            raise StudyConfigError("--output is required (the study folder)")
        if not (self.data.uri or self.data.sample_corpus):
            raise StudyConfigError(
                "no data: give --data (a `gpthf preprocess` output) or data.sample_corpus: true"
            )
        if not self.models:
            raise StudyConfigError("no models: the grid (models) is empty")
        if not self.seeds:
            raise StudyConfigError("no seeds: give at least one")

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if redact:
            out["storage"] = self.storage.redacted()
        return out

    def generation_hash(self) -> str:
        """What a run's generation measurement depends on (besides the export)."""
        g = json.dumps(dataclasses.asdict(self.generation), sort_keys=True)
        return hashlib.sha256(f"{g}|{self.gpu}".encode()).hexdigest()[:16]


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset, or a clear error listing them."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise StudyConfigError(f"no study preset {name!r}; shipped presets: {known}")
    return path


def load_study_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> StudyConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``generation.prompts``)."""
    return load_config(StudyConfig, path, overrides, error=StudyConfigError)
