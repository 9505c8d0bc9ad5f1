"""Preprocessing throughput: the Ray Data pipeline end to end against the bare split+tokenize floor.

    python benchmarks/preprocess.py [--copies 4] [--out benchmarks/results/preprocess.json]

The floor is the loop that bounds preprocessing (STACK.md): read a file, blingfire
``text_to_sentences``, ``tokenizers`` ``encode_batch``, nothing else, on the same text and the same
number of cores (1 or 2 processes). The pipeline adds normalisation, EOS/EOD tokens, packing,
Parquet writing, hashing, the manifest and Ray Data scheduling. Both sides of every ratio run in
this one invocation, on the sample corpus (copied ``--copies`` times to get past start-up noise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _floor_worker(args: tuple[list[str], str]) -> int:
    import blingfire
    from tokenizers import Tokenizer

    files, tok_path = args
    tok = Tokenizer.from_file(tok_path)
    n = 0
    for f in files:
        text = Path(f).read_text()
        sentences = blingfire.text_to_sentences(text).split("\n")
        n += sum(len(e.ids) for e in tok.encode_batch(sentences, add_special_tokens=False))
    return n


def floor(files: list[str], tok_path: str, procs: int) -> float:
    chunks = [files[i::procs] for i in range(procs)]
    t0 = time.perf_counter()
    if procs == 1:
        _floor_worker((files, tok_path))
    else:
        with mp.get_context("spawn").Pool(procs, initializer=_one_thread) as pool:
            pool.map(_floor_worker, [(c, tok_path) for c in chunks])
    return time.perf_counter() - t0


def _one_thread() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every measurement")
    ap.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"  # the floor's encode_batch: one core per process

    import ray
    from ray.data import DataContext

    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    corpus = ensure_sample_corpus()
    work = Path(tempfile.mkdtemp(prefix="gpthf-bench-"))
    src = work / "raw"
    src.mkdir()
    for k in range(args.copies):
        for f in sorted(corpus.glob("*.txt")):
            shutil.copy(f, src / f"{f.stem}-{k}.txt")
    files = sorted(str(p) for p in src.glob("*.txt"))
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    tok_path = str(work / "tokenizer.json")
    train_tokenizer([str(corpus)], tok_path, vocab_size=8192, sample_bytes=20_000_000)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    results: dict[str, float] = {}
    try:
        for workers in (1, 2):
            best = float("inf")
            for r in range(args.repeats):
                cfg = PreprocessConfig(
                    input=InputConfig(paths=[str(src)]),
                    output=str(work / f"out-{workers}-{r}"),
                    tokenizer=tok_path,
                    packing=PackingConfig(heldout_fraction=0.01),
                    workers=workers,
                    plot=False,
                )
                t0 = time.perf_counter()
                run_preprocess(cfg)
                best = min(best, time.perf_counter() - t0)
            results[f"pipeline_{workers}w_s"] = best
            results[f"floor_{workers}p_s"] = min(
                floor(files, tok_path, workers) for _ in range(args.repeats)
            )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for n in (1, 2):
        p, f = mb / results[f"pipeline_{n}w_s"], mb / results[f"floor_{n}p_s"]
        rows.append(
            {
                "workers": n,
                "pipeline_MBps": round(p, 2),
                "floor_MBps": round(f, 2),
                "ratio_to_floor": round(p / f, 3),
            }
        )
    scaling = results["pipeline_1w_s"] / results["pipeline_2w_s"]
    floor_scaling = results["floor_1p_s"] / results["floor_2p_s"]
    report = {
        "benchmark": "preprocess",
        "corpus_MB": round(mb, 2),
        "files": len(files),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "pipeline_scaling_1_to_2": round(scaling, 3),
        "floor_scaling_1_to_2": round(floor_scaling, 3),
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "goals": {"ratio_to_floor": ">= 0.8", "pipeline_scaling_1_to_2": ">= 1.8"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"corpus {mb:.1f} MB in {len(files)} files, {os.cpu_count()} cores\n")
    print("| workers | pipeline MB/s | floor MB/s | pipeline / floor |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['pipeline_MBps']} | {r['floor_MBps']} | {r['ratio_to_floor']} |"
        )
    print(f"\nscaling 1 -> 2 workers: pipeline {scaling:.2f}x, floor {floor_scaling:.2f}x")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
