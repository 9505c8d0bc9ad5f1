"""Runs side by side (``gpthf compare``): loss against tokens seen and against training FLOPs,
as a PNG and a Markdown table, with evaluation figures next to them.

A run is a training output folder (local or URL): its ``metrics.jsonl`` (training loss each
logged step, ``val_loss`` at validations), ``summary.json`` and ``export/config.json`` (the
model). Training FLOPs are 3 x the forward FLOPs per token of ``training.model.flops`` (forward
+ backward) at the run data's mean block and sentence length, times the tokens seen. An
evaluation is the output of ``gpthf eval`` (``report.json``); its rows are matched to runs by
export path.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.storage import filesystem_for, join, write_bytes_atomic
from training.eval.report import EvalReport
from training.export import ExportConfig, ExportError
from training.model.flops import flops_per_token


class CompareError(UserError):
    pass


@dataclass
class RunCurve:
    name: str
    uri: str
    arch: str
    parameters: int
    train_flops_per_token: float | None
    """None when the training data's block shape cannot be read (``flops_unknown`` says why)."""
    flops_unknown: str = ""
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> list[float]:
        per_token = self.train_flops_per_token
        return [] if per_token is None else [t * per_token for t in self.tokens]

    @property
    def val_flops(self) -> list[float]:
        per_token = self.train_flops_per_token
        return [] if per_token is None else [t * per_token for t in self.val_tokens]


def _read_text(uri: str, storage: Any = None) -> str | None:
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def _block_shape(data: str, storage: Any) -> tuple[int, int] | str:
    """(mean tokens per block, mean tokens per sentence) of the run's training data, or why it
    cannot be known (the FLOPs axis is then left out for this run, never filled with a guess:
    GPTHF's FLOPs per token depend on both, so a made-up shape would misplace its curve)."""
    from pipeline.manifest import read_manifest

    if not data:
        return "the export names no training data"
    try:
        m = read_manifest(data, storage)
    except (UserError, OSError, ValueError) as exc:
        return f"its data manifest at {data} could not be read ({exc})"
    if m is None:
        return f"its data folder {data} holds no manifest"
    shards = m.shards("train") if m.has_split("train") else []
    rows = sum(s.rows for s in shards)
    sentences = sum(s.sentences for s in shards)
    tokens = sum(s.tokens for s in shards)
    if not rows or not sentences:
        return f"its data manifest at {data} lists no training blocks"
    return max(1, round(tokens / rows)), max(1, round(tokens / sentences))


def read_run(uri: str, storage: Any = None) -> RunCurve:
    uri = uri.rstrip("/")
    raw = _read_text(join(uri, "export", "config.json"), storage)
    metrics = _read_text(join(uri, "metrics.jsonl"), storage)
    if raw is None or metrics is None:
        raise CompareError(
            f"{uri} is not a finished training run (needs metrics.jsonl and export/config.json)"
        )
    try:
        cfg = ExportConfig.from_dict(json.loads(raw), f"{uri}/export/config.json")
    except ValueError as exc:
        raise ExportError(f"{uri}/export/config.json: {exc}") from exc
    shape = _block_shape(cfg.data, storage)
    import torch

    from training.model import build_model

    with torch.device("meta"):
        params = build_model(cfg.model).num_parameters()
    curve = RunCurve(
        name=uri.rsplit("/", 1)[-1],
        uri=uri,
        arch=cfg.model.arch,
        parameters=params,
        train_flops_per_token=None
        if isinstance(shape, str)
        else 3.0 * flops_per_token(cfg.model, *shape).total,
        flops_unknown=shape if isinstance(shape, str) else "",
    )
    for n, line in enumerate(metrics.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if r.get("final"):  # the end-of-session record (no loss)
                continue
            step, tokens, loss = int(r["step"]), int(r["tokens_seen"]), float(r["loss"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CompareError(f"{uri}/metrics.jsonl line {n}: not a metrics record") from exc
        curve.steps.append(step)
        curve.tokens.append(tokens)
        curve.loss.append(loss)
        if r.get("val_loss") is not None:
            curve.val_tokens.append(tokens)
            curve.val_loss.append(float(r["val_loss"]))
    summary = _read_text(join(uri, "summary.json"), storage)
    curve.summary = json.loads(summary) if summary else {}
    return curve


def attach_evals(runs: list[RunCurve], evals: Sequence[str], storage: Any = None) -> None:
    for e in evals:
        report = EvalReport.read(e, storage)
        for cp in report.checkpoints:
            key = cp.checkpoint.rstrip("/").removesuffix("/export")
            for run in runs:
                if run.uri.removesuffix("/export") == key or run.name == key.rsplit("/", 1)[-1]:
                    t = cp.total
                    run.eval = {
                        "token_ppl": t.token_perplexity,
                        "bits_per_byte": t.bits_per_byte,
                        "eos_accuracy": t.eos_accuracy,
                        "tokens_per_s": cp.tokens_per_s or math.nan,
                    }


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def format_markdown(runs: list[RunCurve]) -> str:
    head = (
        "| run | arch | params | steps | tokens | train FLOPs | final loss | final val loss "
        "| held-out token ppl | bits/byte | EOS-S acc | train tok/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in runs:
        rows.append(
            f"| {r.name} | {r.arch} | {r.parameters:,} | {r.steps[-1] if r.steps else 0} "
            f"| {r.tokens[-1] if r.tokens else 0:,} "
            f"| {'n/a' if r.flops_unknown else _fmt(r.flops[-1] if r.flops else None)} "
            f"| {_fmt(r.loss[-1] if r.loss else None)} "
            f"| {_fmt(r.val_loss[-1] if r.val_loss else None)} "
            f"| {_fmt(r.eval.get('token_ppl'), 3)} | {_fmt(r.eval.get('bits_per_byte'))} "
            f"| {_fmt(r.eval.get('eos_accuracy'))} | {_fmt(r.summary.get('tokens_per_s'), 1)} |"
        )
    notes = (
        "\nTraining FLOPs: 3 x forward FLOPs per token (training.model.flops) at the data's "
        "mean block and sentence length, times tokens seen. Held-out figures: `gpthf eval`.\n"
    )
    for r in runs:
        if r.flops_unknown:
            notes += f"\nTraining FLOPs of {r.name}: n/a, {r.flops_unknown}.\n"
    return "# Runs compared\n\n" + head + "\n".join(rows) + "\n" + notes


def plot_png(runs: list[RunCurve]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        for ax, x, vx in ((axes[0], r.tokens, r.val_tokens), (axes[1], r.flops, r.val_flops)):
            if not x:  # FLOPs unknown: left out (said in the table and below the axis)
                continue
            (line,) = ax.plot(x, r.loss, label=f"{r.name} train", alpha=0.8)
            if r.val_loss:
                ax.plot(vx, r.val_loss, "o--", color=line.get_color(), label=f"{r.name} held-out")
    axes[0].set_xlabel("tokens seen")
    unknown = [r.name for r in runs if r.flops_unknown]
    axes[1].set_xlabel(
        "training FLOPs"
        + (f"\n(not shown, data shape unknown: {', '.join(unknown)})" if unknown else "")
    )
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training and held-out loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare_runs(
    runs: Sequence[str],
    output: str,
    evals: Sequence[str] = (),
    storage: Any = None,
) -> list[RunCurve]:
    """Write ``compare.png``, ``compare.md`` and ``compare.json`` under ``output``."""
    if not runs:
        raise CompareError("give at least one training run folder")
    curves = [read_run(u, storage) for u in runs]
    for c in curves:
        if c.flops_unknown:
            print(f"[compare] {c.name}: training FLOPs n/a: {c.flops_unknown}", file=sys.stderr)
    attach_evals(curves, list(evals), storage)
    fs, root = filesystem_for(output, storage)
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(fs, join(root, "compare.png"), plot_png(curves))
    write_bytes_atomic(fs, join(root, "compare.md"), format_markdown(curves).encode())
    data = [vars(c) | {"flops": c.flops, "val_flops": c.val_flops} for c in curves]
    write_bytes_atomic(fs, join(root, "compare.json"), json.dumps(data, indent=1).encode())
    return curves
