"""Evaluation speed: prepacked against padded batching, tokens/s, in one run.

    .venv/bin/python benchmarks/eval.py --quick                 # tiny models, synthetic mixes, CPU
    .venv/bin/python benchmarks/eval.py --data OUT [--device cuda]  # real held-out shards of OUT
    .venv/bin/python benchmarks/eval.py --data OUT --job EXPORT    # the Ray job vs its bare loop

Both layouts score the same blocks with the same model through ``training.eval.scoring.score_blocks``
(forward, log-softmax, per-block sums), ``--batch-rows`` blocks per call; prepack packs each
call's blocks first-fit decreasing into rows of ``--budget`` tokens, pad right-pads them to the
longest block of the call. tokens/s counts real tokens; best of ``--repeats``. The summed NLLs
of both layouts are checked to agree to 1e-5 (relative).

Workloads: ``--data``: the held-out shards of a preprocess output (blocks of exactly S
sentences: only sentence lengths vary). Synthetic (default): ``full``, blocks of exactly S
sentences of ~Poisson(25) tokens, as the pipeline writes them; ``mix``, blocks of 1..S
sentences (uniform), standing for a held-out mix of shard tails and sources packed with other
S; ``tail``, 1 + Geometric sentences (mean ~S/4, capped at S), the long-tailed length mix of
the Prepacking paper's prompt sets (most requests short, a few long). Random weights (speed does not depend on them).

Memory, as the Prepacking paper reports it: per layout, the largest forward (rows x width
slots), the share of its slots that are padding, and on CUDA the peak allocated memory.

``--job EXPORT`` times the evaluation job itself (``training.eval.job.run_eval``: Ray Data read,
actor pool, per-shard sums, report) on a split of ``--data`` (``--split``, held-out by default)
against its own scoring loop run bare on the same blocks with the same export and threads: the
job's execution time (``wall_s``: from the first read to the last batch) and its end-to-end
time, over the bare loop. Ray starts in-process (``--ray-cpus``).
Results: ``benchmarks/results/eval[_quick].json``, ``eval_job_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.eval.scoring import score_blocks
from training.model import ModelConfig, build_model


def synthetic(n: int, S: int, vary: str, c: ModelConfig, seed: int) -> pa.Table:
    """vary: "none" (S sentences a block), "uniform" (1..S) or "tail" (1 + Geometric, mean
    ~S/4, capped at S: mostly short blocks and a few long ones)."""
    rng = np.random.default_rng(seed)
    ids, lens, docs, nb = [], [], [], []
    for _ in range(n):
        if vary == "uniform":
            k = int(rng.integers(1, S + 1))
        elif vary == "tail":
            k = min(S, int(rng.geometric(4 / S)))
        else:
            k = S
        lengths = np.clip(rng.poisson(25, k), 2, c.max_sentence_tokens)
        doc = np.minimum(np.cumsum(rng.random(k) < 0.1), k)  # documents of ~10 sentences
        tok = rng.integers(3, c.vocab_size, int(lengths.sum()))
        tok[np.cumsum(lengths) - 1] = c.eos_id
        ids.append(tok.tolist())
        lens.append(lengths.tolist())
        docs.append((doc - doc[0]).tolist())
        nb.append(int(lengths.sum()) * 4)
    return pa.table(
        {"input_ids": ids, "sentence_lengths": lens, "document_index": docs, "num_bytes": nb}
    )


def heldout(data: str, split: str = "heldout") -> tuple[pa.Table, dict[str, Any]]:
    import pyarrow.parquet as pq

    from pipeline.blocks import SCORING_COLUMNS
    from pipeline.manifest import read_manifest

    m = read_manifest(data)
    if m is None:
        raise SystemExit(f"{data}: no manifest.json")
    uris = m.shard_uris(data, split)
    tables = [pq.read_table(u, columns=list(SCORING_COLUMNS)) for u in uris]
    return pa.concat_tables(tables), m


def memory(table: pa.Table, batching: str, args: argparse.Namespace, c: ModelConfig) -> dict:
    """Largest forward of a layout over the calls: slots (rows x width) and padding share."""
    from training.eval.scoring import pad_blocks, prepack_blocks

    largest, pad_share, real, slots = 0, 0.0, 0, 0
    for lo in range(0, len(table), args.batch_rows):
        part = table.slice(lo, args.batch_rows)
        if batching == "prepack":
            batch, _ = prepack_blocks(part, pad_id=c.pad_id, token_budget=args.budget)
        else:
            batch, _ = pad_blocks(part, pad_id=c.pad_id)
        n = batch.input_ids.numel()
        r = int((batch.sentence_ids >= 0).sum())
        real, slots = real + r, slots + n
        if n > largest:
            largest, pad_share = n, 1 - r / n
    return {
        "largest_forward_slots": largest,
        "largest_forward_padding": pad_share,
        "padding_share": 1 - real / slots,
    }


def run(
    model: Any, table: pa.Table, batching: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(seconds, summed NLL) for scoring every block once."""
    nll = 0.0
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, len(table), args.batch_rows):
        out = score_blocks(
            model,
            table.slice(lo, args.batch_rows),
            pad_id=model.config.pad_id,
            eos_id=model.config.eos_id,
            batching=batching,
            token_budget=args.budget,
            device=args.device,
        )
        nll += float(out["nll"].sum())
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, nll


def job_vs_bare(args: argparse.Namespace) -> None:
    """The Ray evaluation job against its own scoring loop, bare, on the same blocks."""
    import os
    import tempfile

    import ray

    from training.eval.config import EvalConfig
    from training.eval.job import run_eval
    from training.export import load_export

    exp = load_export(args.job, None)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    table, _ = heldout(args.data, args.split)
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py())
    args.device = "cpu"
    run(exp.model, table.slice(0, args.batch_rows), "prepack", args)  # warm-up
    bare = min(run(exp.model, table, "prepack", args)[0] for _ in range(args.repeats))
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        job_wall, job_total = float("inf"), float("inf")
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                cfg = EvalConfig(
                    checkpoints=[args.job],
                    data=args.data,
                    output=out,
                    split=args.split,
                    batch_rows=args.batch_rows,
                    token_budget=args.budget,
                    actors=args.actors,
                    threads=args.actor_threads or max(1, threads // args.actors),
                )
                t0 = time.perf_counter()
                report = run_eval(cfg)
                job_total = min(job_total, time.perf_counter() - t0)
                job_wall = min(job_wall, report.checkpoints[0].wall_s)
    finally:
        ray.shutdown()
    r = {
        "export": args.job,
        "data": args.data,
        "split": args.split,
        "blocks": len(table),
        "tokens": tokens,
        "threads": threads,
        "actors": args.actors,
        "actor_threads": args.actor_threads or max(1, threads // args.actors),
        "bare_tokens_per_s": tokens / bare,
        "job_tokens_per_s": tokens / job_wall,
        "job_end_to_end_tokens_per_s": tokens / job_total,
        "job_vs_bare": bare / job_wall,
        "job_end_to_end_vs_bare": bare / job_total,
        "goal": {"job_vs_bare": 0.9, "met": bare / job_wall >= 0.9},
    }
    path = Path(__file__).parent / "results" / f"eval_job_{args.split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    print(
        f"\nbare loop: {threads} threads; job: {r['actors']} actor(s) x {r['actor_threads']} threads"
    )
    print("\n| blocks | tokens | threads | bare tok/s | job tok/s (execution) | job / bare "
          "| job end to end tok/s | end to end / bare |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['blocks']} | {tokens} | {threads} | {r['bare_tokens_per_s']:.0f} "
          f"| {r['job_tokens_per_s']:.0f} | {r['job_vs_bare']:.2f}x "
          f"| {r['job_end_to_end_tokens_per_s']:.0f} | {r['job_end_to_end_vs_bare']:.2f}x |")  # fmt: skip
    print(f"\nwritten {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", help="a preprocess output: use its held-out shards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-rows", type=int, default=64)
    p.add_argument("--budget", type=int, default=1024, help="prepack tokens per row")
    p.add_argument("--rows", type=int, default=None, help="synthetic blocks per workload")
    p.add_argument("--S", type=int, default=16, help="synthetic sentences per block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/eval[_quick].json)"
    )
    p.add_argument("--job", metavar="EXPORT", help="time the Ray evaluation job of this export")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the in-process Ray")
    p.add_argument("--split", default="heldout", help="--job: the split of --data to score")
    p.add_argument("--actors", type=int, default=1, help="--job: scoring actors")
    p.add_argument(
        "--actor-threads", type=int, default=0, help="--job: torch threads per actor (0: auto)"
    )
    args = p.parse_args()
    if args.job:
        if not args.data:
            raise SystemExit("--job needs --data OUT (a preprocess output with a held-out split)")
        job_vs_bare(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (256 if args.quick else 2048)
    preset = "gpthf-tiny" if args.quick else "gpthf-8-4"
    base: dict[str, Any] = {"vocab_size": 8192, "max_sentence_tokens": 64}
    workloads: dict[str, pa.Table] = {}
    if args.data:
        table, m = heldout(args.data)
        base.update(
            vocab_size=m.vocab_size,
            eos_id=m.eos_id,
            pad_id=m.pad_id,
            eod_id=m.eod_id,
            max_sentence_tokens=m.max_sentence_tokens,
        )
        workloads["heldout"] = table
    cfg = ModelConfig.preset(preset, **base)
    if not args.data:
        workloads["full"] = synthetic(rows, args.S, "none", cfg, 0)
        workloads["mix"] = synthetic(rows, args.S, "uniform", cfg, 1)
        workloads["tail"] = synthetic(rows, args.S, "tail", cfg, 2)

    results = []
    for arch_cfg in (cfg, cfg.baseline()):
        torch.manual_seed(0)
        model = build_model(arch_cfg).to(args.device).eval()
        for name, table in workloads.items():
            tokens = int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py())
            timing: dict[str, float] = {}
            nll: dict[str, float] = {}
            run(model, table.slice(0, args.batch_rows), "pad", args)  # warm-up
            mem: dict[str, Any] = {}
            for batching in ("pad", "prepack"):
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                best = float("inf")
                for _ in range(args.repeats):
                    sec, nll[batching] = run(model, table, batching, args)
                    best = min(best, sec)
                timing[batching] = best
                mem[batching] = memory(table, batching, args, arch_cfg)
                if args.device == "cuda":
                    mem[batching]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            rel = abs(nll["prepack"] - nll["pad"]) / abs(nll["pad"])
            r = {
                "arch": arch_cfg.arch,
                "workload": name,
                "blocks": len(table),
                "tokens": tokens,
                "pad_tokens_per_s": tokens / timing["pad"],
                "prepack_tokens_per_s": tokens / timing["prepack"],
                "speedup": timing["pad"] / timing["prepack"],
                "nll_rel_diff": rel,
                "memory": mem,
            }
            assert rel < 1e-5, r
            results.append(r)
            print(json.dumps(r), flush=True)

    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": cfg.to_dict(),
        "device": args.device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "results": results,
    }
    path = (
        args.out or Path(__file__).parent / "results" / f"eval{'_quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\n{preset} ({args.device}), {args.batch_rows} blocks per call, budget {args.budget}\n")
    print(
        "| model | workload | blocks | tokens | pad tok/s | prepack tok/s | speedup "
        "| largest forward pad : prepack (padding) | peak MiB pad : prepack | NLL rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["memory"]
        peak = (
            f"{m['pad']['cuda_peak_bytes'] / 2**20:.0f} : {m['prepack']['cuda_peak_bytes'] / 2**20:.0f}"
            if "cuda_peak_bytes" in m["pad"]
            else "-"
        )
        print(
            f"| {r['arch']} | {r['workload']} | {r['blocks']} | {r['tokens']} "
            f"| {r['pad_tokens_per_s']:.0f} | {r['prepack_tokens_per_s']:.0f} "
            f"| {r['speedup']:.2f}x "
            f"| {m['pad']['largest_forward_slots']} ({m['pad']['largest_forward_padding']:.0%}) : "
            f"{m['prepack']['largest_forward_slots']} ({m['prepack']['largest_forward_padding']:.0%}) "
            f"| {peak} | {r['nll_rel_diff']:.1e} |"
        )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
