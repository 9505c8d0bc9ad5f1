"""Dynamic Context Pruning: how much context a GPTHF and its GPT baseline can drop, and what it
costs, at several sparsity weights lambda, against the same models fine-tuned without pruning.

    python benchmarks/pruning.py                 # the thorough run (4 lambdas, 100 steps; long)
    python benchmarks/pruning.py --quick         # smoke level: 1 lambda, few steps (< 10 min)
    python benchmarks/pruning.py --base runs/demo [--lambdas 0.001,0.01] [--steps 100] [--gpu]

One invocation, through the real pipeline (in-process Ray, Ray Train + DeepSpeed, Ray Data):

1. the sample corpus is preprocessed (the demo's tokenizer and split);
2. a base GPTHF-tiny and GPT-tiny are trained (``--base-steps``; reused when already there),
   or ``--base`` names a `gpthf demo` folder whose data and two trained models are used;
3. each base is fine-tuned ``--steps`` steps with ``--init-from`` the base export: once without
   pruning (the reference: same data, same steps) and once per lambda with ``--prune``;
4. every fine-tune is evaluated on the held-out split (``gpthf eval``, ``--pruning`` for the
   pruned ones): perplexity, kept fraction (what the gates keep) and cache fraction (what an
   evicting cache holds: keep > 0, own keys included), under the step rule (the paper's
   inference rule and gpthf's default: keep iff the gate logit is > 0) and again under the
   soft rule (the gate at the final alpha), with the step / soft perplexity ratio;
5. generation in ``kv`` mode under the benchmark protocol (``benchmarks/protocol.py``), with
   equal work: every variant of an architecture (unpruned, each lambda) decodes the *same*
   tokens, a held-out continuation fed in place of the sampled ones (teacher forcing,
   ``generate(force_tokens=...)``; pruned models under the step rule), so the variants
   differ only in what their caches hold and evict. Left to sample, the variants write
   different text (other sentence lengths, other stops), and their speeds and cache sizes
   would compare unequal work. The variants run in turn within each repeat, the order rotating; ``same_work`` asserts that every timed run fed
   the same prompt tokens and the same new tokens (a checksum of the sequences). Per variant:
   decode tokens/s and prefill seconds apart (median, min-max), the speed ratio pruned /
   unpruned per repeat (median, min-max), and the cache bytes held per sequence at the end.

Writes ``benchmarks/results/pruning.json`` (``pruning_quick.json`` with ``--quick``; or
``--out``) with the environment, a markdown table beside it (``.md``) and a PNG of held-out
perplexity against the cache kept for both architectures (``.png``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.protocol import (
    MIN_REPEATS,
    RESULTS,
    Run,
    Samples,
    Spread,
    interleave,
    markdown_table,
    ratio,
    same_work,
    write_result,
)

if TYPE_CHECKING:
    from training.model import Transformer

VOCAB = 4096  # the demo's
HELDOUT = 0.05
REFERENCE = "unpruned"

# The thorough run, and the smoke-level one (--quick): fewer and shorter fine-tunes, one
# lambda (large enough that a short fine-tune drops something), shorter generation.
THOROUGH = dict(
    lambdas="0.0001,0.001,0.01,0.1",
    base_steps=150,
    steps=100,
    prompts=8,
    prompt_tokens=160,
    new_tokens=96,
    repeats=5,
)
QUICK = dict(
    lambdas="0.1",
    base_steps=40,
    steps=30,
    prompts=4,
    prompt_tokens=96,
    new_tokens=48,
    repeats=MIN_REPEATS,
)


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


def train(
    data: Path, out: Path, preset: str, steps: int, args: argparse.Namespace, **kw: Any
) -> float:
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
    """Held-out scores of one fine-tune; a pruned one under the step rule (the default, the
    paper's) and again under the soft rule (``*_soft``), with the step / soft perplexity."""
    from training.eval.config import EvalConfig
    from training.eval.job import run_eval

    def score(rule: str) -> Any:
        cfg = EvalConfig(
            checkpoints=[str(export)],
            data=str(data),
            output=str(out if rule == "step" else out.with_name(out.name + "-soft")),
            pruning=pruning,
            prune_rule=rule,  # type: ignore[arg-type]
        )
        return run_eval(cfg).checkpoints[0]

    c = score("step")
    t = c.total
    row = {
        "heldout_token_ppl": t.token_perplexity,
        "kept_fraction": t.kept_fraction if pruning else 1.0,
        "cache_fraction": t.cache_fraction if pruning else 1.0,
        "eval_cache_bytes_per_position": c.cache_bytes(True) if pruning else None,
        "eval_cache_bytes_per_position_unpruned": c.cache_bytes(False) if pruning else None,
    }
    if pruning:
        soft = score("soft").total
        row |= {
            "heldout_token_ppl_soft": soft.token_perplexity,
            "kept_fraction_soft": soft.kept_fraction,
            "cache_fraction_soft": soft.cache_fraction,
            "ppl_step_over_soft": t.token_perplexity / soft.token_perplexity,
        }
    return row


def heldout_text(
    data: Path, n: int, prompt_tokens: int, new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` held-out blocks of at least ``prompt_tokens + new_tokens`` tokens: the first
    ``prompt_tokens`` of each as a prompt, the next ``new_tokens`` as the continuation every
    variant decodes (whole sentences, EOS-S included, as the data holds them)."""
    import pyarrow.parquet as pq

    from pipeline.manifest import read_manifest

    manifest = read_manifest(str(data))
    if manifest is None:
        raise SystemExit(f"{data}: no manifest; run `gpthf preprocess` (or drop --base)")
    need = prompt_tokens + new_tokens
    blocks: list[list[int]] = []
    for uri in manifest.shard_uris(str(data), "heldout"):
        for ids in pq.read_table(uri, columns=["input_ids"]).column("input_ids").to_pylist():
            if len(ids) >= need:
                blocks.append(ids[:need])
            if len(blocks) == n:
                break
        if len(blocks) == n:
            break
    if len(blocks) < n:
        raise SystemExit(
            f"{len(blocks)} held-out blocks of {need} tokens, {n} wanted: lower --prompts, "
            "--prompt-tokens or --new-tokens"
        )
    return [b[:prompt_tokens] for b in blocks], [b[prompt_tokens:] for b in blocks]


def checksum(sequences: Sequence[Sequence[int]]) -> int:
    """A CRC-32 of token sequences: equal for the variants that decoded the same tokens."""
    crc = 0
    for seq in sequences:
        crc = zlib.crc32(b",".join(str(t).encode() for t in seq) + b";", crc)
    return crc


def decode_side(
    model: Transformer,
    prompts: list[list[int]],
    continuation: list[list[int]],
    last: dict[str, Any],
    name: str,
) -> Callable[[], Run]:
    """One timed ``generate`` call (``kv``, teacher-forced on ``continuation``): its work is the
    prompt tokens read, the tokens decoded and a checksum of the sequences; the prefill and
    decode seconds travel apart; ``last[name]`` keeps the result."""
    import torch

    from training.generation.decode import generate

    device = model.embed.weight.device
    new = len(continuation[0])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def side() -> Run:
        sync()
        t0 = time.perf_counter()
        r = generate(
            model,
            prompts,
            max_new_tokens=new,
            mode="kv",
            stop_at_eod=False,
            suppress_tokens=(model.config.eod_id,),
            force_tokens=continuation,
        )
        sync()
        seconds = time.perf_counter() - t0
        last[name] = r
        work = {
            "rows": len(prompts),
            "prompt_tokens": sum(map(len, prompts)),
            "new_tokens": sum(map(len, r.tokens)),
            "sequences_crc32": checksum(r.sequences),
        }
        return Run(
            seconds, work, {"prefill_s": r.seconds["prefill"], "decode_s": r.seconds["decode"]}
        )

    return side


def _phase(s: Samples, key: str) -> Samples:
    """The same repeats timed by one phase (``prefill_s`` or ``decode_s``)."""
    return Samples(s.name, [Run(r.extra[key], r.work) for r in s.runs])


def generation(
    models: Mapping[str, Transformer],
    prompts: list[list[int]],
    continuation: list[list[int]],
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every variant (the first is the reference) decodes the same continuation of the same
    prompts, interleaved over ``repeats`` after a warm-up; asserts the same work, then per
    variant: decode tokens/s, prefill seconds, ratios to the reference per repeat (speed,
    pruned / unpruned), cache bytes per sequence at the end and what the caches evicted."""
    last: dict[str, Any] = {}
    sides = {n: decode_side(m, prompts, continuation, last, n) for n, m in models.items()}
    t = interleave(sides, repeats, warmup=True, log=log)
    names = list(t)
    same_work(t, *names)  # the same prompts, the same tokens decoded, the same sequences
    ref = names[0]
    phases = {k: {n: _phase(t[n], k) for n in names} for k in ("prefill_s", "decode_s")}
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        s, r = t[n], last[n]
        decoded = int(s.work["new_tokens"] - s.work["rows"])  # the first token is the prefill's
        row: dict[str, Any] = {
            "work": dict(s.work),
            "decode_tokens_per_s": Spread.of(
                [decoded / x for x in phases["decode_s"][n].seconds]
            ).to_dict(),
            "prefill_s": Spread.of(phases["prefill_s"][n].seconds).to_dict(),
            "call_s": Spread.of(s.seconds).to_dict(),
            "repeats_s": [round(x, 6) for x in s.seconds],
            "cache_bytes_live": r.cache_bytes["live"],
            "cache_bytes_allocated": r.cache_bytes["allocated"],
            "cache_bytes_live_ratio": r.cache_bytes["live"] / last[ref].cache_bytes["live"],
            "matches_continuation": [a == b for a, b in zip(r.tokens, continuation, strict=True)],
            "forced_sentence_ends": sum(r.forced_ends),
            "evicted": r.pruning.evicted_total if r.pruning else 0,
            "kept_per_layer": r.pruning.kept if r.pruning else None,
        }
        if n != ref:  # speed pruned / unpruned: unpruned seconds over pruned, per repeat
            row["decode_speed_ratio"] = ratio(phases["decode_s"], n, ref).to_dict()
            row["prefill_speed_ratio"] = ratio(phases["prefill_s"], n, ref).to_dict()
            row["call_speed_ratio"] = ratio(t, n, ref).to_dict()
        out[n] = row
    return out


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


def _spread(d: Mapping[str, Any], nd: int = 2, scale: float = 1.0) -> str:
    return f"{d['median'] * scale:.{nd}f} ({d['low'] * scale:.{nd}f}-{d['high'] * scale:.{nd}f})"


def _ratio(d: Mapping[str, Any] | None) -> str:
    return "1 (reference)" if d is None else _spread(d) + "x"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    headers = [
        "arch", "variant", "held-out ppl", "ppl / unpruned", "kept (gates)", "cache kept (eval)",
        "soft rule: ppl, kept", "step / soft ppl",
        "gen cache bytes/seq", "/ unpruned", "decode tok/s", "decode speed / unpruned",
        "prefill ms", "prefill speed / unpruned",
    ]  # fmt: skip
    rows = []
    for arch, variants in results.items():
        for r in variants:
            g = r["generation"]
            rows.append(
                [
                    arch,
                    r["variant"],
                    f"{r['heldout_token_ppl']:.2f}",
                    f"{r['ppl_ratio']:.3f}",
                    f"{r['kept_fraction']:.3f}",
                    f"{r['cache_fraction']:.3f}",
                    f"{r['heldout_token_ppl_soft']:.2f}, {r['kept_fraction_soft']:.3f}"
                    if "heldout_token_ppl_soft" in r
                    else "-",
                    f"{r['ppl_step_over_soft']:.4f}" if "ppl_step_over_soft" in r else "-",
                    f"{g['cache_bytes_live']:,.0f}",
                    f"{g['cache_bytes_live_ratio']:.3f}",
                    _spread(g["decode_tokens_per_s"], 0),
                    _ratio(g.get("decode_speed_ratio")),
                    _spread(g["prefill_s"], 1, 1e3),
                    _ratio(g.get("prefill_speed_ratio")),
                ]
            )
    return markdown_table(headers, rows)


def report_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    head = [
        "**Smoke-level measurement** (`--quick`: one lambda, short fine-tunes, short generation):"
        " it checks that the benchmark runs, its figures are not results."
        if report["quick"]
        else "Thorough run.",
        "",
        f"Fine-tunes of {s['steps']} steps from bases of {s['base_steps']} steps, lambdas "
        f"{s['lambdas']}. Generation (`kv`, {report['device']}): {s['prompts']} held-out prompts "
        f"of {s['prompt_tokens']} tokens, each variant teacher-forced on the same "
        f"{s['new_tokens']}-token held-out continuation (equal work, checked); median (min-max) "
        f"of {s['repeats']} interleaved repeats; speed ratios pruned / unpruned per repeat "
        "(>1: the pruned model is faster); cache bytes per sequence at the end. Wall time of "
        f"the whole run: {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(head) + "\n" + table(report["results"]) + "\n"


def _strict(x: Any) -> Any:
    """NaN and infinities as null (the result file is strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict(v) for v in x]
    return x


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke level: 1 lambda, short runs (< 10 min)"
    )
    ap.add_argument("--work", default=None, help="data and runs (re-runs reuse them)")
    ap.add_argument("--base", default=None, help="a `gpthf demo` workdir: its data and models")
    ap.add_argument("--pair", default="gpthf-tiny,gpt-tiny", help="a GPTHF preset and its GPT")
    # Defaults: the thorough run's, or with --quick the smoke level's (THOROUGH, QUICK).
    ap.add_argument("--lambdas", help="comma-separated sparsity weights")
    ap.add_argument("--base-steps", type=int, help="steps of the base models trained first")
    ap.add_argument("--steps", type=int, help="fine-tuning steps per variant")
    ap.add_argument("--delay", type=int, default=None, help="alpha = 1 steps (default steps/4)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-scale", type=float, default=1.0, help="pruning parameters' lr x")
    ap.add_argument("--prompts", type=int, help="held-out prompts, decoded as one batch")
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--new-tokens", type=int, help="tokens every variant decodes per prompt")
    ap.add_argument("--repeats", type=int, help=f"interleaved repeats, at least {MIN_REPEATS}")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/pruning[_quick].json")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else THOROUGH).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < MIN_REPEATS:
        ap.error(f"--repeats must be >= {MIN_REPEATS} (the protocol's median and spread)")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the first new token is the prefill's)")
    args.work = args.work or ("runs/pruning-quick" if args.quick else "runs/pruning")
    return args


def main() -> None:
    args = parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    delay = args.steps // 4 if args.delay is None else args.delay
    name = "pruning_quick" if args.quick else "pruning"
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"

    import ray
    import torch

    from training.export import load_export
    from training.model import ModelConfig
    from training.train.driver import init_ray_for_training

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.gpu else "cpu"
    init_ray_for_training()
    t_start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        data = Path(args.base).absolute() / "data" if args.base else prepare_data(work)
        prompts, continuation = heldout_text(
            data, args.prompts, args.prompt_tokens, args.new_tokens
        )
        for preset in args.pair.split(","):
            arch = ModelConfig.PRESETS[preset]["arch"]
            if args.base:
                base = Path(args.base).absolute() / f"train-{preset}"
            else:
                base = work / f"base-{preset}-{args.base_steps}"
                train(data, base, preset, args.base_steps, args)
            init = {"model.init_from": str(base / "export")}
            ref = work / f"ft-{preset}-unpruned-{args.steps}"
            runs: dict[str, tuple[float | None, Path, float]] = {
                REFERENCE: (None, ref, train(data, ref, preset, args.steps, args, **init))
            }
            for lam in lambdas:
                run = work / f"ft-{preset}-prune-{lam:g}-{args.steps}-{delay}-{args.lr_scale:g}"
                seconds = train(
                    data, run, preset, args.steps, args, **init,
                    **{
                        "pruning.enabled": True,
                        "pruning.sparsity": lam,
                        "pruning.alpha_delay_steps": delay,
                        "pruning.lr_scale": args.lr_scale,
                    },
                )  # fmt: skip
                runs[f"lambda={lam:g}"] = (lam, run, seconds)
            models = {  # the pruned ones under the step rule, as `gpthf generate` runs them
                v: load_export(str(r / "export"), device=device).model
                for v, (_, r, _) in runs.items()
            }
            for m in models.values():
                if m.config.prune:
                    m.use_prune_rule("step")
            print(f"# {arch}: generation, {len(models)} variants interleaved", file=sys.stderr)
            gen = generation(models, prompts, continuation, args.repeats)
            rows = []
            for v, (weight, run, seconds) in runs.items():
                rows.append(
                    {
                        "variant": v,
                        "lambda": weight,
                        "run": str(run),
                        "finetune_s": seconds,
                        **evaluate(data, run / "export", run / "eval", pruning=weight is not None),
                        "generation": gen[v],
                    }
                )
            for row in rows:
                row["ppl_ratio"] = row["heldout_token_ppl"] / rows[0]["heldout_token_ppl"]
            results[arch] = rows
            print(table({arch: rows}), flush=True)
    finally:
        ray.shutdown()
    report: dict[str, Any] = {
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if args.gpu else "cpu",
        "settings": {**vars(args), "alpha_delay_steps": delay, "lambdas": lambdas},
        "equal_work": "every variant of an architecture decodes the same held-out continuation "
        "(teacher-forced), checked per repeat by same_work (prompt tokens, new tokens, "
        "CRC-32 of the sequences)",
        "timing": f"{args.repeats} interleaved repeats (order rotating) after a warm-up; median "
        "(min-max); ratios per repeat, speed pruned / unpruned",
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    path = write_result(name, _strict(report), out)
    md = report_markdown(report)
    path.with_suffix(".md").write_text(md)
    plot(results, path.with_suffix(".png"))
    print(md)
    print(f"[pruning] {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
