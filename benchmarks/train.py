"""Training throughput: GPTHF vs the equal-size GPT through the real trainer, and ingest alone.

    python benchmarks/train.py [--pair gpthf-tiny,gpt-tiny] [--steps 40] [--workers 1] [--gpu]

Both models train the same way (same data, batch, DeepSpeed config) in this one invocation;
tokens/s is the median over steady-state steps (no checkpoint step, not the first 3) from each
run's metrics.jsonl. "ingest" streams the same shards through Ray Data and the collate (no
model), to show whether the workers would wait for data. On a GPU (``--gpu``) it runs in bf16
and reports MFU; use ``--pair gpthf-8-4,gpt-12`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prepare_data(work: Path) -> Path:
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    corpus = ensure_sample_corpus()
    tok = work / "tokenizer.json"
    if not tok.exists():
        train_tokenizer([str(corpus)], str(tok), vocab_size=8192, sample_bytes=20_000_000)
    out = work / "data"
    run_preprocess(
        PreprocessConfig(
            input=InputConfig(paths=[str(corpus)]),
            output=str(out),
            tokenizer=str(tok),
            packing=PackingConfig(heldout_fraction=0.05),
            plot=False,
        )
    )
    return out


def ingest(data: Path, micro: int, rows_limit: int) -> dict[str, float]:
    from pipeline.manifest import read_manifest
    from training.data.collate import collate_blocks
    from training.data.order import (
        Shard,
        plans_until,
        rank_micro_batches,
        resume_point,
        stream_paths,
    )
    from training.data.shards import read_shards

    manifest = read_manifest(str(data))
    assert manifest is not None
    train = [Shard(s.path, s.rows) for s in manifest.shards("train")]
    steps = max(1, rows_limit // micro)
    plans = plans_until(train, 1, micro, 0, steps)
    rp = resume_point(plans, 0, 0, micro, 256)
    ds = read_shards([f"{data}/{p}" for p in stream_paths(plans, 0, rp)])
    pad = manifest.pad_id
    t0 = time.perf_counter()
    tokens = 0
    it = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    for step, micros in rank_micro_batches(
        it, plans, 0, 0, micro_rows=micro, grad_accum=1, chunk_rows=256, seed=0
    ):
        tokens += collate_blocks(micros[0], pad_id=pad).num_tokens
        if step + 1 >= steps:
            break
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def train(data: Path, out: Path, preset: str, args: argparse.Namespace) -> dict[str, float | None]:
    from training.train.config import load_train_config
    from training.train.driver import read_metrics, run_training

    cfg = load_train_config(
        None,
        {
            "data.uri": str(data),
            "run.output": str(out),
            "model.preset": preset,
            "run.workers": args.workers,
            "run.gpu": args.gpu or None,
            "run.cpus_per_worker": 1.0 if args.gpu else 0.5,
            "deepspeed.zero_stage": args.zero_stage,
            "deepspeed.micro_batch_rows": args.micro_batch,
            "optim.total_steps": args.steps,
            "optim.warmup_steps": 5,
            "run.checkpoint_every": args.steps,
            "run.eval_every": args.steps,
            "run.eval_rows": 0,
        },
    )
    run_training(cfg)
    records = [r for r in read_metrics(str(out)) if "loss" in r and 3 < r["step"] < args.steps]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in records),
        "mfu": statistics.median(mfu) if mfu else None,
        "final_loss": records[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pair", default="gpthf-tiny,gpt-tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--workdir", default=None, help="keeps the preprocessed data between runs")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpthf-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        data = prepare_data(work)
        ing = ingest(data, args.micro_batch, rows_limit=2000)
        results = {}
        for preset in args.pair.split(","):
            out = work / f"run-{preset}-{int(time.time())}"
            results[preset] = train(data, out, preset, args)
    finally:
        ray.shutdown()
    a, b = args.pair.split(",")
    report = {
        "benchmark": "train",
        "device": "cuda" if args.gpu else "cpu",
        "workers": args.workers,
        "micro_batch_rows": args.micro_batch,
        "zero_stage": args.zero_stage,
        "steps": args.steps,
        "results": results,
        "ingest_only": ing,
        f"{a}_over_{b}": results[a]["tokens_per_s"] / results[b]["tokens_per_s"],  # type: ignore[operator]
        "ingest_over_fastest_training": ing["tokens_per_s"]
        / max(r["tokens_per_s"] for r in results.values()),  # type: ignore[type-var]
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| run | tokens/s | data wait | MFU | loss at end |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['data_wait_frac']:.1%} | {mfu} | {r['final_loss']:.3f} |"
        )
    print(f"| ingest only (Ray Data + collate) | {ing['tokens_per_s']:,.0f} | | | |")
    print(
        f"\n{a} / {b} tokens/s: {report[f'{a}_over_{b}']:.2f}x; ingest / fastest training: {report['ingest_over_fastest_training']:.1f}x"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
