"""The evaluation report: typed, written as report.json (last), report.md and report.png.

Every figure is derived from sums (``Sums``): per shard, and micro-averaged totals per checkpoint
(STYLE.md 9). ``report.json`` is strict JSON (a metric without a denominator is null).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.errors import UserError
from pipeline.storage import filesystem_for, join, storage_errors, write_bytes_atomic
from training.eval.scoring import Sums

FORMAT = "gpthf-eval/1"
REPORT = "report.json"


@dataclass(frozen=True)
class ShardScore:
    shard: str
    """Shard path relative to the data output."""
    sums: Sums

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, **self.sums.to_dict()}


@dataclass(frozen=True)
class CheckpointScore:
    """One export scored over the split."""

    checkpoint: str
    arch: str
    step: int
    model_config_hash: str
    schedule_hash: str
    tokenizer_sha256: str
    parameters: int
    shards: tuple[ShardScore, ...]
    total: Sums
    wall_s: float
    """Wall time of the scoring pipeline (read, score, collect) for this checkpoint."""
    cache_entry_bytes: int = 0
    """Bytes of one cache entry of one pruned layer (fp32 K and V); 0 unless scored with
    --pruning."""
    prune_rule: str = ""
    """The gates' rule the scores are under (step or soft); "" unless scored with --pruning."""
    prune_alpha: float | None = None
    """The final alpha the export was trained towards (its model config); the soft rule's."""

    @property
    def tokens_per_s(self) -> float | None:
        return self.total.tokens / self.wall_s if self.wall_s > 0 else None

    def cache_bytes(self, pruned: bool = True) -> float | None:
        """Mean over token positions of the bytes the pruned layers' caches hold when that
        token is the query: with eviction (``pruned``) or without. None unless --pruning."""
        t = self.total
        if not (self.cache_entry_bytes and t.tokens):
            return None
        entries = (t.prune_live if pruned else t.prune_pairs) + t.prune_queries
        return entries / t.tokens * self.cache_entry_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["shards"] = [s.to_dict() for s in self.shards]
        out["total"] = self.total.to_dict()
        out["tokens_per_s"] = self.tokens_per_s
        out["cache_bytes"] = self.cache_bytes(True)
        out["cache_bytes_unpruned"] = self.cache_bytes(False)
        return out


@dataclass(frozen=True)
class EvalReport:
    data: str
    split: str
    manifest_version: int
    tokenizer_sha256: str
    batching: str
    token_budget: int | None
    actors: int
    gpu: bool
    wall_s: float
    checkpoints: tuple[CheckpointScore, ...]
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        def sums(x: dict[str, Any]) -> Sums:
            names = {f.name for f in fields(Sums)}
            kept: dict[str, Any] = {k: v for k, v in x.items() if k in names}
            if kept.get("nll") is None:
                kept["nll"] = math.nan
            return Sums(**kept)

        cp_names = {f.name for f in fields(CheckpointScore)} - {"shards", "total"}
        return cls(
            **{
                k: v
                for k, v in d.items()
                if k in {f.name for f in fields(cls)} and k != "checkpoints"
            },
            checkpoints=tuple(
                CheckpointScore(
                    **{k: v for k, v in c.items() if k in cp_names},
                    shards=tuple(ShardScore(s["shard"], sums(s)) for s in c["shards"]),
                    total=sums(c["total"]),
                )
                for c in d["checkpoints"]
            ),
        )

    @classmethod
    def read(cls, output: str, storage: Any = None) -> EvalReport:
        fs, root = filesystem_for(output, storage)
        with storage_errors(output, "read the evaluation report of"):
            if not fs.exists(join(root, REPORT)):
                raise UserError(f"{output} has no {REPORT}: point at the output of `gpthf eval`")
            with fs.open(join(root, REPORT), "rb") as f:
                data = json.loads(f.read())
        if data.get("format", FORMAT) != FORMAT:
            raise UserError(f"{output}/{REPORT}: format {data.get('format')!r}, expected {FORMAT}")
        return cls.from_dict(data)

    def write(self, output: str, storage: Any = None) -> None:
        """report.png, report.md, then report.json (last: its presence means the run completed)."""
        fs, root = filesystem_for(output, storage)
        with storage_errors(output, "write the evaluation report to"):
            fs.makedirs(root, exist_ok=True)
            write_bytes_atomic(fs, join(root, "report.png"), plot_png(self))
            write_bytes_atomic(fs, join(root, "report.md"), format_markdown(self).encode())
            data = json.dumps(
                _strict_json(self.to_dict()), indent=1, sort_keys=True, allow_nan=False
            )
            write_bytes_atomic(fs, join(root, REPORT), data.encode())


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_table(report: EvalReport) -> str:
    """The comparison table (markdown): one line per checkpoint, micro-averaged totals; with
    pruning scored, the kept fraction and the pruned layers' cache beside the perplexity."""
    pruning = any(c.cache_entry_bytes for c in report.checkpoints)
    head = (
        "| checkpoint | arch | step | tokens | token ppl | bits/byte | word ppl | EOS-S acc "
        + ("| rule | kept | cache kept | cache bytes/position (unpruned) " if pruning else "")
        + "| tokens/s |\n|---|---|---|---|---|---|---|---|"
        + ("---|---|---|---|" if pruning else "")
        + "---|\n"
    )

    def prune_cells(c: CheckpointScore) -> str:
        if not pruning:
            return ""
        if not c.cache_entry_bytes:
            return "| - | - | - | - "
        rule = "step" if c.prune_rule == "step" else f"{c.prune_rule} (alpha {c.prune_alpha:g})"
        return (
            f"| {rule} | {_fmt(c.total.kept_fraction)} | {_fmt(c.total.cache_fraction)} "
            f"| {_fmt(c.cache_bytes(True), 0)} ({_fmt(c.cache_bytes(False), 0)}) "
        )

    lines = [
        f"| {c.checkpoint} | {c.arch} | {c.step} | {c.total.tokens} "
        f"| {_fmt(c.total.token_perplexity, 3)} | {_fmt(c.total.bits_per_byte)} "
        f"| {_fmt(c.total.word_perplexity, 3)} | {_fmt(c.total.eos_accuracy)} "
        + prune_cells(c)
        + f"| {_fmt(c.tokens_per_s, 0)} |"
        for c in report.checkpoints
    ]
    return head + "\n".join(lines) + "\n"


def format_markdown(report: EvalReport) -> str:
    parts = [
        f"# Evaluation on {report.data} ({report.split}, manifest v{report.manifest_version})\n\n",
        f"Batching: **{report.batching}**"
        + (f" (token budget {report.token_budget})" if report.token_budget else "")
        + f", {report.actors} actor(s), {'GPU' if report.gpu else 'CPU'}, "
        f"wall {report.wall_s:.1f} s. Totals are micro-averages (sums over all shards).\n\n",
        format_table(report),
    ]
    if any(c.prune_rule for c in report.checkpoints):
        parts.append(
            "\nScored with the pruning gates on; perplexity is under the rule named: *step* "
            "(the paper's: keep an interaction iff its gate logit is > 0) or *soft* (the gate at "
            "the final alpha the model was trained towards). *kept*: the mean keep over the "
            "pruned layers' (query, key) pairs; *cache kept*: the share of them an evicting "
            "cache still holds (keep > 0).\n"
        )
    for c in report.checkpoints:
        parts.append(
            f"\n## {c.checkpoint}\n\n| shard | rows | tokens | bytes | words | token ppl "
            "| bits/byte | word ppl |\n|---|---|---|---|---|---|---|---|\n"
        )
        parts.append(
            "\n".join(
                f"| {s.shard} | {s.sums.rows} | {s.sums.tokens} | {s.sums.bytes} | {s.sums.words} "
                f"| {_fmt(s.sums.token_perplexity, 3)} | {_fmt(s.sums.bits_per_byte)} "
                f"| {_fmt(s.sums.word_perplexity, 3)} |"
                for s in c.shards
            )
            + "\n"
        )
    return "".join(parts)


def plot_png(report: EvalReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for c in report.checkpoints:
        ppl = [s.sums.token_perplexity for s in c.shards]
        ax.plot(range(len(ppl)), ppl, marker="o", label=f"{c.arch} {c.checkpoint}")
    names = [s.shard for s in report.checkpoints[0].shards] if report.checkpoints else []
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("token perplexity")
    ax.set_title(f"Per-shard perplexity ({report.split})")
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
