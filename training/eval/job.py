"""Batch evaluation of exported checkpoints over a split's shards with Ray Data.

``run_eval`` checks everything it can before the cluster spends time (manifest, shards present,
checkpoints readable, tokenizer and special ids matching the shards), then for each checkpoint
maps a callable-class actor pool (``_Scorer``: the model is loaded once per actor) over the
shards, sums per shard, checks the row and token counts against the manifest, and writes
``report.json`` (last), ``report.md`` and ``report.png`` under the output.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import StorageConfig
from pipeline.manifest import ShardRef, read_manifest, shard_uris, shards
from pipeline.storage import filesystem_for, join, write_bytes_atomic
from training.data.shards import BLOCK_COLUMNS, read_shards
from training.eval.scoring import BATCHINGS, SUM_FIELDS, Sums, block_counts, score_blocks
from training.export import ExportError, load_export


class EvalError(ValueError):
    pass


@dataclass(frozen=True)
class EvalConfig:
    checkpoints: list[str]
    """Export folders (``OUT/export`` of a training run), local or s3://."""
    data: str
    """A ``gpthf preprocess`` output (its manifest is read)."""
    output: str
    """Where report.json, report.md and report.png go."""
    split: str = "heldout"
    actors: int = 1
    """Size of the scoring actor pool (one model per actor)."""
    gpu: bool = False
    """One GPU per actor."""
    batching: str = "prepack"
    """``prepack`` (first-fit decreasing into token-budget rows) or ``pad`` (one block a row)."""
    token_budget: int = 1024
    """Prepack: tokens per packed row."""
    batch_rows: int = 64
    """Blocks per actor call (one forward)."""
    storage: StorageConfig | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise EvalError("give at least one --checkpoint (an export folder)")
        if self.batching not in BATCHINGS:
            raise EvalError(f"--batching must be one of {BATCHINGS}, got {self.batching!r}")
        for name in ("actors", "token_budget", "batch_rows"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
    ) -> None:
        import torch

        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.model = load_export(checkpoint, storage, device=self.device).model
        self.kw = dict(pad_id=pad_id, eos_id=eos_id, batching=batching, token_budget=token_budget)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        paths = batch.column("path").to_pylist()
        try:
            scored = score_blocks(self.model, batch, device=self.device, **self.kw)  # type: ignore[arg-type]
            counts = block_counts(batch)
        except Exception as exc:
            raise EvalError(
                f"scoring failed on shard(s) {sorted(set(paths))}: {type(exc).__name__}: {exc}"
            ) from exc
        return {"path": np.asarray(paths, dtype=object), **scored, **counts}


def _check_inputs(cfg: EvalConfig) -> tuple[dict[str, Any], list[ShardRef], list[Any]]:
    manifest = read_manifest(cfg.data, cfg.storage)
    if manifest is None:
        raise EvalError(
            f"{cfg.data} has no manifest.json: point --data at a `gpthf preprocess` output"
        )
    refs = shards(manifest, cfg.split)
    if not refs:
        raise EvalError(f"split {cfg.split!r} of {cfg.data} has no shards")
    fs, root = filesystem_for(cfg.data, cfg.storage)
    missing = [r.path for r in refs if not fs.exists(join(root, r.path))]
    if missing:
        raise EvalError(
            f"{cfg.data}: shard(s) {missing} listed in the manifest are missing; re-run "
            "preprocessing into this output or restore them"
        )
    sha = manifest["tokenizer"]["sha256"]
    special = {k: v["id"] for k, v in manifest["special_tokens"].items()}
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
        ids = {"end_of_sentence": mc.eos_id, "pad": mc.pad_id, "end_of_document": mc.eod_id}
        wrong = {k: (v, special.get(k)) for k, v in ids.items() if special.get(k) != v}
        if wrong:
            raise EvalError(f"{uri}: special token ids (model, data) differ: {wrong}")
        exports.append(exp)
    return manifest, refs, exports


def _evaluate_one(
    cfg: EvalConfig, uri: str, manifest: dict[str, Any], refs: list[ShardRef]
) -> dict[str, Any]:
    special = manifest["special_tokens"]
    ds = read_shards(
        shard_uris(cfg.data, manifest, cfg.split),
        cfg.storage,
        columns=BLOCK_COLUMNS,
        include_paths=True,
    )
    scored = ds.map_batches(
        _Scorer,
        fn_constructor_kwargs=dict(
            checkpoint=uri,
            storage=cfg.storage,
            gpu=cfg.gpu,
            pad_id=special["pad"]["id"],
            eos_id=special["end_of_sentence"]["id"],
            batching=cfg.batching,
            token_budget=cfg.token_budget,
        ),
        batch_size=cfg.batch_rows,
        batch_format="pyarrow",
        concurrency=cfg.actors,
        num_gpus=1 if cfg.gpu else 0,
    )
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
        cols = {
            k: group[k].to_numpy() for k in (*SUM_FIELDS, "tokens", "sentences", "bytes", "words")
        }
        per_shard[match[0]] = per_shard[match[0]] + Sums(
            rows=len(group),
            nll=float(np.sum(cols["nll"], dtype=np.float64)),
            **{k: int(cols[k].sum()) for k in cols if k != "nll"},
        )
    if unknown:
        raise EvalError(f"rows from files not in the manifest: {unknown}")
    bad = [
        f"{r.path}: rows {per_shard[r.path].rows}/{r.rows}, tokens {per_shard[r.path].tokens}/{r.tokens}"
        for r in refs
        if (per_shard[r.path].rows, per_shard[r.path].tokens) != (r.rows, r.tokens)
    ]
    if bad:
        raise EvalError(f"scored counts differ from the manifest (scored/manifest): {bad}")
    total = sum(per_shard.values(), Sums())
    split = manifest["splits"][cfg.split]
    if (total.rows, total.tokens) != (
        split.get("rows", total.rows),
        split.get("tokens", total.tokens),
    ):
        raise EvalError(
            f"totals rows {total.rows}, tokens {total.tokens} differ from the manifest's "
            f"{split.get('rows')}, {split.get('tokens')} for split {cfg.split!r}"
        )
    return {
        "shards": [{"shard": p, **s.to_dict()} for p, s in per_shard.items()],
        "total": total.to_dict(),
        "wall_s": wall,
        "tokens_per_s": total.tokens / wall if wall > 0 else None,
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every checkpoint; write and return the report."""
    manifest, refs, exports = _check_inputs(cfg)
    started = time.perf_counter()
    results = []
    for uri, exp in zip(cfg.checkpoints, exports, strict=True):
        result = _evaluate_one(cfg, uri, manifest, refs)
        results.append(
            {
                "checkpoint": uri,
                "arch": exp.model_config.arch,
                "step": exp.config.step,
                "model_config_hash": _hash(exp.config.model.to_dict()),
                "schedule_hash": exp.config.schedule_hash,
                "tokenizer_sha256": exp.config.tokenizer_sha256,
                "parameters": exp.model.num_parameters(),
                **result,
            }
        )
    report = {
        "data": cfg.data,
        "split": cfg.split,
        "manifest_version": manifest.get("version"),
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "batching": cfg.batching,
        "token_budget": cfg.token_budget if cfg.batching == "prepack" else None,
        "actors": cfg.actors,
        "gpu": cfg.gpu,
        "wall_s": time.perf_counter() - started,
        "checkpoints": results,
    }
    write_report(cfg.output, report, cfg.storage)
    return report


# --------------------------------------------------------------------------------------------
# Report


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_table(report: dict[str, Any]) -> str:
    """The comparison table (markdown): one line per checkpoint, micro-averaged totals."""
    head = (
        "| checkpoint | arch | step | tokens | token ppl | bits/byte | word ppl | EOS-S acc "
        "| tokens/s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {c['checkpoint']} | {c['arch']} | {c['step']} | {c['total']['tokens']} "
        f"| {_fmt(c['total']['token_perplexity'], 3)} | {_fmt(c['total']['bits_per_byte'])} "
        f"| {_fmt(c['total']['word_perplexity'], 3)} | {_fmt(c['total']['eos_accuracy'])} "
        f"| {_fmt(c['tokens_per_s'], 0)} |"
        for c in report["checkpoints"]
    ]
    return head + "\n".join(lines) + "\n"


def format_markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# Evaluation on {report['data']} ({report['split']}, manifest v{report['manifest_version']})\n\n",
        f"Batching: **{report['batching']}**"
        + (f" (token budget {report['token_budget']})" if report["token_budget"] else "")
        + f", {report['actors']} actor(s), {'GPU' if report['gpu'] else 'CPU'}, "
        f"wall {report['wall_s']:.1f} s. Totals are micro-averages (sums over all shards).\n\n",
        format_table(report),
    ]
    for c in report["checkpoints"]:
        parts.append(
            f"\n## {c['checkpoint']}\n\n| shard | rows | tokens | bytes | words | token ppl | bits/byte | word ppl |\n|---|---|---|---|---|---|---|---|\n"
        )
        parts.append(
            "\n".join(
                f"| {s['shard']} | {s['rows']} | {s['tokens']} | {s['bytes']} | {s['words']} "
                f"| {_fmt(s['token_perplexity'], 3)} | {_fmt(s['bits_per_byte'])} "
                f"| {_fmt(s['word_perplexity'], 3)} |"
                for s in c["shards"]
            )
            + "\n"
        )
    return "".join(parts)


def plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for c in report["checkpoints"]:
        ppl = [s["token_perplexity"] for s in c["shards"]]
        ax.plot(range(len(ppl)), ppl, marker="o", label=f"{c['arch']} {c['checkpoint']}")
    names = [s["shard"] for s in report["checkpoints"][0]["shards"]]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("token perplexity")
    ax.set_title(f"Per-shard perplexity ({report['split']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _strict_json(x: Any) -> Any:
    """NaN/inf (a metric with no denominator) become null: report.json stays strict JSON."""
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict_json(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(output: str, report: dict[str, Any], storage: Any = None) -> None:
    """report.png, report.md, then report.json (last: its presence means the run completed)."""
    fs, root = filesystem_for(output, storage)
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(fs, join(root, "report.png"), plot_png(report))
    write_bytes_atomic(fs, join(root, "report.md"), format_markdown(report).encode())
    data = json.dumps(_strict_json(report), indent=1, sort_keys=True, allow_nan=False).encode()
    write_bytes_atomic(fs, join(root, "report.json"), data)
