"""Training metrics: the typed record of one step, its JSON line, the console line, and the
rank-0 writer (metrics.jsonl + TensorBoard, copied to the run output at checkpoints)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s of known accelerators, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(configured: float | None, device: torch.device) -> float | None:
    """Peak FLOP/s of one worker's device: the configured value, else a known GPU's."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, summed over all ranks (what ``TrainWorker.step`` returns)."""

    step: int
    """The global step just completed (1-based)."""
    loss: float
    """Summed NLL of the global batch over its target count."""
    nll: float
    """Summed NLL of the global batch."""
    targets: int
    """Positions with a label in the global batch."""
    tokens: int
    """Real (non-pad) tokens in the global batch."""
    tokens_seen: int
    """Tokens of all steps so far, this one included."""
    lr: float
    """The learning rate this step used."""
    grad_norm: float | None
    flops: float
    """Model FLOPs of the step's forward + backward, all ranks."""
    collate_s: float
    """Seconds this rank spent turning rows into tensors (counted as data wait)."""
    compute_s: float
    """Seconds of forward, backward and optimizer on this rank."""
    prune_alpha: float | None = None
    """alpha of the pruning gates this step (None: the model does not prune)."""
    kept: dict[int, float] | None = None
    """Fraction of the gated interactions each pruned layer kept, over the global batch."""
    kept_all: float | None = None
    """The same over all pruned layers (what the sparsity loss multiplies by lambda)."""

    def record(
        self, step_time_s: float, data_wait_s: float, peak: float | None, world: int
    ) -> dict[str, Any]:
        """The metrics.jsonl record (``step_time_s``: wall time since the previous step)."""
        dt = max(step_time_s, 1e-9)
        return {
            "step": self.step,
            "loss": self.loss,
            "targets": self.targets,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.tokens / dt,
            "step_time_s": step_time_s,
            "data_wait_frac": min(1.0, data_wait_s / dt),
            "mfu": (self.flops / dt) / (peak * world) if peak else None,
            **self.pruning_record(),
        }

    def pruning_record(self) -> dict[str, float]:
        """prune_alpha, kept_fraction and kept_fraction/layer<i> (TensorBoard scalars)."""
        if self.prune_alpha is None:
            return {}
        out = {"prune_alpha": self.prune_alpha, "kept_fraction": self.kept_all or 0.0}
        for layer, fraction in (self.kept or {}).items():
            out[f"kept_fraction/layer{layer}"] = fraction
        return out


def format_step(record: dict[str, Any], end: int) -> str:
    """The console line of a metrics record."""
    extra = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
    mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
    if "kept_fraction" in record:
        extra += f" kept {record['kept_fraction']:.1%} (alpha {record['prune_alpha']:.2f})"
    return (
        f"[train] step {record['step']}/{end} loss {record['loss']:.4f}{extra} "
        f"lr {record['lr']:.2e} gnorm {record['grad_norm'] or 0:.3f} "
        f"{record['tokens_per_s']:,.0f} tok/s{mfu} data-wait {record['data_wait_frac']:.0%}"
    )


def parse_metrics(data: bytes, where: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that does not parse (a write cut short before
    metrics were written atomically, an edit by hand) is dropped with a warning naming it,
    never the reason a run cannot resume."""
    records, bad = [], []
    for n, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(n)
    if bad:
        print(
            f"[train] warning: {where}: dropped {len(bad)} unreadable line(s) {bad[:5]}", flush=True
        )
    return records


class MetricsWriter:
    """Rank 0: JSONL + TensorBoard in a local folder, copied to the run output by ``sync``.

    A resume continues the run's metrics.jsonl, minus the steps after ``start_step`` (they are
    redone). TensorBoard events are skipped where tensorboardX is not installed.
    """

    def __init__(self, output: str, storage: Any, start_step: int) -> None:
        from pipeline.storage import filesystem_for

        self.fs, self.root = filesystem_for(output, storage)
        self.local = Path(tempfile.mkdtemp(prefix="gpthf-metrics-"))
        self.jsonl = self.local / "metrics.jsonl"
        remote = f"{self.root}/metrics.jsonl"
        kept = []
        if self.fs.exists(remote):
            with self.fs.open(remote, "rb") as f:
                records = parse_metrics(f.read(), remote)
            kept = [json.dumps(r) for r in records if r.get("step", 0) <= start_step]
        self.jsonl.write_text("".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # e.g. a GPU machine with only torch: JSONL still works
            self.tb = None
        else:
            self.tb = SummaryWriter(str(self.local / "tb"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is None:
            return
        for k, v in record.items():
            if isinstance(v, int | float) and k != "step":
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Remove the local folder (what was synced stays at the run output)."""
        if self.tb is not None:
            self.tb.close()
        shutil.rmtree(self.local, ignore_errors=True)

    def sync(self) -> None:
        from pipeline.storage import write_bytes_atomic

        # Whole or not at all: a copy cut short by a full disk would lose the run's history.
        write_bytes_atomic(self.fs, f"{self.root}/metrics.jsonl", self.jsonl.read_bytes())
        if self.tb is None:
            return
        self.tb.flush()
        for p in (self.local / "tb").rglob("*"):
            if p.is_file():
                self.fs.makedirs(f"{self.root}/tb", exist_ok=True)
                self.fs.put_file(str(p), f"{self.root}/tb/{p.name}")
