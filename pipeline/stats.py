"""Stats report of an output: totals from the manifest's per-input counters, and a PNG plot."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipeline.config import StorageConfig
from pipeline.counters import SKIP_HINTS, Counters
from pipeline.manifest import Manifest
from pipeline.storage import filesystem_for, join, storage_errors, write_bytes_atomic


def build_stats(manifest: Manifest, run: dict[str, Any] | None = None) -> dict[str, Any]:
    total = Counters()
    for entry in manifest.inputs:
        total.merge(Counters.from_dict(entry.stats))
    d = total.to_dict()
    hist = np.asarray(d["sentence_tokens_hist"], dtype=np.float64)
    n = hist.sum()
    mean_len = float((hist * np.arange(hist.size)).sum() / n) if n else 0.0
    return {
        "manifest_version": manifest.version,
        "inputs": len(manifest.inputs),
        "documents": d["counts"].get("documents", 0),
        "sentences": d["counts"].get("sentences", 0),
        "sentence_pieces": d["counts"].get("sentence_pieces", 0),
        "sentences_split": d["counts"].get("sentences_split", 0),
        "tokens": d["counts"].get("tokens", 0),
        "bytes": d["counts"].get("bytes", 0),
        "source_bytes": d["counts"].get("source_bytes", 0),
        "mean_sentence_tokens": round(mean_len, 3),
        "splits": {k: manifest.totals(k) for k in manifest.splits},
        "skipped": d["skipped"],
        "skipped_examples": d["skipped_examples"],
        "counts": d["counts"],
        "sentence_tokens_hist": d["sentence_tokens_hist"],
        "doc_sentences_hist_log2": d["doc_sentences_hist_log2"],
        "last_run": run or {},
    }


def plot_stats(stats: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    names = ["documents", "sentences", "tokens", "bytes"]
    values = [stats[n] for n in names]
    ax.bar(names, values, color="#4C72B0")
    ax.set_yscale("log")
    ax.set_title("totals")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    ax = axes[0][1]
    hist = stats["sentence_tokens_hist"]
    ax.bar(range(len(hist)), hist, width=1.0, color="#55A868")
    ax.set_title(f"tokens per sentence piece (mean {stats['mean_sentence_tokens']:.1f})")
    ax.set_xlabel("tokens (EOS-S included)")
    ax = axes[1][0]
    dh = stats["doc_sentences_hist_log2"]
    last = max((i for i, v in enumerate(dh) if v), default=0) + 1
    labels = ["0"] + [f"{2 ** (b - 1)}-{2**b - 1}" for b in range(1, last)]
    ax.bar(labels, dh[:last], color="#C44E52")
    ax.set_title("sentences per document")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax = axes[1][1]
    skipped = stats["skipped"] or {"(none)": 0}
    ax.barh(list(skipped), list(skipped.values()), color="#8172B2")
    ax.set_title("skipped records by reason")
    fig.suptitle(f"preprocessing stats, manifest v{stats['manifest_version']}")
    # Fixed margins, not tight_layout: that draws every label once more just to measure it,
    # and every run (a small one too) pays for the plot. The skip reasons need the room.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.45, hspace=0.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_stats(
    output: str, stats: dict[str, Any], storage: StorageConfig | None, plot: bool
) -> None:
    fs, root = filesystem_for(output, storage)
    with storage_errors(output, "write stats to"):
        write_bytes_atomic(fs, join(root, "stats.json"), json.dumps(stats, indent=1).encode())
        if plot:
            write_bytes_atomic(fs, join(root, "stats.png"), plot_stats(stats))


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"manifest v{stats['manifest_version']}: {stats['inputs']} input files",
        f"  documents {stats['documents']:,}  sentences {stats['sentences']:,}  "
        f"tokens {stats['tokens']:,}  bytes {stats['bytes']:,}",
        f"  mean tokens per sentence {stats['mean_sentence_tokens']:.2f}; "
        f"sentences split at M: {stats['sentences_split']:,}",
    ]
    for split, t in stats["splits"].items():
        lines.append(
            f"  {split:8s} rows {t['rows']:,}  documents {t['documents']:,}  tokens {t['tokens']:,}"
        )
    if stats["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()))
        for reason in stats["skipped"]:
            if reason in SKIP_HINTS:
                lines.append(f"    {reason}: {SKIP_HINTS[reason]}")
    else:
        lines.append("  skipped: none")
    return "\n".join(lines)
