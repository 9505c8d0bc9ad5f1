"""The study's grid as training runs, checked against the data before any run starts.

Every (model, seed) becomes one ``TrainConfig``: the same data, data order, batch, schedule and
step count for all (the token budget over the manifest's mean block sets the steps); only the
model, its initialisation seed and (where the config says so) its learning rate differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.manifest import Manifest
from training.model import ModelConfig
from training.study.config import StudyConfig, StudyConfigError, StudyModel
from training.train.config import TrainConfig, TrainConfigError, load_train_config


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the study."""

    model: StudyModel
    seed: int
    folder: str
    """The run's output folder (OUTPUT/runs/<model>-s<seed>)."""
    train: TrainConfig
    model_config: ModelConfig

    @property
    def name(self) -> str:
        return f"{self.model.name}-s{self.seed}"


@dataclass(frozen=True)
class Roles:
    """Which models of the grid the paper's comparisons pair up."""

    equal_gpt: dict[str, str]
    """GPTHF model -> the GPT of its size (d_model, heads, layers, ffn)."""
    shallow_gpt: dict[str, str | None]
    """GPTHF model -> a GPT with fewer layers (the paper's 24 -> 12), if the grid has one."""


@dataclass(frozen=True)
class StudyPlan:
    runs: list[PlannedRun]
    roles: Roles
    steps: int
    tokens_per_step: float
    """Mean tokens per optimizer step (rows x workers x mean block tokens of the train split)."""
    mean_block_tokens: float
    block_tokens: list[int]
    """Tokens of a sample of the training blocks (up to BLOCK_SAMPLE, from the first shards):
    positions beyond a block's length are never trained, so the report says how many blocks
    reach each generation context."""


def _shape(c: ModelConfig) -> tuple[int, int, int]:
    return c.d_model, c.n_heads, c.ffn_dim


def find_roles(configs: dict[str, ModelConfig]) -> Roles:
    """Pair every GPTHF with its equal-size GPT (refused if the grid has none) and with the
    deepest GPT of its width that has fewer layers (optional)."""
    gpts = {n: c for n, c in configs.items() if c.arch == "gpt"}
    hfs = {n: c for n, c in configs.items() if c.arch == "gpthf"}
    if not hfs:
        raise StudyConfigError(
            f"the grid {sorted(configs)} has no GPTHF model: a study compares GPTHF with its "
            "GPT baseline (add e.g. {name: gpthf-tiny, preset: gpthf-tiny})"
        )
    equal: dict[str, str] = {}
    shallow: dict[str, str | None] = {}
    for name, c in hfs.items():
        same = [n for n, g in gpts.items() if _shape(g) == _shape(c) and g.n_layers == c.n_layers]
        if not same:
            raise StudyConfigError(
                f"model {name!r} ({c.n_layers} layers, d_model {c.d_model}) has no baseline: "
                "the grid needs a GPT of the same d_model, heads, ffn and layers (gpthf-tiny "
                "pairs with gpt-tiny, gpthf-8-4 with gpt-12, gpthf-16-8 with gpt-24)"
            )
        equal[name] = same[0]
        # A GPT of fewer layers, its own width first (the paper's GPT-12 for GPT-24 is
        # narrower too), the deepest of those.
        fewer = [
            (_shape(g) == _shape(c), g.n_layers, n)
            for n, g in gpts.items()
            if g.n_layers < c.n_layers
        ]
        shallow[name] = max(fewer)[2] if fewer else None
    return Roles(equal, shallow)


def _train_config(
    cfg: StudyConfig, data_uri: str, m: StudyModel, seed: int, steps: int, folder: str
) -> TrainConfig:
    t = cfg.train
    overrides: dict[str, Any] = {
        "data.uri": data_uri,
        "data.shuffle_seed": t.shuffle_seed,
        "model.preset": m.preset,
        "model.overrides": dict(m.overrides),
        "optim.lr": m.lr if m.lr is not None else t.lr,
        "optim.min_lr_ratio": t.min_lr_ratio,
        "optim.warmup_steps": min(t.warmup_steps, steps),
        "optim.total_steps": steps,
        "deepspeed.micro_batch_rows": t.micro_batch_rows,
        "deepspeed.grad_accum": t.grad_accum,
        "deepspeed.zero_stage": t.zero_stage,
        "run.output": folder,
        "run.workers": t.workers,
        "run.gpu": cfg.gpu,
        "run.seed": seed,
        "run.resume": True,  # a re-run continues each run (or finds it complete)
        "run.eval_every": t.eval_every,
        "run.eval_rows": t.eval_rows,
        "run.checkpoint_every": t.checkpoint_every,
        "run.log_every": 1,  # the wall-clock curve sums every step's time
        **t.extra,
    }
    try:
        return load_train_config(None, {**overrides, "storage": cfg.storage})
    except TrainConfigError as exc:
        raise StudyConfigError(f"model {m.name!r}: {exc}") from exc


def plan_study(cfg: StudyConfig, data_uri: str, manifest: Manifest) -> StudyPlan:
    """The runs of the study, or a StudyConfigError before anything trains."""
    from training.train.driver import model_config_for

    rows = sum(s.rows for s in manifest.shards("train"))
    tokens = sum(s.tokens for s in manifest.shards("train"))
    if not rows:
        raise StudyConfigError(f"{data_uri} has no training blocks")
    mean_block = tokens / rows
    block_tokens = _block_lengths(data_uri, manifest, cfg.storage)
    per_step = cfg.train.micro_batch_rows * cfg.train.grad_accum * cfg.train.workers * mean_block
    if cfg.budget_tokens < per_step:
        raise StudyConfigError(
            f"budget_tokens {cfg.budget_tokens:,} is under one step ({per_step:,.0f} tokens: "
            f"{cfg.train.micro_batch_rows} rows x {cfg.train.grad_accum} accumulation x "
            f"{cfg.train.workers} workers x {mean_block:.0f} tokens per block): raise the budget"
        )
    steps = math.ceil(cfg.budget_tokens / per_step)
    runs: list[PlannedRun] = []
    configs: dict[str, ModelConfig] = {}
    folder = cfg.output.rstrip("/")
    for m in cfg.models:
        for seed in cfg.seeds:
            run_folder = f"{folder}/runs/{m.name}-s{seed}"
            train = _train_config(cfg, data_uri, m, seed, steps, run_folder)
            try:
                mc = model_config_for(train, manifest)
            except TrainConfigError as exc:
                raise StudyConfigError(f"model {m.name!r} does not fit {data_uri}: {exc}") from exc
            configs[m.name] = mc
            runs.append(PlannedRun(m, seed, run_folder, train, mc))
    return StudyPlan(
        runs=runs,
        roles=find_roles(configs),
        steps=steps,
        tokens_per_step=per_step,
        mean_block_tokens=mean_block,
        block_tokens=block_tokens,
    )


BLOCK_SAMPLE = 20_000


def _block_lengths(data_uri: str, manifest: Manifest, storage: Any) -> list[int]:
    """Tokens of up to BLOCK_SAMPLE training blocks, from the first shards (a data set of
    billions of tokens is not read whole for one histogram)."""
    import pyarrow.parquet as pq

    from pipeline.storage import filesystem_for

    out: list[int] = []
    for uri in manifest.shard_uris(data_uri, "train"):
        fs, path = filesystem_for(uri, storage)
        with fs.open(path, "rb") as f:
            col = pq.read_table(f, columns=["input_ids"]).column("input_ids")
        out += [len(x) for x in col.to_pylist()]
        if len(out) >= BLOCK_SAMPLE:
            break
    return out[:BLOCK_SAMPLE]
