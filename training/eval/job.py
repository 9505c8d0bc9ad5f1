"""Batch evaluation of exported checkpoints over a split's shards with Ray Data, or without Ray.

``run_eval`` checks everything it can before the cluster spends time (manifest, shards present,
checkpoints readable, tokenizer and special ids matching the shards), then for each checkpoint
maps a callable-class actor pool (``_Scorer``: the model is loaded once per actor) over the
shards, sums per shard, checks the row and token counts against the manifest, and writes
``report.json`` (last), ``report.md`` and ``report.png`` under the output.

With ``local`` (``gpthf eval --local``) ``training.eval.local`` scores in this process instead,
for a machine without Ray (one GPU, say): each shard read with pyarrow, one model at a time,
the same scoring, sums, count checks and report. Nothing on that path imports ray (this module
imports it only inside the Ray path's functions).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pipeline.blocks import SCORING_COLUMNS
from pipeline.manifest import Manifest, ManifestError, ShardRef
from training.data.shards import read_shards
from training.eval.checkpoint_score import (
    BLOCK_FIELDS,
    EvalError,
    checkpoint_score,
    score_batch,
    scoring_model,
)
from training.eval.config import EvalConfig, PruneRule
from training.eval.report import CheckpointScore, EvalReport
from training.eval.scoring import Sums, sums_of
from training.export import Exported, ExportError, load_export

"""The per-block arrays a scored batch returns (``score_batch``), summed per shard."""


class _Scorer:
    """Ray Data callable class: one model per actor, per-block sums per batch."""

    def __init__(
        self,
        checkpoint: str,
        storage: Any,
        gpu: bool,
        pad_id: int,
        eos_id: int,
        batching: str,
        token_budget: int,
        threads: int,
        actors: int,
        pruning: bool = False,
        prune_rule: PruneRule = "step",
    ) -> None:
        import torch

        # Ray starts actors with OMP_NUM_THREADS=1, so torch would score on one core however
        # many the node has. OpenMP's thread count is per calling thread and Ray Data calls
        # the UDF from another thread than this constructor, so ``__call__`` sets it again.
        self.threads = threads or max(1, len(os.sched_getaffinity(0)) // actors)
        torch.set_num_threads(self.threads)
        self.model, self.device = scoring_model(checkpoint, storage, gpu, pruning, prune_rule)
        self.kw = dict(pad_id=pad_id, eos_id=eos_id, batching=batching, token_budget=token_budget)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        paths = batch.column("path").to_pylist()
        scored = score_batch(self.model, batch, self.device, self.kw, paths)
        return {"path": np.asarray(paths, dtype=object), **scored}


def _check_inputs(cfg: EvalConfig) -> tuple[Manifest, list[ShardRef], list[Exported]]:
    manifest = Manifest.require(cfg.data, cfg.storage)
    refs = manifest.shards(cfg.split)
    if not refs:
        raise EvalError(f"split {cfg.split!r} of {cfg.data} has no shards")
    try:  # the tokenizer, and every shard of the split present (and intact, with sha256)
        check = manifest.verify_data(cfg.data, [cfg.split], cfg.storage, cfg.verify)
    except ManifestError as exc:
        raise EvalError(str(exc)) from exc
    print(f"[eval] {check.describe()}", flush=True)
    sha = manifest.tokenizer.sha256
    special = manifest.special_ids
    exports = []
    for uri in cfg.checkpoints:
        try:
            exp = load_export(uri, cfg.storage)
        except ExportError as exc:
            raise EvalError(f"unreadable checkpoint: {exc}") from exc
        except Exception as exc:  # e.g. safetensors' own error type for a corrupt file
            raise EvalError(
                f"unreadable checkpoint: {uri} ({type(exc).__name__}: {exc}); point --checkpoint "
                "at an intact OUT/export folder"
            ) from exc
        theirs = exp.config.tokenizer_sha256
        if theirs != sha:
            raise EvalError(
                f"{uri} was trained with tokenizer {str(theirs)[:12]}... but the shards of "
                f"{cfg.data} use {sha[:12]}...: evaluate it on data preprocessed with its own "
                f"tokenizer ({uri.rstrip('/')}/tokenizer.json)"
            )
        mc = exp.model_config
        if cfg.pruning and not mc.prune:
            raise EvalError(
                f"--pruning: {uri} has no pruning gates (its model was trained without "
                "--prune); score it without --pruning, or fine-tune it with --prune first"
            )
        ids = {"end_of_sentence": mc.eos_id, "pad": mc.pad_id, "end_of_document": mc.eod_id}
        wrong = {k: (v, special.get(k)) for k, v in ids.items() if special.get(k) != v}
        if wrong:
            raise EvalError(f"{uri}: special token ids (model, data) differ: {wrong}")
        exports.append(exp)
    return manifest, refs, exports


def _evaluate_one(
    cfg: EvalConfig,
    exp: Exported,
    uri: str,
    manifest: Manifest,
    refs: list[ShardRef],
    progress: bool,
) -> CheckpointScore:
    import ray.data

    ds = read_shards(
        manifest.shard_uris(cfg.data, cfg.split),
        cfg.storage,
        columns=list(SCORING_COLUMNS),
        include_paths=True,
    )
    scored = ds.map_batches(
        _Scorer,
        fn_constructor_kwargs=dict(
            checkpoint=uri,
            storage=cfg.storage,
            gpu=cfg.gpu,
            pad_id=manifest.pad_id,
            eos_id=manifest.eos_id,
            batching=cfg.batching,
            token_budget=cfg.token_budget,
            threads=cfg.threads,
            actors=cfg.actors,
            pruning=cfg.pruning,
            prune_rule=cfg.prune_rule,
        ),
        batch_size=cfg.batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=1 if cfg.gpu else 0,
    )
    # Off in a log (no TTY): Ray Data would print a multi-line progress block every 10 s.
    scored.context.enable_progress_bars = progress
    start = time.perf_counter()
    try:
        out = scored.to_pandas()
    except Exception as exc:  # a read or scoring task failed: its message names the shard
        raise EvalError(f"evaluating {uri} on {cfg.data} ({cfg.split}) failed: {exc}") from exc
    wall = time.perf_counter() - start

    per_shard: dict[str, Sums] = {r.path: Sums() for r in refs}
    unknown = []
    for path, group in out.groupby("path", sort=False):
        match = [r.path for r in refs if str(path).endswith(r.path)]
        if len(match) != 1:
            unknown.append(path)
            continue
        per_shard[match[0]] += sums_of({k: group[k].to_numpy() for k in BLOCK_FIELDS})
    if unknown:
        raise EvalError(f"rows from files not in the manifest: {unknown}")
    return checkpoint_score(cfg, exp, uri, manifest, refs, per_shard, wall)


def run_eval(cfg: EvalConfig, *, progress: bool = False) -> EvalReport:
    """Evaluate every checkpoint; write and return the report."""
    manifest, refs, exports = _check_inputs(cfg)
    started = time.perf_counter()
    if cfg.local:  # no Ray
        from training.eval.local import score_checkpoint_local

        scores = tuple(
            score_checkpoint_local(cfg, exp, uri, manifest, refs)
            for uri, exp in zip(cfg.checkpoints, exports, strict=True)
        )
    else:
        scores = tuple(
            _evaluate_one(cfg, exp, uri, manifest, refs, progress)
            for uri, exp in zip(cfg.checkpoints, exports, strict=True)
        )
    report = EvalReport(
        data=cfg.data,
        split=cfg.split,
        manifest_version=manifest.version,
        tokenizer_sha256=manifest.tokenizer.sha256,
        batching=cfg.batching,
        token_budget=cfg.token_budget if cfg.batching == "prepack" else None,
        actors=cfg.actors,
        gpu=cfg.gpu,
        wall_s=time.perf_counter() - started,
        checkpoints=scores,
    )
    report.write(cfg.output, cfg.storage)
    return report
