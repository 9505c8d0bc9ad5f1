"""Training step speed: forward + backward tokens/s of GPTHF against the GPT of equal size.

    .venv/bin/python benchmarks/train_step.py            # gpthf-8-4 vs gpt-12 (meant for a GPU)
    .venv/bin/python benchmarks/train_step.py --quick    # tiny models, a minute on a CPU

Both models get the same batches: packed blocks as the data pipeline writes them (exactly
``--sentences`` sentences per row, lengths ~ Poisson(25) capped at M=64, documents of
~``--doc-sentences`` sentences running across rows, or one long document per row),
through ``training.data.collate``. Our GPT attends each document as its own causal sequence
(documents gathered by length, fused SDPA, no T x T mask). The peer is Hugging Face's Llama of
the same shape holding the GPT's weights (``benchmarks/_peer.py``; causal over whole rows, as
SDPA Llama runs packed rows; skip it with ``--no-peer``). A step is
forward, cross-entropy over the labels, backward (no optimizer: it is the same for all).
tokens/s counts real (non-pad) tokens; best of ``--repeats`` timings of ``--steps`` steps,
the models timed in turn within each repeat.
``--attention sdpa flex`` times both backends of ``ModelConfig.attention`` (same weights): the
gathered-SDPA models are "gpt" and "gpthf", the FlexAttention ones "gpt/flex" and "gpthf/flex"
(CUDA only: flex has no backward on CPU; its compile happens in the warm-up).
``--profile`` prints the top operators of one step of each model (torch.profiler).
Results: ``benchmarks/results/train_step[_quick].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _peer
from training.data.collate import PackedBatch, collate_blocks
from training.model import ModelConfig, Transformer, build_model
from training.model.flops import train_step_flops


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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", help="GPTHF preset; the GPT is its equal-size baseline")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--batch", type=int, help="rows per batch (default 8; quick 4)")
    ap.add_argument("--sentences", type=int, nargs="+", help="sentences per row, one run each")
    ap.add_argument(
        "--doc-sentences",
        type=int,
        nargs="+",
        default=[20, 0],
        help="mean sentences per document, one run each (0: every row is one long document)",
    )
    ap.add_argument("--steps", type=int, help="timed steps (default 10; quick 3)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N, models in turn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, help="CPU threads (default: 1 with --quick, robust on a shared box)"
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face Llama peer")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=["sdpa"],
        choices=["sdpa", "flex"],
        help="attention backends to time, each as its own GPT and GPTHF (ModelConfig.attention)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

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
    hf_cfg = ModelConfig.preset(preset, vocab_size=args.vocab_size)
    models: dict[str, Any] = {}
    for attention in backends:
        for cfg in (hf_cfg, hf_cfg.baseline()):
            torch.manual_seed(0)  # the same weights for every backend
            cfg = dataclasses.replace(cfg, attention=attention)
            models[model_key(cfg.arch, attention)] = build_model(cfg).to(device).train()
    # The backend the peer and the GPT / Llama ratio are measured against.
    base = "sdpa" if "sdpa" in backends else backends[0]
    gpt = models[model_key("gpt", base)]
    peer_diff = None
    if not args.no_peer and _peer.available():
        models["llama"] = _peer.llama_peer(gpt)
        probe = torch.randint(3, hf_cfg.vocab_size, (2, 64), device=device)
        peer_diff = _peer.check_same_function(gpt, models["llama"], probe, atol=1e-3)
    elif not args.no_peer:
        print("# transformers is not installed: no Llama peer (pip install -e '.[hf]')")
    print(f"# {preset} vs its GPT baseline, {gpt.num_parameters() / 1e6:.1f}M params, "
          f"batch {batch}, {device}{' bf16 autocast' if autocast else ' fp32'}, "
          f"attention {' '.join(backends)}", flush=True)  # fmt: skip

    results = []
    for n_sent, doc_sent in [(n, d) for d in args.doc_sentences for n in sentence_counts]:
        rows = make_rows(batch * steps, n_sent, doc_sent, hf_cfg, seed=n_sent)
        batches = [
            collate_blocks(rows[i : i + batch], pad_id=hf_cfg.pad_id).to(device)
            for i in range(0, len(rows), batch)
        ]
        tokens = sum(b.num_tokens for b in batches)
        entry: dict[str, Any] = {
            "sentences_per_row": n_sent,
            "doc_sentences": doc_sent,
            "T": batches[0].input_ids.shape[1],
        }
        # Round robin: every repeat times each model once, so a slow spell of a shared machine
        # costs all of them alike instead of whichever model happened to run then.
        # Flex is compiled: a new T recompiles (the second makes T dynamic), so its warm-up sees
        # every shape of the timed batches, and no compile falls inside a timing.
        shapes = list({b.input_ids.shape: b for b in batches}.values())
        for model in models.values():
            flex = isinstance(model, Transformer) and model.config.attention == "flex"
            for b in shapes if flex else batches[:1]:
                step(model, b, autocast)  # warm-up
        best = dict.fromkeys(models, float("inf"))
        for _ in range(args.repeats):
            for arch, model in models.items():
                _sync(device)
                t0 = time.perf_counter()
                for b in batches:
                    step(model, b, autocast)
                _sync(device)
                best[arch] = min(best[arch], time.perf_counter() - t0)
        for arch, model in models.items():
            config = model.config if isinstance(model, Transformer) else gpt.config
            flops = train_step_flops(config, documents_of(rows)).total  # attended FLOPs
            entry[arch] = {
                "tokens_per_s": tokens / best[arch],
                "seconds": best[arch],
                "flops_per_token": flops / tokens,
            }
            print(
                f"  S={n_sent} docs~{doc_sent} T={entry['T']} {arch}: "
                f"{tokens / best[arch]:,.0f} tok/s",
                flush=True,
            )
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if device.type == "cuda" else []
                )
                with profile(activities=acts) as prof:
                    step(model, batches[0], autocast)
                    _sync(device)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15))
        for attention in backends:
            hf_tps, gpt_tps = (
                entry[model_key(a, attention)]["tokens_per_s"] for a in ("gpthf", "gpt")
            )
            entry[speedup_key(attention)] = hf_tps / gpt_tps
            if attention != "sdpa" and "sdpa" in backends:  # this backend against gathered SDPA
                for a in ("gpthf", "gpt"):
                    entry[model_key(a, attention)]["vs_sdpa"] = (
                        entry[model_key(a, attention)]["tokens_per_s"] / entry[a]["tokens_per_s"]
                    )
        gpt_entry, hf_entry = entry[model_key("gpt", base)], entry[model_key("gpthf", base)]
        entry["flops_ratio"] = gpt_entry["flops_per_token"] / hf_entry["flops_per_token"]
        if "llama" in entry:
            entry["gpt_vs_llama"] = gpt_entry["tokens_per_s"] / entry["llama"]["tokens_per_s"]
        results.append(entry)

    report: dict[str, Any] = {
        "protocol": "quick" if args.quick else "full",
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
        "results": results,
        "goals": {
            "gpthf_at_flop_ratio": {
                "goal": "GPTHF speedup over our GPT >= their FLOP ratio",
                **{
                    ("met" if a == "sdpa" else f"met/{a}"): all(
                        r[speedup_key(a)] >= r["flops_ratio"] for r in results
                    )
                    for a in backends
                },
            },
            "gpt_vs_llama": {
                "goal": 1.0,
                "min": min(
                    (r["gpt_vs_llama"] for r in results if "gpt_vs_llama" in r), default=None
                ),
                "met": all(r.get("gpt_vs_llama", 0) >= 1.0 for r in results)
                if "llama" in models
                else None,
            },
        },
    }
    out = (
        args.out
        or Path(__file__).parent / "results" / f"train_step{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    # Columns per backend: "GPT tok/s" for sdpa (the table as before), "GPT flex tok/s" for flex.
    suffix = {a: "" if a == "sdpa" else f" {a}" for a in backends}
    head = ["sentences/row", "sentences/doc", "T", "Llama tok/s"]
    head += [f"{m}{suffix[a]} tok/s" for a in backends for m in ("GPT", "GPTHF")]
    head += ["GPT / Llama", *(f"GPTHF / GPT{suffix[a]}" for a in backends), "GPT/GPTHF FLOPs"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        docs = r["doc_sentences"] or "one doc/row"
        llama = f"{r['llama']['tokens_per_s']:,.0f}" if "llama" in r else "-"
        vs = f"{r['gpt_vs_llama']:.2f}x" if "gpt_vs_llama" in r else "-"
        cells = [str(r["sentences_per_row"]), str(docs), str(r["T"]), llama]
        cells += [
            f"{r[model_key(m, a)]['tokens_per_s']:,.0f}" for a in backends for m in ("gpt", "gpthf")
        ]
        cells += [vs, *(f"{r[speedup_key(a)]:.2f}x" for a in backends), f"{r['flops_ratio']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, g in report["goals"].items():
        print(f"- {name}: {json.dumps(g)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
