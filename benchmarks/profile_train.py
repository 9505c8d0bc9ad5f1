"""Where a training step's time goes: torch.profiler around a few steps of the real trainer.

    python benchmarks/profile_train.py --skip 5 --profile 2 -- --data OUT --output RUN --gpu [...]

Everything after ``--`` is ``training.train.local``'s flags (one rank, no Ray). Steps
``skip+1 .. skip+profile`` of ``TrainWorker.step`` are each run under ``torch.profiler``
(CPU and, on CUDA, kernel activity), with a device synchronisation at the end so the step's
wall time covers its kernels. Printed: per profiled step, its wall time against the time the
device spent in kernels (busy share: low means the host, not the GPU, sets the pace), then the
top operators by device time and by host time. ``--json PATH`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.train import local
from training.train.worker import TrainWorker


def _events_summary(prof: Any, key: str, n: int) -> list[dict[str, Any]]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
        }
        for e in rows
    ]


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", type=int, default=5, help="steps run before profiling (warm-up)")
    ap.add_argument("--profile", type=int, default=2, help="steps profiled")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv[:split])
    train_argv = argv[split + 1 :]

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and "--gpu" in train_argv
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    original = TrainWorker.step
    steps: list[dict[str, Any]] = []
    calls = {"n": 0}

    def step(self: TrainWorker, micro_batches: Any) -> Any:
        calls["n"] += 1
        if not args.skip < calls["n"] <= args.skip + args.profile:
            return original(self, micro_batches)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            out = original(self, micro_batches)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        device_s = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
        steps.append(
            {
                "step": calls["n"],
                "tokens": out.tokens,
                "wall_ms": wall * 1e3,
                "device_kernel_ms": device_s * 1e3,
                "device_busy_share": device_s / wall if cuda else None,
                "top_device": _events_summary(prof, "self_device_time_total", args.top)
                if cuda
                else [],
                "top_host": _events_summary(prof, "self_cpu_time_total", args.top),
            }
        )
        return out

    TrainWorker.step = step  # type: ignore[method-assign]
    try:
        rc = local.main(train_argv)
    finally:
        TrainWorker.step = original  # type: ignore[method-assign]
    for s in steps:
        busy = f", device busy {s['device_busy_share']:.0%}" if s["device_busy_share"] else ""
        print(
            f"\n[profile] step {s['step']}: {s['tokens']:,} tokens, wall {s['wall_ms']:.1f} ms, "
            f"kernels {s['device_kernel_ms']:.1f} ms{busy}"
        )
    if steps:
        last = steps[-1]
        tables = (
            (("device", "top_device"), ("host", "top_host")) if cuda else (("host", "top_host"),)
        )
        for title, key in tables:
            print(f"\n[profile] top operators by {title} time (step {last['step']}):")
            print("| operator | calls | self device ms | self host ms |\n|---|---|---|---|")
            for e in last[key]:
                print(
                    f"| {e['name'][:60]} | {e['calls']} | {e['self_device_ms']:.2f} "
                    f"| {e['self_cpu_ms']:.2f} |"
                )
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "train_argv": train_argv}, indent=1))
    if not steps:
        print(f"[profile] no step was profiled (ran {calls['n']} steps)", file=sys.stderr)
        return rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
