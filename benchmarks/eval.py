"""Evaluation speed: prepacked against padded batching, tokens/s, in one run.

    .venv/bin/python benchmarks/eval.py --quick                 # tiny models, synthetic mixes, CPU
    .venv/bin/python benchmarks/eval.py --data OUT [--device cuda]  # real held-out shards of OUT
    .venv/bin/python benchmarks/eval.py --data OUT --job EXPORT    # the Ray job vs its bare loop

Both layouts score the same blocks with the same model through ``training.eval.scoring.score_blocks``
(forward, log-softmax, per-block sums), ``--batch-rows`` blocks per call; prepack packs each
call's blocks first-fit decreasing into rows of ``--budget`` tokens, pad right-pads them to the
longest block of the call. tokens/s counts real tokens. The summed NLLs of both layouts are
checked to agree to 1e-5 (relative) in every repeat.

Under the benchmark protocol (``benchmarks/protocol.py``): for each model and workload the two
layouts run in turn within each repeat, the order rotating (``--repeats``, 3 by default); each
layout's tokens/s is the median over the repeats with its min-max, and the prepack/pad speed-up
is taken per repeat and reported as the median of those ratios with their min-max. Both layouts
are asserted to have scored the same blocks, real tokens and target positions before the ratio
is formed.

Workloads: ``--data``: the held-out shards of a preprocess output (blocks of exactly S
sentences: only sentence lengths vary). Synthetic (default): ``full``, blocks of exactly S
sentences of ~Poisson(25) tokens, as the pipeline writes them; ``mix``, blocks of 1..S
sentences (uniform), standing for a held-out mix of shard tails and sources packed with other
S; ``tail``, 1 + Geometric sentences (mean ~S/4, capped at S), the long-tailed length mix of
the Prepacking paper's prompt sets (most requests short, a few long). Random weights (speed does not depend on them).

Memory, as the Prepacking paper reports it: per layout, the largest forward (rows x width
slots), the share of its slots that are padding, and on CUDA the peak allocated memory (the
largest over the repeats).

``--job EXPORT`` times the evaluation job itself (``training.eval.job.run_eval``: Ray Data read,
actor pool, per-shard sums, report) on a split of ``--data`` (``--split``, held-out by default)
against its own scoring loop run bare on the same blocks with the same export and threads, the
two interleaved within each repeat: the job's execution time (``wall_s``: from the first read to
the last batch) and its end-to-end time, over the bare loop, per repeat (median, min-max). The
job must have scored exactly the blocks, tokens and target positions the bare loop did, with
summed NLLs that agree to 1e-5 (relative), read from its report's totals; otherwise the
benchmark fails. Ray starts in-process (``--ray-cpus``).

Results, with the environment: ``benchmarks/results/eval[_quick].json``,
``eval_job_<split>.json`` (or ``--out``), each with its table as ``.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.protocol import (
    MIN_REPEATS,
    Run,
    Samples,
    Spread,
    interleave,
    markdown_table,
    ratio,
    same_work,
    write_result,
)
from training.eval.scoring import score_blocks
from training.model import ModelConfig, build_model

NLL_RTOL = 1e-5


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


def n_tokens(table: pa.Table) -> int:
    return int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py())


def score(model: Any, table: pa.Table, batching: str, args: argparse.Namespace) -> Run:
    """Score every block once: the seconds, the work (blocks, real tokens, target positions
    scored) and the summed NLL (``extra``; on CUDA the peak allocated memory too)."""
    nll, targets = 0.0, 0
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
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
        nll += float(np.sum(out["nll"], dtype=np.float64))
        targets += int(np.sum(out["targets"]))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra: dict[str, Any] = {"nll": nll}
    if cuda:
        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return Run(
        seconds, {"blocks": len(table), "tokens": n_tokens(table), "targets": targets}, extra
    )


def nll_rel_diffs(t: dict[str, Samples], side: str, base: str) -> list[float]:
    """|NLL(side) - NLL(base)| / |NLL(base)| in each repeat."""
    return [
        abs(a.extra["nll"] - b.extra["nll"]) / abs(b.extra["nll"])
        for a, b in zip(t[side].runs, t[base].runs, strict=True)
    ]


def _put(out: dict[str, Any], key: str, spread: Spread) -> None:
    """``key`` as the median, ``key_min`` and ``key_max`` its range over the repeats."""
    out.update({key: spread.median, f"{key}_min": spread.low, f"{key}_max": spread.high})


def _tps(e: dict[str, Any], key: str) -> str:
    return f"{e[key]:,.0f} ({e[key + '_min']:,.0f}-{e[key + '_max']:,.0f})"


def _x(r: dict[str, Any]) -> str:
    if r.get("flag"):
        return f"noise ({r['flag']})"
    return f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"


def _repeats_note(repeats: int) -> None:
    if repeats < MIN_REPEATS:
        print(f"# --repeats {repeats} < {MIN_REPEATS}: a rehearsal, not a protocol figure")


def job_vs_bare(args: argparse.Namespace) -> None:
    """The Ray evaluation job against its own scoring loop, bare, on the same blocks,
    interleaved within each repeat; the job must score what the bare loop scores."""
    import os
    import tempfile

    import ray

    from training.eval.config import EvalConfig
    from training.eval.job import run_eval
    from training.export import load_export

    exp = load_export(args.job, None)
    model = exp.model.without_pruning()  # what the job scores without --pruning
    threads = args.threads or len(os.sched_getaffinity(0))
    actor_threads = args.actor_threads or max(1, threads // args.actors)
    torch.set_num_threads(threads)
    table, _ = heldout(args.data, args.split)
    args.device = "cpu"
    score(model, table.slice(0, args.batch_rows), "prepack", args)  # warm-up

    def job() -> Run:
        with tempfile.TemporaryDirectory() as out:
            cfg = EvalConfig(
                checkpoints=[args.job],
                data=args.data,
                output=out,
                split=args.split,
                batch_rows=args.batch_rows,
                token_budget=args.budget,
                actors=args.actors,
                threads=actor_threads,
            )
            t0 = time.perf_counter()
            report = run_eval(cfg)
            seconds = time.perf_counter() - t0
        cp = report.checkpoints[0]
        total = cp.total
        return Run(
            seconds,
            {"blocks": total.rows, "tokens": total.tokens, "targets": total.targets},
            {"nll": total.nll, "wall_s": cp.wall_s},
        )

    _repeats_note(args.repeats)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t = interleave(
            {"bare": lambda: score(model, table, "prepack", args), "job": job}, args.repeats
        )
    finally:
        ray.shutdown()
    try:
        same_work(t, "bare", "job")
    except AssertionError as exc:
        raise SystemExit(f"--job: the job did not score what the bare loop scored: {exc}") from exc
    rel = nll_rel_diffs(t, "job", "bare")
    if not max(rel) <= NLL_RTOL:
        raise SystemExit(
            f"--job: summed NLLs differ, job {[r.extra['nll'] for r in t['job'].runs]} vs bare "
            f"{[r.extra['nll'] for r in t['bare'].runs]} (relative {max(rel):.2e} > {NLL_RTOL})"
        )
    execution = {
        "bare": t["bare"],
        "job": Samples("job", [Run(r.extra["wall_s"], r.work) for r in t["job"].runs]),
    }
    exec_ratio, e2e_ratio = ratio(execution, "job", "bare"), ratio(t, "job", "bare")
    work = t["bare"].work
    smoke = args.repeats < MIN_REPEATS
    r: dict[str, Any] = {
        "export": args.job,
        "data": args.data,
        "split": args.split,
        "timing": f"{args.repeats} interleaved repeats (order rotating) of the job and the bare "
        "loop after a warm-up of the bare loop; tokens/s median (min-max); ratios per repeat",
        "repeats": args.repeats,
        "smoke": smoke,
        "blocks": work["blocks"],
        "tokens": work["tokens"],
        "targets": work["targets"],
        "threads": threads,
        "actors": args.actors,
        "actor_threads": actor_threads,
    }
    _put(r, "bare_tokens_per_s", t["bare"].rate("tokens"))
    _put(r, "job_tokens_per_s", execution["job"].rate("tokens"))
    _put(r, "job_end_to_end_tokens_per_s", t["job"].rate("tokens"))
    ratios = [
        {**exec_ratio.to_dict(), "measure": "execution (report wall_s)"},
        {**e2e_ratio.to_dict(), "measure": "end to end (run_eval call)"},
    ]
    r.update(
        job_vs_bare=exec_ratio.spread.median,
        job_end_to_end_vs_bare=e2e_ratio.spread.median,
        ratios=ratios,
        nll={
            "bare": [x.extra["nll"] for x in t["bare"].runs],
            "job": [x.extra["nll"] for x in t["job"].runs],
            "rel_diff_max": max(rel),
        },
        samples={
            "bare": t["bare"].summary(),
            "job": t["job"].summary(),
            "job_execution": execution["job"].summary(),
        },
        goal={"job_vs_bare": 0.9, "met": exec_ratio.spread.median >= 0.9},
    )
    md = (
        f"bare loop: {threads} threads; job: {args.actors} actor(s) x {actor_threads} threads; "
        f"median (min-max) of {args.repeats} interleaved repeats, ratios per repeat"
        f"{' (smoke: fewer than 3)' if smoke else ''}; the job scored the same {work['blocks']} "
        f"blocks, {work['tokens']} tokens and {work['targets']} targets as the bare loop, summed "
        f"NLL within {max(rel):.1e} (relative)\n\n"
        + markdown_table(
            [
                "blocks",
                "tokens",
                "bare tok/s",
                "job tok/s (execution)",
                "job / bare",
                "job end to end tok/s",
                "end to end / bare",
            ],
            [
                [
                    work["blocks"],
                    work["tokens"],
                    _tps(r, "bare_tokens_per_s"),
                    _tps(r, "job_tokens_per_s"),
                    _x(ratios[0]),
                    _tps(r, "job_end_to_end_tokens_per_s"),
                    _x(ratios[1]),
                ]
            ],
        )
        + "\n"
    )
    r["table"] = md
    path = write_result(f"eval_job_{args.split}", r, args.out)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"written {path} and {path.with_suffix('.md')}")


def measure(
    model: Any, arch_cfg: ModelConfig, name: str, table: pa.Table, args: argparse.Namespace
) -> dict[str, Any]:
    """Pad and prepack on one workload, interleaved; same work and the same NLL asserted."""
    for batching in ("pad", "prepack"):  # warm-up
        score(model, table.slice(0, args.batch_rows), batching, args)
    sides: dict[str, Callable[[], Run]] = {
        b: (lambda b=b: score(model, table, b, args)) for b in ("pad", "prepack")
    }
    t = interleave(sides, args.repeats)
    same_work(t, "pad", "prepack")  # the same blocks, real tokens and targets scored
    rel = max(nll_rel_diffs(t, "prepack", "pad"))
    mem: dict[str, Any] = {}
    for b in ("pad", "prepack"):
        mem[b] = memory(table, b, args, arch_cfg)
        if args.device == "cuda":
            mem[b]["cuda_peak_bytes"] = max(x.extra["cuda_peak_bytes"] for x in t[b].runs)
    speedup = ratio(t, "prepack", "pad")
    work = t["pad"].work
    r: dict[str, Any] = {
        "arch": arch_cfg.arch,
        "workload": name,
        "blocks": work["blocks"],
        "tokens": work["tokens"],
        "targets": work["targets"],
    }
    for b in ("pad", "prepack"):
        _put(r, f"{b}_tokens_per_s", t[b].rate("tokens"))
    r.update(
        speedup=speedup.spread.median,
        ratios=[speedup.to_dict()],
        nll_rel_diff=rel,
        memory=mem,
        samples={b: t[b].summary() for b in ("pad", "prepack")},
    )
    if not rel < NLL_RTOL:
        raise AssertionError(f"prepack and pad NLLs differ by {rel:.2e} (relative): {r}")
    return r


def report_markdown(results: list[dict[str, Any]], header: str) -> str:
    rows = []
    for r in results:
        m = r["memory"]
        peak = (
            f"{m['pad']['cuda_peak_bytes'] / 2**20:.0f} : {m['prepack']['cuda_peak_bytes'] / 2**20:.0f}"
            if "cuda_peak_bytes" in m["pad"]
            else "-"
        )
        rows.append(
            [
                r["arch"],
                r["workload"],
                r["blocks"],
                r["tokens"],
                _tps(r, "pad_tokens_per_s"),
                _tps(r, "prepack_tokens_per_s"),
                _x(r["ratios"][0]),
                f"{m['pad']['largest_forward_slots']} ({m['pad']['largest_forward_padding']:.0%}) : "
                f"{m['prepack']['largest_forward_slots']} ({m['prepack']['largest_forward_padding']:.0%})",
                peak,
                f"{r['nll_rel_diff']:.1e}",
            ]
        )
    table = markdown_table(
        [
            "model",
            "workload",
            "blocks",
            "tokens",
            "pad tok/s",
            "prepack tok/s",
            "prepack / pad",
            "largest forward pad : prepack (padding)",
            "peak MiB pad : prepack",
            "NLL rel diff",
        ],
        rows,
    )
    return f"{header}\n\n{table}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", help="a preprocess output: use its held-out shards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-rows", type=int, default=64)
    p.add_argument("--budget", type=int, default=1024, help="prepack tokens per row")
    p.add_argument("--rows", type=int, default=None, help="synthetic blocks per workload")
    p.add_argument("--S", type=int, default=16, help="synthetic sentences per block")
    p.add_argument(
        "--repeats",
        type=int,
        default=MIN_REPEATS,
        help=f"interleaved repeats: median of N with min-max, ratios per repeat (default "
        f"{MIN_REPEATS}; fewer is a rehearsal, not a protocol figure)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out",
        type=Path,
        help="JSON path (default: benchmarks/results/eval[_quick].json, eval_job_<split>.json)",
    )
    p.add_argument("--job", metavar="EXPORT", help="time the Ray evaluation job of this export")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the in-process Ray")
    p.add_argument("--split", default="heldout", help="--job: the split of --data to score")
    p.add_argument("--actors", type=int, default=1, help="--job: scoring actors")
    p.add_argument(
        "--actor-threads", type=int, default=0, help="--job: torch threads per actor (0: auto)"
    )
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.job:
        if not args.data:
            raise SystemExit("--job needs --data OUT (a preprocess output with a held-out split)")
        job_vs_bare(args)
        return
    _repeats_note(args.repeats)
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
            r = measure(model, arch_cfg, name, table, args)
            results.append(r)
            print(f"{r['arch']} {name}: pad {_tps(r, 'pad_tokens_per_s')} tok/s, prepack "
                  f"{_tps(r, 'prepack_tokens_per_s')} tok/s, prepack/pad {_x(r['ratios'][0])}",
                  flush=True)  # fmt: skip

    md = report_markdown(
        results,
        f"{preset} ({args.device}), {args.batch_rows} blocks per call, budget {args.budget}; "
        f"median (min-max) of {args.repeats} interleaved repeats, ratios per repeat"
        + (" (smoke: fewer than 3)" if args.repeats < MIN_REPEATS else ""),
    )
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "timing": f"{args.repeats} interleaved repeats (order rotating) of pad and prepack per "
        "model and workload after a warm-up; tokens/s median (min-max); ratios per repeat",
        "repeats": args.repeats,
        "smoke": args.repeats < MIN_REPEATS,
        "model": cfg.to_dict(),
        "device": args.device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "results": results,
        "table": md,
    }
    path = write_result("eval_quick" if args.quick else "eval", out, args.out)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"written {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
