"""Typed training configuration: the single source of truth (YAML and flags only override it;
``pipeline.settings`` reads both and generates the flags from these fields and docstrings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import StorageConfig
from pipeline.settings import ConfigError, build, cli, load_config

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"]
ZeroStage = Literal[0, 1, 2, 3]
VerifyMode = Literal["sha256", "exists"]


class TrainConfigError(ConfigError):
    """A training config or run setup is invalid; the message names the setting and the fix."""


@dataclass
class DataSection:
    """The preprocessed shards and their order."""

    uri: str = field(default="", metadata=cli("--data"))
    """A `gpthf preprocess` output (its manifest.json is read; never a raw listing)."""
    shuffle_seed: int = 0
    """Seed of the epoch shard order and the chunk shuffle; recorded in checkpoints."""
    shuffle_chunk_rows: int = 256
    """Rows shuffled together inside a rank's stream (a resume re-reads at most this many)."""
    pad_to_multiple: int = 8
    """Micro-batch rows are right-padded to a multiple of this many tokens."""
    verify: VerifyMode = "sha256"
    """Before training: the tokenizer's sha256 always, every shard present, and with "sha256"
    every shard hashed against the manifest (about one read of the data; "exists" skips the
    hashing, for a corpus too large to read at every start). Not part of the run's identity."""


@dataclass
class ModelSection:
    """Which model: a preset plus field overrides."""

    preset: str = field(default="gpthf-tiny", metadata=cli("--model"))
    """Model preset: gpthf-tiny, gpt-tiny, gpthf-8-4, gpt-12, gpthf-16-8 or gpt-24 (gpt-* are the GPT baselines)."""
    overrides: dict[str, Any] = field(default_factory=dict, metadata=cli("--model-overrides"))
    """ModelConfig fields to change, as JSON (e.g. '{"d_model": 64}'); not the vocabulary or special ids (those come from the data)."""
    init_from: str = field(default="", metadata=cli("--init-from"))
    """Fine-tune: start from the weights of this export (or training run folder) instead of a random init; it must be the same model (pruning parameters it lacks start at their init)."""


@dataclass
class OptimSection:
    """AdamW and the warmup + cosine schedule."""

    lr: float = field(default=1e-3, metadata=cli("--lr"))
    """Peak learning rate (reached after the warmup)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = field(default=20, metadata=cli("--warmup-steps"))
    """Steps of linear warmup from 0 to lr."""
    total_steps: int = field(default=200, metadata=cli("--total-steps"))
    """Length of the schedule; --max-steps can stop earlier without changing the run."""
    weight_decay: float = 0.1
    """Applied to matrices only (not norms, not embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's beta1 and beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.total_steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise TrainConfigError(
                "optim: need 0 <= warmup_steps <= total_steps and total_steps >= 1"
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError("optim: lr must be > 0 and min_lr_ratio in [0, 1]")


@dataclass
class DeepSpeedSection:
    """DeepSpeed ZeRO, batch shape and precision."""

    zero_stage: ZeroStage = field(default=2, metadata=cli("--zero-stage"))
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters) sharded."""
    micro_batch_rows: int = field(default=8, metadata=cli("--micro-batch"))
    """Blocks per worker per micro-batch."""
    grad_accum: int = field(default=1, metadata=cli("--grad-accum"))
    """Micro-batches accumulated per optimizer step."""
    bf16: bool | None = None
    """DeepSpeed bf16 mixed precision; none: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = field(
        default=False, metadata=cli("--activation-checkpointing")
    )
    """Recompute each block in the backward pass (less memory, same maths)."""

    def __post_init__(self) -> None:
        if self.micro_batch_rows < 1 or self.grad_accum < 1:
            raise TrainConfigError("deepspeed: micro_batch_rows and grad_accum must be >= 1")


@dataclass
class PruningSection:
    """Dynamic Context Pruning: gates trained with an annealed alpha and a sparsity loss."""

    enabled: bool = field(default=False, metadata=cli("--prune"))
    """Give the model pruning gates (GPT: every layer over tokens; GPTHF: body layers over sentence ends)."""
    sparsity: float = field(default=0.0, metadata=cli("--prune-lambda"))
    """lambda: the loss adds lambda x the kept fraction (keep summed over every pruned layer's gated (query, earlier key) pairs, over their number); larger prunes more. The paper's code (sanagno/adaptively_sparse_attention) adds lambda_paper x the mean of the cumulative keep over layers x rows x (T-1) queries x T keys (entries it does not gate count 1, no gradient): on GPT rows of one T-token document (its setting) a kept pair weighs 2 lambda / (L B T (T-1)) here and lambda_paper / (L B T (T-1)) there, so lambda_paper = 2 x lambda (exact but for each row's last query, which its code leaves out: 2/T of the pairs). With documents packed in a row, the pairs are counted within documents (the paper's code prunes across them); GPTHF's pairs are (query, earlier sentence end)."""
    alpha_final: float = field(default=8.0, metadata=cli("--prune-alpha"))
    """alpha at the end of the anneal (and at inference): the gates reach exact 0 and 1 beyond |x| = 1/(alpha - 1)."""
    alpha_delay_steps: int = 0
    """Steps at alpha = 1 before the anneal starts: the sigmoid gates have a gradient everywhere, so the sparsity loss can move them from fully open (their init) into the range where the annealed gate decides; an alpha > 1 gate that is exactly 1 has none."""
    alpha_steps: int | None = None
    """Steps of the cosine anneal of alpha from 1 to alpha_final after the delay; none: the rest of optim.total_steps."""
    lr_scale: float = 1.0
    """The pruning parameters (interaction projections, gate biases) learn at lr x this (Adam: a larger scale moves the gates in fewer steps, and the interaction projections' products grow fast)."""

    def __post_init__(self) -> None:
        if self.sparsity < 0 or self.alpha_final < 1:
            raise TrainConfigError("pruning: need sparsity (lambda) >= 0 and alpha_final >= 1")
        if self.alpha_steps is not None and self.alpha_steps < 1:
            raise TrainConfigError("pruning.alpha_steps must be >= 1")
        if self.alpha_delay_steps < 0 or self.lr_scale <= 0:
            raise TrainConfigError("pruning: need alpha_delay_steps >= 0 and lr_scale > 0")
        if not self.enabled and self.sparsity:
            raise TrainConfigError(
                f"pruning.sparsity (--prune-lambda) is {self.sparsity:g} but pruning is off: pass "
                "--prune to give the model its gates, or drop the lambda"
            )

    def alpha_at(self, step: int, total_steps: int) -> float:
        """alpha for the 0-based ``step``: 1 during the delay, then a cosine from 1 to
        alpha_final over alpha_steps."""
        span = self.alpha_steps or total_steps - self.alpha_delay_steps
        progress = min(1.0, max(0, step - self.alpha_delay_steps) / max(1, span))
        return 1.0 + (self.alpha_final - 1.0) * 0.5 * (1.0 - math.cos(math.pi * progress))


@dataclass
class RunSection:
    """Where the run goes, its workers, checkpoints and validation."""

    output: str = field(default="", metadata=cli("--output"))
    """Run folder (local or s3://): checkpoints, metrics, export."""
    name: str = field(default="train", metadata=cli("--name"))
    """Run name inside the output (Ray Train's folder RUN/ray/<name>)."""
    workers: int = field(default=1, metadata=cli("--workers"))
    """Ray Train workers (data-parallel ranks)."""
    gpu: bool = field(default=False, metadata=cli("--gpu"))
    """One GPU per worker (NCCL, bf16); otherwise CPU workers over gloo."""
    cpus_per_worker: float | None = field(default=None, metadata=cli("--cpus-per-worker"))
    """Logical CPUs each worker reserves; none: 1 on GPU, on CPU as much (up to 1) as leaves 1 of the cluster's CPUs for the data tasks."""
    placement_strategy: PlacementStrategy = field(
        default="PACK", metadata=cli("--placement-strategy")
    )
    """Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD (one per node), STRICT_PACK."""
    max_steps: int | None = field(default=None, metadata=cli("--max-steps"))
    """Stop after this global step (the schedule is unchanged: resume continues the same run)."""
    checkpoint_every: int = field(default=50, metadata=cli("--checkpoint-every"))
    """Steps between checkpoints (one is also written at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted)."""
    eval_every: int = field(default=50, metadata=cli("--eval-every"))
    """Steps between held-out validations."""
    eval_rows: int = 64
    """Held-out blocks scored at each validation (a fixed sample, the same every time)."""
    log_every: int = 1
    """Steps between metric records (console, metrics.jsonl, TensorBoard)."""
    seed: int = field(default=0, metadata=cli("--seed"))
    """Model initialisation seed."""
    resume: bool = field(default=False, metadata=cli("--resume"))
    """Continue from the last checkpoint in the output (otherwise an output with checkpoints is refused)."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from by itself, restarting the worker group from the
    last checkpoint of this run (-1: no limit; 0: the first failure ends the run)."""
    peak_flops_per_worker: float | None = None
    """Peak FLOP/s of one worker's device, for MFU; none: known GPUs only."""
    compile: bool = field(default=False, metadata=cli("--compile"))
    """Compile the model's blocks with torch.compile (dynamic shapes): the norms, projections, MLP and residuals fuse; each attention pattern (the data-dependent routing) stays eager. The first steps pay the compilation; same maths to rounding (not bit-identical to eager); not with ZeRO-3."""
    deterministic: bool = field(default=False, metadata=cli("--deterministic"))
    """Deterministic kernels (torch.use_deterministic_algorithms, warn-only; cuDNN benchmark off; on CUDA CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set): a resumed run repeats an uninterrupted one bit for bit on GPU too. Process-wide while the worker lives (some kernels are slower); closing the worker restores torch's previous settings."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise TrainConfigError("run.workers must be >= 1")
        if self.checkpoint_every < 1 or self.eval_every < 1 or self.log_every < 1:
            raise TrainConfigError("run: checkpoint_every, eval_every, log_every must be >= 1")


@dataclass
class TrainConfig:
    """Training GPTHF or its GPT baseline with Ray Train + DeepSpeed (``gpthf train``)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/credentials (default: the AWS_* variables)."""

    def __post_init__(self) -> None:
        if self.run.compile and self.deepspeed.zero_stage == 3:
            raise TrainConfigError(
                "run.compile (--compile) does not combine with ZeRO-3 (--zero-stage 3): its "
                "parameter-gathering hooks on every layer break the compiled blocks into pieces "
                "and torch.compile gives up on them; use --zero-stage 0, 1 or 2 with --compile, "
                "or drop --compile"
            )

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if redact:
            out["storage"] = self.storage.redacted()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` wrote (a checkpoint's, the workers' copy)."""
        return build(cls, data, error=TrainConfigError)

    def schedule_hash(self) -> str:
        """What must not change between a run and its resume (the run's identity)."""
        data = dataclasses.asdict(self.data)
        data.pop("uri")  # the same data may move
        data.pop("verify")  # how much of it is checked at the start
        ident = {
            "data": data,
            "model": {
                "preset": self.model.preset,
                # The attention backend changes how, not what, the model computes: a run may
                # resume with the other one.
                "overrides": {k: v for k, v in self.model.overrides.items() if k != "attention"},
            },
            "optim": dataclasses.asdict(self.optim),
            "deepspeed": {
                k: v
                for k, v in dataclasses.asdict(self.deepspeed).items()
                if k != "activation_checkpointing"
            },
            "seed": self.run.seed,
            "workers": self.run.workers,
        }
        if self.pruning.enabled:  # runs without pruning keep the hash they had before it existed
            ident["pruning"] = dataclasses.asdict(self.pruning)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def validate_for_run(self) -> None:
        if not self.data.uri:
            raise TrainConfigError("--data is required (a preprocessing output with a manifest)")
        if not self.run.output:
            raise TrainConfigError("--output is required")


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults <- YAML file <- overrides (dotted keys such as ``optim.lr``; None = unset)."""
    return load_config(TrainConfig, path, overrides, error=TrainConfigError)
