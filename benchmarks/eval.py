"""Evaluation speed: prepacked against padded batching, tokens/s, in one run.

    .venv/bin/python benchmarks/eval.py --quick                 # tiny models, synthetic mixes, CPU
    .venv/bin/python benchmarks/eval.py --data OUT [--device cuda]  # real held-out shards of OUT

Both layouts score the same blocks with the same model through ``training.eval.scoring.score_blocks``
(forward, log-softmax, per-block sums), ``--batch-rows`` blocks per call; prepack packs each
call's blocks first-fit decreasing into rows of ``--budget`` tokens, pad right-pads them to the
longest block of the call. tokens/s counts real tokens; best of ``--repeats``. The summed NLLs
of both layouts are checked to agree to 1e-5 (relative).

Workloads: ``--data``: the held-out shards of a preprocess output (blocks of exactly S
sentences: only sentence lengths vary). Synthetic (default): ``full``, blocks of exactly S
sentences of ~Poisson(25) tokens, as the pipeline writes them; ``mix``, blocks of 1..S
sentences (uniform), standing for a held-out mix of shard tails and sources packed with other
S. Random weights (speed does not depend on them).
Results: ``benchmarks/results/eval[_quick].json``.
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


def synthetic(n: int, S: int, vary: bool, c: ModelConfig, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids, lens, docs, nb = [], [], [], []
    for _ in range(n):
        k = int(rng.integers(1, S + 1)) if vary else S
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


def heldout(data: str) -> tuple[pa.Table, dict[str, Any]]:
    import pyarrow.parquet as pq

    from pipeline.blocks import SCORING_COLUMNS
    from pipeline.manifest import read_manifest

    m = read_manifest(data)
    if m is None:
        raise SystemExit(f"{data}: no manifest.json")
    uris = m.shard_uris(data, "heldout")
    tables = [pq.read_table(u, columns=list(SCORING_COLUMNS)) for u in uris]
    return pa.concat_tables(tables), m


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
    args = p.parse_args()
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
        workloads["full"] = synthetic(rows, args.S, False, cfg, 0)
        workloads["mix"] = synthetic(rows, args.S, True, cfg, 1)

    results = []
    for arch_cfg in (cfg, cfg.baseline()):
        torch.manual_seed(0)
        model = build_model(arch_cfg).to(args.device).eval()
        for name, table in workloads.items():
            tokens = int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py())
            timing: dict[str, float] = {}
            nll: dict[str, float] = {}
            run(model, table.slice(0, args.batch_rows), "pad", args)  # warm-up
            for batching in ("pad", "prepack"):
                best = float("inf")
                for _ in range(args.repeats):
                    sec, nll[batching] = run(model, table, batching, args)
                    best = min(best, sec)
                timing[batching] = best
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
            }
            assert rel < 1e-5, r
            results.append(r)
            print(json.dumps(r), flush=True)

    out = {
        "args": vars(args),
        "model": cfg.to_dict(),
        "device": args.device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "results": results,
    }
    path = Path(__file__).parent / "results" / f"eval{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\n{preset} ({args.device}), {args.batch_rows} blocks per call, budget {args.budget}\n")
    print(
        "| model | workload | blocks | tokens | pad tok/s | prepack tok/s | speedup | NLL rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['arch']} | {r['workload']} | {r['blocks']} | {r['tokens']} "
            f"| {r['pad_tokens_per_s']:.0f} | {r['prepack_tokens_per_s']:.0f} "
            f"| {r['speedup']:.2f}x | {r['nll_rel_diff']:.1e} |"
        )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
