"""Evaluation without Ray (``gpthf eval --local``): one checkpoint at a time, in this process.

For a machine that has torch but no Ray, e.g. one GPU. Each shard of the split is read with
pyarrow in batches of ``batch_rows`` blocks and scored with the Ray job's own pieces
(``scoring_model``, ``score_batch``, ``checkpoint_score`` of ``training.eval.job``), so the
per-shard sums, the count checks against the manifest and the report are the Ray job's.
Nothing here imports ray.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from pipeline.manifest import Manifest, ShardRef
from training.data.shards import shard_batches
from training.eval.checkpoint_score import (
    BLOCK_FIELDS,
    EvalError,
    checkpoint_score,
    score_batch,
    scoring_model,
)
from training.eval.config import EvalConfig
from training.eval.report import CheckpointScore
from training.eval.scoring import Sums, sums_of
from training.export import Exported


def score_checkpoint_local(
    cfg: EvalConfig, exp: Exported, uri: str, manifest: Manifest, refs: list[ShardRef]
) -> CheckpointScore:
    """Score the export at ``uri`` (``exp``, as ``run_eval`` checked it) on every shard of
    ``refs``, summed per shard; the same ``CheckpointScore`` as the Ray job's."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    try:
        start = time.perf_counter()
        model, device = scoring_model(uri, cfg.storage, cfg.gpu, cfg.pruning, cfg.prune_rule)
        if cfg.gpu and device != "cuda":
            print("[eval] --gpu: CUDA is not available here, scoring on the CPU", flush=True)
        kw = dict(
            pad_id=manifest.pad_id,
            eos_id=manifest.eos_id,
            batching=cfg.batching,
            token_budget=cfg.token_budget,
        )
        shards = manifest.shard_uris(cfg.data, cfg.split)
        per_shard: dict[str, Sums] = {}
        for ref, shard in zip(refs, shards, strict=True):
            try:
                parts = [
                    score_batch(model, batch, device, kw, [ref.path])
                    for batch in shard_batches(shard, cfg.storage, cfg.batch_rows)
                ]
            except EvalError as exc:
                raise EvalError(
                    f"evaluating {uri} on {cfg.data} ({cfg.split}) failed: {exc}"
                ) from exc
            except Exception as exc:  # a read failed: pyarrow's message may not name the file
                raise EvalError(
                    f"evaluating {uri} on {cfg.data} ({cfg.split}) failed: reading {ref.path}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            # One sum over the shard's blocks in file order, as the Ray job sums its rows.
            per_shard[ref.path] = (
                sums_of({k: np.concatenate([p[k] for p in parts]) for k in BLOCK_FIELDS})
                if parts
                else Sums()
            )
        del model
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    return checkpoint_score(cfg, exp, uri, manifest, refs, per_shard, wall)
