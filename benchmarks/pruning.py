"""Dynamic Context Pruning: how much context a GPTHF and its GPT baseline can drop, and what it
costs, at several sparsity weights lambda, against the same models fine-tuned without pruning.

    python benchmarks/pruning.py [--base runs/demo] [--work runs/pruning] [--steps 100]
        [--lambdas 0.0001,0.001,0.01,0.1] [--base-steps 150] [--gpu] [--out benchmarks/results/pruning.json]

One invocation, through the real pipeline (in-process Ray, Ray Train + DeepSpeed, Ray Data):

1. the sample corpus is preprocessed (the demo's tokenizer and split);
2. a base GPTHF-tiny and GPT-tiny are trained (``--base-steps``; reused when already there),
   or ``--base`` names a `gpthf demo` folder whose data and two trained models are used;
3. each base is fine-tuned ``--steps`` steps with ``--init-from`` the base export: once without
   pruning (the reference: same data, same steps) and once per lambda with ``--prune``;
4. every fine-tune is evaluated on the held-out split (``gpthf eval``, ``--pruning`` for the
   pruned ones): perplexity, kept fraction (what the gates keep, soft) and cache fraction
   (what an evicting cache holds: keep > 0, own keys included);
5. generation in ``kv`` mode from held-out-length prompts, pruned and unpruned interleaved:
   tokens/s and the cache bytes held per sequence at the end.

Writes JSON (``--out``), a markdown table beside it (``.md``) and a PNG of held-out perplexity
against the cache kept for both architectures (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 4096  # the demo's
HELDOUT = 0.05


def prepare_data(work: Path) -> Path:
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    corpus = ensure_sample_corpus()
    tok = work / "tokenizer.json"
    if not tok.exists():
        train_tokenizer([str(corpus)], str(tok), vocab_size=VOCAB, sample_bytes=20_000_000)
    out = work / "data"
    run_preprocess(
        PreprocessConfig(
            input=InputConfig(paths=[str(corpus)]),
            output=str(out),
            tokenizer=str(tok),
            packing=PackingConfig(heldout_fraction=HELDOUT),
            plot=False,
        )
    )
    return out


def train(data: Path, out: Path, preset: str, steps: int, args: argparse.Namespace, **kw: Any):
    from training.train.config import load_train_config
    from training.train.driver import run_training

    cfg = load_train_config(
        None,
        {
            "data.uri": str(data),
            "run.output": str(out),
            "model.preset": preset,
            "run.workers": 1,
            "run.gpu": args.gpu or None,
            "run.resume": True,  # a re-run reuses finished runs
            "deepspeed.zero_stage": 1,
            "deepspeed.micro_batch_rows": 4,
            "optim.total_steps": steps,
            "optim.warmup_steps": min(20, steps // 5),
            "optim.lr": args.lr,
            "run.checkpoint_every": steps,
            "run.eval_every": steps,
            "run.log_every": max(1, steps // 6),
            **kw,
        },
    )
    t0 = time.perf_counter()
    run_training(cfg)
    return time.perf_counter() - t0


def evaluate(data: Path, export: Path, out: Path, pruning: bool) -> dict[str, Any]:
    from training.eval.config import EvalConfig
    from training.eval.job import run_eval

    report = run_eval(
        EvalConfig(checkpoints=[str(export)], data=str(data), output=str(out), pruning=pruning)
    )
    (c,) = report.checkpoints
    t = c.total
    return {
        "heldout_token_ppl": t.token_perplexity,
        "kept_fraction": t.kept_fraction if pruning else 1.0,
        "cache_fraction": t.cache_fraction if pruning else 1.0,
        "eval_cache_bytes_per_position": c.cache_bytes(True) if pruning else None,
        "eval_cache_bytes_per_position_unpruned": c.cache_bytes(False) if pruning else None,
    }


def heldout_prompts(data: Path, n: int, tokens: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``n`` held-out blocks (whole sentences, EOS-S included)."""
    import pyarrow.parquet as pq

    from pipeline.manifest import read_manifest

    manifest = read_manifest(str(data))
    assert manifest is not None
    prompts: list[list[int]] = []
    for uri in manifest.shard_uris(str(data), "heldout"):
        for ids in pq.read_table(uri, columns=["input_ids"]).column("input_ids").to_pylist():
            if len(ids) >= tokens:
                prompts.append(ids[:tokens])
            if len(prompts) == n:
                return prompts
    if not prompts:
        raise SystemExit(f"no held-out block of {tokens} tokens: lower --prompt-tokens")
    return (prompts * n)[:n]


def generation(exports: dict[str, Path], prompts: list[list[int]], args: argparse.Namespace):
    """tokens/s (best of --repeats, the variants interleaved) and cache bytes per sequence."""
    import torch

    from training.export import load_export
    from training.generation.decode import generate

    device = "cuda" if args.gpu else "cpu"
    models = {k: load_export(str(p), device=device).model for k, p in exports.items()}
    best: dict[str, float] = {}
    cache: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = generate(
                model, prompts, max_new_tokens=args.new_tokens, mode="kv", stop_at_eod=False
            )
            if device == "cuda":
                torch.cuda.synchronize()
            rate = sum(map(len, r.tokens)) / (time.perf_counter() - t0)
            best[name] = max(best.get(name, 0.0), rate)
            cache[name] = r.cache_bytes["live"]
    return best, cache


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arch, rows in results.items():
        xs = [r["cache_fraction"] for r in rows]
        ys = [r["heldout_token_ppl"] for r in rows]
        ax.plot(xs, ys, "o-", label=arch)
        # Variants that prune nothing sit on the unpruned point: one label for them.
        labelled: set[tuple[float, float]] = set()
        for r in rows:
            at = (round(r["cache_fraction"], 3), round(r["heldout_token_ppl"], 1))
            if at in labelled:
                continue
            labelled.add(at)
            ax.annotate(
                r["variant"],
                (r["cache_fraction"], r["heldout_token_ppl"]),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=7,
            )
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("cache kept (fraction of the unpruned cache entries)")
    ax.set_ylabel("held-out token perplexity")
    ax.set_title("Dynamic Context Pruning: perplexity against context kept")
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.12)
    fig.savefig(path, dpi=120)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| arch | variant | lambda | held-out ppl | ppl / unpruned | kept (gates) | cache kept "
        "| gen cache bytes/seq | gen tok/s | tok/s / unpruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, rows in results.items():
        for r in rows:
            lines.append(
                f"| {arch} | {r['variant']} | {r['lambda']} | {r['heldout_token_ppl']:.2f} "
                f"| {r['ppl_ratio']:.3f} | {r['kept_fraction']:.3f} | {r['cache_fraction']:.3f} "
                f"| {r['gen_cache_bytes']:,.0f} | {r['gen_tokens_per_s']:.0f} "
                f"| {r['speed_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", default="runs/pruning", help="data and runs (re-runs reuse them)")
    ap.add_argument("--base", default=None, help="a `gpthf demo` workdir: its data and models")
    ap.add_argument("--pair", default="gpthf-tiny,gpt-tiny", help="a GPTHF preset and its GPT")
    ap.add_argument("--lambdas", default="0.0001,0.001,0.01,0.1")
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per variant")
    ap.add_argument("--delay", type=int, default=None, help="alpha = 1 steps (default steps/4)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-scale", type=float, default=1.0, help="pruning parameters' lr x")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/pruning.json")
    args = ap.parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    delay = args.steps // 4 if args.delay is None else args.delay

    import ray

    from training.train.driver import init_ray_for_training

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    init_ray_for_training()
    t_start = time.perf_counter()
    try:
        data = Path(args.base).absolute() / "data" if args.base else prepare_data(work)
        prompts = heldout_prompts(data, args.prompts, args.prompt_tokens)
        results: dict[str, list[dict[str, Any]]] = {}
        from training.model import ModelConfig

        for preset in args.pair.split(","):
            arch = ModelConfig.PRESETS[preset]["arch"]
            if args.base:
                base = Path(args.base).absolute() / f"train-{preset}"
            else:
                base = work / f"base-{preset}"
                train(data, base, preset, args.base_steps, args)
            variants: dict[str, tuple[float | None, Path]] = {}
            ref = work / f"ft-{preset}-unpruned-{args.steps}"
            seconds = {"unpruned": train(
                data, ref, preset, args.steps, args, **{"model.init_from": str(base / "export")}
            )}  # fmt: skip
            variants["unpruned"] = (None, ref)
            for lam in lambdas:
                name = f"lambda={lam:g}"
                out = work / f"ft-{preset}-prune-{lam:g}-{args.steps}-{delay}-{args.lr_scale:g}"
                seconds[name] = train(
                    data,
                    out,
                    preset,
                    args.steps,
                    args,
                    **{
                        "model.init_from": str(base / "export"),
                        "pruning.enabled": True,
                        "pruning.sparsity": lam,
                        "pruning.alpha_delay_steps": delay,
                        "pruning.lr_scale": args.lr_scale,
                    },
                )
                variants[name] = (lam, out)
            rates, cache = generation(
                {name: run / "export" for name, (_, run) in variants.items()}, prompts, args
            )
            rows = []
            for name, (lam, run) in variants.items():
                row = {
                    "variant": name,
                    "lambda": lam,
                    "run": str(run),
                    "finetune_s": seconds[name],
                    **evaluate(data, run / "export", run / "eval", pruning=lam is not None),
                    "gen_tokens_per_s": rates[name],
                    "gen_cache_bytes": cache[name],
                }
                rows.append(row)
            ref_row = rows[0]
            for row in rows:
                row["ppl_ratio"] = row["heldout_token_ppl"] / ref_row["heldout_token_ppl"]
                row["speed_ratio"] = row["gen_tokens_per_s"] / ref_row["gen_tokens_per_s"]
                row["gen_cache_ratio"] = row["gen_cache_bytes"] / ref_row["gen_cache_bytes"]
            results[arch] = rows
            print(table({arch: rows}), flush=True)
    finally:
        ray.shutdown()
    report = {
        "command": " ".join(sys.argv),
        "device": "cuda" if args.gpu else f"cpu ({os.cpu_count()} cores)",
        "settings": {
            **vars(args),
            "alpha_delay_steps": delay,
            "lambdas": lambdas,
            "prompt_tokens": args.prompt_tokens,
        },
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table(results))
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(f"[pruning] {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
