"""What both evaluation paths share (the Ray Data job, ``job.py``, and the in-process one,
``local.py``): the model as it scores, one batch's per-block sums, and a checkpoint's score from
its per-shard sums once they match the manifest."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.manifest import Manifest, ShardRef
from training.eval.config import EvalConfig, PruneRule
from training.eval.report import CheckpointScore, ShardScore
from training.eval.scoring import SUM_FIELDS, Sums, block_counts, score_blocks
from training.export import Exported, load_export

BLOCK_FIELDS = (*SUM_FIELDS, "tokens", "sentences", "bytes", "words")
"""The per-block arrays a scored batch carries (summed per shard)."""


class EvalError(UserError):
    pass


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def scoring_model(
    checkpoint: str, storage: Any, gpu: bool, pruning: bool, prune_rule: PruneRule = "step"
) -> tuple[Any, str]:
    """The export's model as it scores, and its device ("cuda" where asked for and available).
    Without ``pruning`` a pruning export scores as its model without the gates; with it, its
    gates decide by ``prune_rule`` (``training.model.pruning.PRUNE_RULES``)."""
    import torch

    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    model = load_export(checkpoint, storage, device=device).model
    model = model.use_prune_rule(prune_rule) if pruning else model.without_pruning()
    model.prune_per_query = pruning  # kept and cached entries per block
    return model, device


def score_batch(
    model: Any, batch: Any, device: str, kw: dict[str, Any], paths: list[str]
) -> dict[str, np.ndarray]:
    """Per-block arrays of one batch (``BLOCK_FIELDS``: the NLL sums and counts); a failure is
    an EvalError naming the shards of ``paths`` the batch came from."""
    try:
        scored = score_blocks(model, batch, device=device, **kw)
        counts = block_counts(batch)
    except Exception as exc:
        raise EvalError(
            f"scoring failed on shard(s) {sorted(set(paths))}: {type(exc).__name__}: {exc}"
        ) from exc
    return {**scored, **counts}


def checkpoint_score(
    cfg: EvalConfig,
    exp: Exported,
    uri: str,
    manifest: Manifest,
    refs: list[ShardRef],
    per_shard: dict[str, Sums],
    wall: float,
) -> CheckpointScore:
    """The score of ``exp`` from its per-shard sums (both paths end here), once each shard's
    rows and tokens and the split's totals match the manifest: none lost, none twice."""
    bad = [
        f"{r.path}: rows {per_shard[r.path].rows}/{r.rows}, tokens {per_shard[r.path].tokens}/{r.tokens}"
        for r in refs
        if (per_shard[r.path].rows, per_shard[r.path].tokens) != (r.rows, r.tokens)
    ]
    if bad:
        raise EvalError(f"scored counts differ from the manifest (scored/manifest): {bad}")
    total = sum(per_shard.values(), Sums())
    split = manifest.totals(cfg.split)
    if (total.rows, total.tokens) != (split["rows"], split["tokens"]):
        raise EvalError(
            f"totals rows {total.rows}, tokens {total.tokens} differ from the manifest's "
            f"{split['rows']}, {split['tokens']} for split {cfg.split!r}"
        )
    return CheckpointScore(
        checkpoint=uri,
        arch=exp.model_config.arch,
        step=exp.config.step,
        model_config_hash=_hash(exp.config.model.to_dict()),
        schedule_hash=exp.config.schedule_hash,
        tokenizer_sha256=exp.config.tokenizer_sha256,
        parameters=exp.model.num_parameters(),
        shards=tuple(ShardScore(p, s) for p, s in per_shard.items()),
        total=total,
        wall_s=wall,
        cache_entry_bytes=2 * exp.model_config.d_model * 4 if cfg.pruning else 0,
        prune_rule=cfg.prune_rule if cfg.pruning else "",
        prune_alpha=exp.model_config.prune_alpha if cfg.pruning else None,
    )
