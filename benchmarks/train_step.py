"""Training step speed: forward + backward tokens/s of GPTHF against the GPT of equal size.

    .venv/bin/python benchmarks/train_step.py            # gpthf-8-4 vs gpt-12 (meant for a GPU)
    .venv/bin/python benchmarks/train_step.py --quick    # tiny models, about a minute on a CPU

Both models get the same batches: packed blocks as the data pipeline writes them (exactly
``--sentences`` sentences per row, lengths ~ Poisson(25) capped at M=64, documents of
~``--doc-sentences`` sentences running across rows, or one long document per row),
through ``training.data.collate``. Our GPT attends each document as its own causal sequence
(documents gathered by length, fused SDPA, no T x T mask). The peer is Hugging Face's Llama of
the same shape holding the GPT's weights (``benchmarks/_peer.py``; causal over whole rows, as
SDPA Llama runs packed rows; skip it with ``--no-peer``). A step is
forward, cross-entropy over the labels, backward (no optimizer: it is the same for all).

Timing follows the benchmark protocol (``benchmarks/protocol.py``): at every point (sentences
per row x sentences per document) each side (every model of every ``--attention`` backend,
and the peer) is warmed up, then timed over the same ``--steps`` batches, the sides in turn
within each of ``--repeats`` repeats (at least 3), the order rotating each repeat. A side's
tokens/s (real, non-pad tokens) is the median over the repeats with its min-max; a ratio
(GPTHF / GPT, GPT / Llama, flex / sdpa) is taken per repeat, from runs moments apart, and
reported as the median with its min-max, after asserting both sides processed the same tokens.

Equal work only: the peer has no per-document mask, so on rows of several documents it attends
T x T over the whole row where our GPT attends each document alone: more work, and a different
function. There the peer is still timed (an interleaved side like the others) but reported as
"not comparable: the peer attends across documents", and enters no ratio and no goal. GPT /
Llama is taken only at points whose rows are each one document (always so with
``--doc-sentences 0``), where both compute the same function and the same FLOPs (asserted).

FLOPs per token (attended, real tokens; ``training.model.flops`` conventions): ours from
``train_step_flops`` over the documents; the peer's counted from its own ``LlamaConfig``
(layers, hidden, intermediate, heads, KV heads, head dim, vocab) with causal attention over
each whole row (:func:`peer_train_flops`), not from our model.

``--attention sdpa flex`` times both backends of ``ModelConfig.attention`` (same weights): the
gathered-SDPA models are "gpt" and "gpthf", the FlexAttention ones "gpt/flex" and "gpthf/flex"
(CUDA only: flex has no backward on CPU; its compile happens in the warm-up).
``--profile`` prints the top operators of one step of each model (torch.profiler).
Results: ``benchmarks/results/train_step[_quick].json`` (``protocol.write_result``: with the
environment, commit and versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _peer
from benchmarks.protocol import (
    MIN_REPEATS,
    Ratio,
    Run,
    Samples,
    Spread,
    interleave,
    markdown_table,
    ratio,
    same_work,
    write_result,
)
from training.data.collate import PackedBatch, collate_blocks
from training.model import ModelConfig, Transformer, build_model
from training.model.flops import train_step_flops

NOT_COMPARABLE = "not comparable: the peer attends across documents"


def make_rows(
    n_rows: int, sentences: int, doc_sentences: int, c: ModelConfig, seed: int
) -> list[dict[str, Any]]:
    """Packed rows; documents of ~Geometric(doc_sentences) sentences (0: one endless document)."""
    rng = np.random.default_rng(seed)
    rows = []

    def doc_length() -> int:
        return int(rng.geometric(1 / doc_sentences)) if doc_sentences else 1 << 62

    doc_left = doc_length()
    for _ in range(n_rows):
        lengths = np.clip(rng.poisson(25, sentences), 2, c.max_sentence_tokens)
        doc_index, doc = [], 0
        for _ in range(sentences):
            if doc_left == 0:
                doc, doc_left = doc + 1, doc_length()
            doc_index.append(doc)
            doc_left -= 1
        ids = rng.integers(3, c.vocab_size, int(lengths.sum()))
        ids[np.cumsum(lengths) - 1] = c.eos_id
        rows.append(
            {"input_ids": ids, "sentence_lengths": lengths, "document_index": np.array(doc_index)}
        )
    return rows


def documents_of(rows: list[dict[str, Any]]) -> list[list[int]]:
    docs = []
    for r in rows:
        for d in np.unique(r["document_index"]):
            docs.append(r["sentence_lengths"][r["document_index"] == d].tolist())
    return docs


def peer_train_flops(cfg: Any, rows: list[dict[str, Any]]) -> int:
    """Training-step FLOPs (3x the forward) of the Llama peer, from its own ``LlamaConfig``.

    Per real token and layer: Q, K, V, O projections (grouped KV heads counted as configured)
    and the SwiGLU MLP of ``intermediate_size``; 4 x heads x head_dim per attended key, causal
    over the whole row (every earlier token of the row, across documents: what SDPA Llama
    attends on a packed row); the LM head at every position. Pad positions are left out, as
    in ``training.model.flops``."""
    d, n_layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    linear = 2 * (d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size)
    per_key = 4 * heads * head_dim
    total = 0
    for r in rows:
        t = int(np.sum(r["sentence_lengths"]))
        total += n_layers * (t * linear + per_key * t * (t + 1) // 2) + 2 * d * vocab * t
    return 3 * total


def one_document_per_row(rows: list[dict[str, Any]]) -> bool:
    return all(len(np.unique(r["document_index"])) == 1 for r in rows)


def step(model: Any, b: PackedBatch, autocast: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        if isinstance(model, Transformer):
            logits = model(b.input_ids, b.sentence_ids, b.document_ids)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten())
        else:
            loss = _peer.peer_loss(model, b.input_ids, b.labels)
    loss.backward()
    model.zero_grad(set_to_none=True)


def model_key(arch: str, attention: str) -> str:
    """Result key of a model: "gpt", "gpthf" for sdpa (as before the option); "gpt/flex"..."""
    return arch if attention == "sdpa" else f"{arch}/{attention}"


def speedup_key(attention: str) -> str:
    return "speedup" if attention == "sdpa" else f"speedup/{attention}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_side(
    model: Any, batches: list[PackedBatch], work: dict[str, int], device: torch.device, ac: bool
) -> Callable[[], Run]:
    """One side: every batch of the point, one step each; ``work`` is what it processes."""

    def run() -> Run:
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            step(model, b, ac)
        _sync(device)
        return Run(time.perf_counter() - t0, work)

    return run


def side_entry(s: Samples, flops_per_token: float) -> dict[str, Any]:
    tps = s.rate("tokens")
    return {
        "tokens_per_s": tps.median,
        "tokens_per_s_min": tps.low,
        "tokens_per_s_max": tps.high,
        "seconds": Spread.of(s.seconds).median,
        "repeats_s": [round(x, 5) for x in s.seconds],
        "flops_per_token": flops_per_token,
        "work": dict(s.work),
    }


def _tps(e: dict[str, Any]) -> str:
    return f"{e['tokens_per_s']:,.0f} ({e['tokens_per_s_min']:,.0f}-{e['tokens_per_s_max']:,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="gpthf-tiny, batch 2, 2 steps, 40 sentences/row, 1 CPU thread on a CPU",
    )
    ap.add_argument(
        "--preset",
        help="GPTHF preset; the GPT is its equal-size baseline (default gpthf-8-4; quick "
        "gpthf-tiny)",
    )
    ap.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary of both models (default 8192)"
    )
    ap.add_argument("--batch", type=int, help="rows per batch (default 8; quick 2)")
    ap.add_argument(
        "--sentences",
        type=int,
        nargs="+",
        help="sentences per row, one point each (default 40 80 160; quick 40)",
    )
    ap.add_argument(
        "--doc-sentences",
        type=int,
        nargs="+",
        default=[20, 0],
        help="mean sentences per document, one point each (default 20 0; 0: every row is one "
        "long document, the only rows where the peer is compared)",
    )
    ap.add_argument("--steps", type=int, help="timed steps per side (default 10; quick 2)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=MIN_REPEATS,
        help=f"interleaved repeats, median and min-max (default {MIN_REPEATS}, the protocol's "
        "minimum; fewer makes a smoke run)",
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="(default cuda when available, else cpu)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: 1 with --quick on a CPU, robust on a shared box; else "
        "torch's default)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="top operators of one step of each model"
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face Llama peer")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=["sdpa"],
        choices=["sdpa", "flex"],
        help="attention backends to time, each as its own GPT and GPTHF (ModelConfig.attention; "
        "default sdpa)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="result JSON (default benchmarks/results/train_step[_quick].json)",
    )
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    device = torch.device(args.device)
    backends = list(dict.fromkeys(args.attention))  # in order, once each
    if "flex" in backends and device.type != "cuda":
        ap.error(
            f"--attention flex needs a CUDA device (this run's is {device}): FlexAttention's "
            "backward does not run on CPU; time --attention sdpa here"
        )
    if args.threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    autocast = device.type == "cuda"
    preset = args.preset or ("gpthf-tiny" if args.quick else "gpthf-8-4")
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (2 if args.quick else 10)
    sentence_counts = args.sentences or ([40] if args.quick else [40, 80, 160])
    smoke = args.repeats < MIN_REPEATS
    if smoke:
        print(
            f"# --repeats {args.repeats} < {MIN_REPEATS}, the protocol's minimum: a smoke run, "
            "not figures to quote",
            flush=True,
        )
    hf_cfg = ModelConfig.preset(preset, vocab_size=args.vocab_size)
    models: dict[str, Any] = {}
    for attention in backends:
        for cfg in (hf_cfg, hf_cfg.baseline()):
            torch.manual_seed(0)  # the same weights for every backend
            cfg = dataclasses.replace(cfg, attention=attention)
            models[model_key(cfg.arch, attention)] = build_model(cfg).to(device).train()
    # The backend the peer and the GPT / Llama ratio are measured against.
    base = "sdpa" if "sdpa" in backends else backends[0]
    gpt_key, hf_key = model_key("gpt", base), model_key("gpthf", base)
    gpt = models[gpt_key]
    peer_diff = None
    if not args.no_peer and _peer.available():
        models["llama"] = _peer.llama_peer(gpt)
        probe = torch.randint(3, hf_cfg.vocab_size, (2, 64), device=device)
        peer_diff = _peer.check_same_function(gpt, models["llama"], probe, atol=1e-3)
    elif not args.no_peer:
        print("# transformers is not installed: no Llama peer (pip install -e '.[hf]')")
    print(f"# {preset} vs its GPT baseline, {gpt.num_parameters() / 1e6:.1f}M params, "
          f"batch {batch}, {steps} steps, {args.repeats} interleaved repeats, {device}"
          f"{' bf16 autocast' if autocast else ' fp32'}, attention {' '.join(backends)}",
          flush=True)  # fmt: skip

    results = []
    for n_sent, doc_sent in [(n, d) for d in args.doc_sentences for n in sentence_counts]:
        rows = make_rows(batch * steps, n_sent, doc_sent, hf_cfg, seed=n_sent)
        batches = [
            collate_blocks(rows[i : i + batch], pad_id=hf_cfg.pad_id).to(device)
            for i in range(0, len(rows), batch)
        ]
        tokens = sum(b.num_tokens for b in batches)
        docs = documents_of(rows)
        equal_work = one_document_per_row(rows)
        entry: dict[str, Any] = {
            "sentences_per_row": n_sent,
            "doc_sentences": doc_sent,
            "T": batches[0].input_ids.shape[1],
            "tokens": tokens,
            "documents": len(docs),
            "one_document_per_row": equal_work,
        }
        flops: dict[str, int] = {}
        for key, model in models.items():
            if isinstance(model, Transformer):
                flops[key] = round(train_step_flops(model.config, docs).total)
            else:
                flops[key] = peer_train_flops(model.config, rows)
        # Flex is compiled: a new T recompiles (the second makes T dynamic), so its warm-up sees
        # every shape of the timed batches, and no compile falls inside a timing.
        shapes = list({b.input_ids.shape: b for b in batches}.values())
        for model in models.values():
            flex = isinstance(model, Transformer) and model.config.attention == "flex"
            for b in shapes if flex else batches[:1]:
                step(model, b, autocast)  # warm-up
        print(f"  S={n_sent} docs~{doc_sent} T={entry['T']}: {tokens} tokens", flush=True)
        samples = interleave(
            {
                key: timed_side(model, batches, {"tokens": tokens, "flops": flops[key]},
                                device, autocast)
                for key, model in models.items()
            },
            args.repeats,
        )  # fmt: skip
        same_work(samples, *models, keys=("tokens",))  # every side ran the same batches
        ratios: list[Ratio] = []
        for key in models:
            entry[key] = side_entry(samples[key], flops[key] / tokens)
        for attention in backends:
            r = ratio(samples, model_key("gpthf", attention), model_key("gpt", attention))
            entry[speedup_key(attention)] = r.spread.median
            ratios.append(r)
            if attention != "sdpa" and "sdpa" in backends:  # this backend against gathered SDPA
                for a in ("gpthf", "gpt"):
                    r = ratio(samples, model_key(a, attention), a)
                    entry[model_key(a, attention)]["vs_sdpa"] = r.spread.median
                    ratios.append(r)
        entry["flops_ratio"] = flops[gpt_key] / flops[hf_key]
        if "llama" in models:
            entry["llama"]["comparable"] = equal_work
            if equal_work:
                # One document per row: the peer computes our GPT's function, the same FLOPs.
                same_work(samples, gpt_key, "llama")
                r = ratio(samples, gpt_key, "llama")
                entry["gpt_vs_llama"] = r.spread.median
                ratios.append(r)
            else:
                entry["llama"]["note"] = NOT_COMPARABLE
        entry["ratios"] = [r.to_dict() for r in ratios]
        for key in models:
            e = entry[key]
            note = "" if e.get("comparable", True) else f"  ({NOT_COMPARABLE})"
            print(f"    {key}: {_tps(e)} tok/s{note}", flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if device.type == "cuda" else []
                )
                with profile(activities=acts) as prof:
                    step(models[key], batches[0], autocast)
                    _sync(device)
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=15))
        results.append(entry)

    compared = [r for r in results if "gpt_vs_llama" in r]
    lowest = [x["low"] for r in compared for x in r["ratios"] if x["base"] == "llama"]
    report: dict[str, Any] = {
        "protocol": "quick" if args.quick else "full",
        "timing": f"{args.repeats} interleaved repeats (order rotating) of {steps} steps per "
        "side after a warm-up; tokens/s median (min-max); ratios per repeat, median (min-max)",
        "repeats": args.repeats,
        "steps": steps,
        "smoke": smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if autocast else "fp32",
        "torch": torch.__version__,
        "gpthf_config": hf_cfg.to_dict(),
        "attention": backends,
        "batch": batch,
        "peer": "transformers LlamaForCausalLM (sdpa)" if "llama" in models else None,
        "peer_max_logit_diff": peer_diff,
        "peer_flops": "counted from the peer's LlamaConfig, causal over whole rows"
        if "llama" in models
        else None,
        "equal_work_rule": "GPT / Llama only at points whose rows are each one document "
        f"(always so with --doc-sentences 0); elsewhere the peer is timed but {NOT_COMPARABLE}",
        "results": results,
        "goals": {
            "gpthf_at_flop_ratio": {
                "goal": "GPTHF speedup over our GPT (median over repeats) >= their FLOP ratio",
                **{
                    ("met" if a == "sdpa" else f"met/{a}"): all(
                        r[speedup_key(a)] >= r["flops_ratio"] for r in results
                    )
                    for a in backends
                },
            },
            "gpt_vs_llama": {
                "goal": 1.0,
                "compared_on": "one-document rows only (equal work)",
                "points": len(compared),
                "min": min((r["gpt_vs_llama"] for r in compared), default=None),
                "lowest_repeat": min(lowest, default=None),
                "met": all(r["gpt_vs_llama"] >= 1.0 for r in compared) if compared else None,
            },
        },
    }
    out = write_result("train_step_quick" if args.quick else "train_step", report, out=args.out)

    suffix = {a: "" if a == "sdpa" else f" {a}" for a in backends}
    head = ["sentences/row", "sentences/doc", "T"]
    head += [f"{m}{suffix[a]} tok/s" for a in backends for m in ("GPT", "GPTHF")]
    head += ["Llama tok/s"] if "llama" in models else []
    rows_md = []
    for r in results:
        cells = [r["sentences_per_row"], r["doc_sentences"] or "one doc/row", r["T"]]
        cells += [_tps(r[model_key(m, a)]) for a in backends for m in ("gpt", "gpthf")]
        if "llama" in r:
            cells.append(_tps(r["llama"]) + ("" if r["llama"]["comparable"] else " (n/c)"))
        rows_md.append(cells)
    print("\ntokens/s, median (min-max) over the repeats; n/c: " + NOT_COMPARABLE + "\n")
    print(markdown_table(head, rows_md))

    names = {"gpt": "GPT", "gpthf": "GPTHF", "llama": "Llama"}

    def label(key: str) -> str:
        arch, _, att = key.partition("/")
        return names[arch] + (f" {att}" if att else "")

    pairs = list(dict.fromkeys((x["side"], x["base"]) for r in results for x in r["ratios"]))
    head = ["sentences/row", "sentences/doc", "T", "GPT/GPTHF FLOPs"]
    head += [f"{label(s)} / {label(b)}" for s, b in pairs]
    rows_md = []
    for r in results:
        by = {(x["side"], x["base"]): x for x in r["ratios"]}
        cells = [r["sentences_per_row"], r["doc_sentences"] or "one doc/row", r["T"]]
        cells.append(f"{r['flops_ratio']:.2f}x")
        for p in pairs:
            if p in by:
                x = by[p]
                cells.append(f"{x['median']:.2f}x ({x['low']:.2f}-{x['high']:.2f})")
            else:
                cells.append("n/c" if p[1] == "llama" else "-")
        rows_md.append(cells)
    print(
        "\nspeed ratios (times faster), per repeat: median (min-max); n/c: " + NOT_COMPARABLE
        + "\n"
    )  # fmt: skip
    print(markdown_table(head, rows_md))
    print()
    for name, g in report["goals"].items():
        print(f"- {name}: {json.dumps(g)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
