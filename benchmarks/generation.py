"""Generation speed: GPTHF (full, sentence-cache, kv) against the GPT of equal size (full, kv).

    .venv/bin/python benchmarks/generation.py            # the issue's protocol (meant for a GPU)
    .venv/bin/python benchmarks/generation.py --quick    # a few minutes on a CPU

Protocol (paper): (prompt, new tokens) in {(100,100), (100,250), (250,100), (250,250), (20,500),
(500,20)} at batch 1 and 32, greedy, plus long contexts (2048 and 8192 prompt tokens, batch 32;
batch 8 with ``--quick``).

The peer is Hugging Face's Llama of the GPT's shape holding the GPT's weights
(``benchmarks/_peer.py``), generating greedily through ``generate()`` with its default KV cache,
as a user would run it (``llama/kv``; skip it with ``--no-peer``). It makes the same number of
tokens (``min_new_tokens``); no sentence structure applies to it.

bf16 exactness (bf16 copies of the models, whatever ``--dtype`` times): for each cached mode, the largest
difference between its logits and the full forward's over the same tokens (teacher-forced on
the mode's own output), and the fraction of steps whose greedy token agrees.
Both models have random weights and see the same prompts. A random model with tied embeddings
tends to repeat its last token (after one EOS-S, EOS-S forever: one-token sentences), so the
benchmark suppresses EOS-S and end-of-document in sampling and lets the sentence cap end every
sentence: the cap is set to ``--sentence-len`` (25, a typical English sentence in BPE tokens)
and prompts are cut into sentences of 13-37 tokens. Every row makes exactly the requested
number of tokens, and GPTHF works at a realistic, fixed sentence length.

Reported per point and mode: tokens/s (new tokens over the wall time of the whole ``generate``
call, prefill included), decode tokens/s (after the first new token, i.e. without the prefill),
analytic FLOPs per token (``training.model.flops``), and cache bytes per sequence at the end (live
slots, and allocated). Ratios are taken within this one run. Results: ``benchmarks/results/generation[_quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _peer
from training.generation.decode import MODES, generate, sentence_ids_for
from training.model import ModelConfig, Transformer, build_model
from training.model.flops import decode_flops, prefill_flops

FULL = dict(
    preset="gpthf-8-4",
    pairs=[(100, 100), (100, 250), (250, 100), (250, 250), (20, 500), (500, 20)],
    batches=[1, 32],
    long=[(2048, 100, 32), (8192, 100, 32)],
    long_modes=None,  # all
)
QUICK = dict(
    preset="gpthf-tiny",
    pairs=[(100, 100), (250, 50), (20, 200)],
    batches=[1, 8],
    long=[(2048, 32, 8), (8192, 32, 8)],
    long_modes={"gpthf": ("sentence-cache", "kv"), "gpt": ("kv",)},  # full re-runs take minutes
)
GPU_CHECK = dict(  # what `benchmarks/gpu_check.py` runs on a GPU: long prompts, batch 1 and 32
    preset="gpthf-8-4",
    pairs=[],
    batches=[],
    long=[(2048, 100, 1), (2048, 100, 32), (8192, 100, 1), (8192, 100, 32)],
    long_modes={"gpthf": ("sentence-cache", "kv"), "gpt": ("kv",)},
)
CPU_CHECK = dict(  # its CPU rehearsal: the same code paths at toy sizes
    preset="gpthf-tiny",
    pairs=[],
    batches=[],
    long=[(128, 8, 1), (128, 8, 4)],
    long_modes={"gpthf": ("sentence-cache", "kv"), "gpt": ("kv",)},
)
PROTOCOLS = {"full": FULL, "quick": QUICK, "gpu-check": GPU_CHECK, "cpu-check": CPU_CHECK}
LONG_GOALS = {2048: 1.5, 8192: 3.0}  # GPTHF kv over our GPT kv
RUNS = [
    ("gpt", "full"),
    ("gpt", "kv"),
    ("gpthf", "full"),
    ("gpthf", "sentence-cache"),
    ("gpthf", "kv"),
]


def make_prompts(
    n: int, length: int, sentence_len: int, c: ModelConfig, seed: int
) -> list[list[int]]:
    """Random ordinary tokens with EOS-S closing sentences of 0.5-1.5x sentence_len tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        ids = torch.randint(3, c.vocab_size, (length,), generator=g)
        ids[torch.isin(ids, torch.tensor([c.eos_id, c.pad_id, c.eod_id]))] = 3
        pos = -1
        while True:
            pos += int(
                torch.randint(sentence_len // 2, 3 * sentence_len // 2 + 1, (1,), generator=g)
            )
            if pos >= length - 1:
                break
            ids[pos] = c.eos_id
        prompts.append(ids.tolist())
    return prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate(
    model: Transformer, prompts: list[list[int]], new: int, mode: str, sentence_len: int, **kw: Any
) -> Any:
    """``generate`` under the benchmark's protocol: EOS-S and end-of-document suppressed, the
    sentence cap ending every sentence, every row making ``new`` tokens."""
    c = model.config
    return generate(
        model,
        prompts,
        max_new_tokens=new,
        mode=mode,
        max_sentence_tokens=sentence_len,
        stop_at_eod=False,
        suppress_tokens=[c.eos_id, c.eod_id],
        **kw,
    )


def run_one(
    model: Transformer,
    mode: str,
    prompts: list[list[int]],
    new: int,
    sentence_len: int,
    repeats: int,
) -> dict[str, Any]:
    device = model.embed.weight.device
    best: tuple[float, float, float] = (float("inf"), 0.0, 0.0)
    result = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = _generate(model, prompts, new, mode, sentence_len)
        _sync(device)
        total = time.perf_counter() - t0
        if total < best[0]:
            best = (total, result.seconds["prefill"], result.seconds["decode"])
    assert result is not None
    made = sum(len(t) for t in result.tokens)
    decoded = made - len(prompts)  # the first new token of each row comes from the prefill
    c = model.config
    pairs = list(zip(result.prompts, result.tokens, strict=True))
    prefill = sum(prefill_flops(c, p).total for p, _ in pairs)
    decode = sum(decode_flops(c, mode, p, t).total for p, t in pairs)
    return {
        "seconds": best[0],
        "prefill_seconds": best[1],
        "decode_seconds": best[2],
        "tokens_per_s": made / best[0],
        "decode_tokens_per_s": decoded / best[2] if decoded else float("nan"),
        "flops_per_token": (prefill + decode) / made,
        "decode_flops_per_token": decode / decoded if decoded else float("nan"),
        "cache_bytes_live": result.cache_bytes["live"],
        "cache_bytes_allocated": result.cache_bytes["allocated"],
        "natural_end_rate": result.natural_end_rate,
    }


def run_llama(peer: Any, prompts: list[list[int]], new: int, repeats: int) -> dict[str, Any]:
    """Hugging Face ``generate`` (greedy, default KV cache) on equal-length prompts."""
    device = peer.device
    ids = torch.tensor(prompts, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with _peer.same_kernels(device):
            out = peer.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=peer.config.pad_token_id,
            )
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    made = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": best, "tokens_per_s": made / best}


def bf16_exactness(
    model: Transformer, prompts: list[list[int]], new: int, sentence_len: int
) -> dict[str, Any]:
    """Per cached mode: max |logit - full forward's| over the mode's own tokens, and the
    fraction of greedy choices the full forward agrees with."""
    c = model.config
    suppress = [c.eos_id, c.eod_id]
    out: dict[str, Any] = {}
    for mode in MODES[c.arch]:
        if mode == "full":
            continue
        r = _generate(model, prompts, new, mode, sentence_len, return_logits=True)
        assert r.logits is not None
        seqs = torch.tensor(r.sequences, device=model.embed.weight.device)  # (B, P + new)
        P = len(prompts[0])
        ids = seqs[:, :-1]
        sid = sentence_ids_for(ids, torch.full((ids.shape[0],), ids.shape[1]), c.eos_id)
        with torch.inference_mode():
            full = model(ids, sid)[:, P - 1 :].float()  # (B, new, V): predicts each new token
        full = full.clone()  # a normal tensor, to edit below
        cached = r.logits.to(full.device)
        banned = [c.pad_id, *suppress]
        full[..., banned] = float("-inf")
        cached = cached.clone()
        cached[..., banned] = float("-inf")
        finite = torch.isfinite(full) & torch.isfinite(cached)
        diff = (full - cached).abs().where(finite, 0.0)
        agree = (full.argmax(-1) == cached.argmax(-1)).float().mean()
        out[mode] = {"max_logit_diff": float(diff.max()), "greedy_agreement": float(agree)}
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def table(points: list[dict[str, Any]], key: str) -> str:
    """One markdown table of ``key`` (tokens_per_s or decode_tokens_per_s) with the ratios."""
    lines = [
        "| prompt | new | batch | Llama kv | GPT full | GPT kv | HF full | HF sent-cache | HF kv "
        "| GPT-kv / Llama-kv | sc / GPT-full | kv / GPT-kv | kv / GPT-full |",
        "|" + "---|" * 13,
    ]

    def val(r: dict[str, Any], run: str) -> str:
        return _fmt(r[run][key]) if run in r and key in r[run] else "-"

    def ratio(r: dict[str, Any], a: str, b: str) -> str:
        return f"{r[a][key] / r[b][key]:.2f}x" if a in r and b in r and key in r[b] else "-"

    for p in points:
        r = p["runs"]
        lines.append(
            f"| {p['prompt']} | {p['new']} | {p['batch']} | {val(r, 'llama/kv')} "
            f"| {val(r, 'gpt/full')} | {val(r, 'gpt/kv')} "
            f"| {val(r, 'gpthf/full')} | {val(r, 'gpthf/sentence-cache')} | {val(r, 'gpthf/kv')} "
            f"| {ratio(r, 'gpt/kv', 'llama/kv')} "
            f"| {ratio(r, 'gpthf/sentence-cache', 'gpt/full')} | {ratio(r, 'gpthf/kv', 'gpt/kv')} "
            f"| {ratio(r, 'gpthf/kv', 'gpt/full')} |"
        )
    return "\n".join(lines)


def cost_table(points: list[dict[str, Any]]) -> str:
    """Analytic decode FLOPs per token and live cache per sequence at the end."""
    runs = ("gpt/full", "gpt/kv", "gpthf/full", "gpthf/sentence-cache", "gpthf/kv")
    lines = [
        "| prompt | new | batch | MFLOP/token (decode) GPT full : GPT kv : HF full : HF sc : HF kv "
        "| cache KiB/seq GPT kv : HF kv : HF sc | cache GPT-kv / HF-kv |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        r = p["runs"]
        mflop = " : ".join(
            f"{r[k]['decode_flops_per_token'] / 1e6:.3g}" if k in r else "-" for k in runs
        )
        kib = " : ".join(
            f"{r[k]['cache_bytes_live'] / 1024:.4g}"
            for k in ("gpt/kv", "gpthf/kv", "gpthf/sentence-cache")
        )
        ratio = r["gpt/kv"]["cache_bytes_live"] / r["gpthf/kv"]["cache_bytes_live"]
        lines.append(
            f"| {p['prompt']} | {p['new']} | {p['batch']} | {mflop} | {kib} | {ratio:.1f}x |"
        )
    return "\n".join(lines)


def goals(points: list[dict[str, Any]]) -> dict[str, Any]:
    proto = [p for p in points if not p["long"]]
    longs = [p for p in points if p["long"]]
    out: dict[str, Any] = {}
    for key in ("tokens_per_s", "decode_tokens_per_s"):
        entry: dict[str, Any] = {}
        if proto:
            sc = [
                p["runs"]["gpthf/sentence-cache"][key] / p["runs"]["gpt/full"][key] for p in proto
            ]
            entry["sentence_cache_vs_gpt_full"] = {
                "min": min(sc),
                "max": max(sc),
                "goal": 3.0,
                "met": min(sc) >= 3.0,
            }
        for p in longs:
            kv = p["runs"]["gpthf/kv"][key] / p["runs"]["gpt/kv"][key]
            goal = LONG_GOALS.get(p["prompt"], 1.5)
            name = f"kv_vs_gpt_kv_{p['prompt']}" + (f"_b{p['batch']}" if p["batch"] != 32 else "")
            entry[name] = {"ratio": kv, "goal": goal, "met": kv >= goal}
        out[key] = entry
    peer = [p["runs"]["gpt/kv"]["tokens_per_s"] / p["runs"]["llama/kv"]["tokens_per_s"]
            for p in points if "llama/kv" in p["runs"]]  # fmt: skip
    if peer:
        out["gpt_kv_vs_llama_kv"] = {"min": min(peer), "goal": 1.0, "met": min(peer) >= 1.0}
    long = longs[-1]["runs"]
    cache_kv = long["gpt/kv"]["cache_bytes_live"] / long["gpthf/kv"]["cache_bytes_live"]
    cache_sc = long["gpt/kv"]["cache_bytes_live"] / long["gpthf/sentence-cache"]["cache_bytes_live"]
    alloc = long["gpt/kv"]["cache_bytes_allocated"] / long["gpthf/kv"]["cache_bytes_allocated"]
    out["cache_smaller_long"] = {
        "kv_live": cache_kv,
        "kv_allocated": alloc,
        "sentence_cache_live": cache_sc,
        "goal": 10.0,
        "met": cache_kv >= 10 and alloc >= 10,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny models and fewer points (CPU)")
    ap.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help="the points to run (default: full; quick with --quick; gpu-check: 2k and 8k "
        "prompts at batch 1 and 32, the cached modes only)",
    )
    ap.add_argument("--preset", help="GPTHF preset; the GPT is its equal-size baseline")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--sentence-len", type=int, default=25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, help="CPU threads (default: 1 with --quick, robust on a shared box)"
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on cuda")
    ap.add_argument("--repeats", type=int, default=2, help="best of N per measurement")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face Llama peer")
    ap.add_argument(
        "--exactness-prompts", type=int, default=8, help="prompts for the bf16 exactness report"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    protocol = args.protocol or ("quick" if args.quick else "full")
    proto: dict[str, Any] = PROTOCOLS[protocol]
    device = torch.device(args.device)
    if args.threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    hf_cfg = ModelConfig.preset(args.preset or proto["preset"], vocab_size=args.vocab_size)
    models = {}
    for cfg in (hf_cfg, hf_cfg.baseline()):
        torch.manual_seed(0)
        models[cfg.arch] = build_model(cfg).to(device=device, dtype=dtype).eval()
    peer = None
    if not args.no_peer and _peer.available():
        peer = _peer.llama_peer(models["gpt"])
        probe = torch.randint(3, hf_cfg.vocab_size, (2, 64), device=device)
        tol = 1e-3 if dtype == torch.float32 else 0.25
        _peer.check_same_function(models["gpt"], peer, probe, atol=tol)
    elif not args.no_peer:
        print("# transformers is not installed: no Llama peer (pip install -e '.[hf]')")
    print(f"# {hf_cfg.arch} vs gpt, d={hf_cfg.d_model}, L={hf_cfg.n_layers} "
          f"({hf_cfg.n_encoder_layers}+{hf_cfg.n_body_layers}), V={hf_cfg.vocab_size}, "
          f"{models['gpt'].num_parameters() / 1e6:.1f}M params, {device} {dtype}", flush=True)  # fmt: skip

    # Warm-up: one short call per mode (allocator, kernel selection).
    warm = make_prompts(2, 40, args.sentence_len, hf_cfg, seed=1)
    for arch, mode in RUNS:
        generate(
            models[arch], warm, max_new_tokens=8, mode=mode, max_sentence_tokens=args.sentence_len
        )

    grid = [(p, n, b, False) for p, n in proto["pairs"] for b in proto["batches"]]
    grid += [(*long, True) for long in proto["long"]]
    points = []
    for prompt_len, new, batch, is_long in grid:
        prompts = make_prompts(batch, prompt_len, args.sentence_len, hf_cfg, seed=prompt_len)
        runs = {}
        for arch, mode in RUNS:
            if is_long and proto["long_modes"] and mode not in proto["long_modes"][arch]:
                continue
            runs[f"{arch}/{mode}"] = run_one(
                models[arch], mode, prompts, new, args.sentence_len, args.repeats
            )
            print(f"  P={prompt_len} N={new} B={batch} {arch}/{mode}: "
                  f"{runs[f'{arch}/{mode}']['tokens_per_s']:.1f} tok/s", flush=True)  # fmt: skip
        if peer is not None:
            runs["llama/kv"] = run_llama(peer, prompts, new, args.repeats)
            print(f"  P={prompt_len} N={new} B={batch} llama/kv: "
                  f"{runs['llama/kv']['tokens_per_s']:.1f} tok/s", flush=True)  # fmt: skip
        points.append(
            {"prompt": prompt_len, "new": new, "batch": batch, "long": is_long, "runs": runs}
        )

    exact_prompts = make_prompts(args.exactness_prompts, 100, args.sentence_len, hf_cfg, seed=7)
    exactness = {  # always in bf16 (copies, when the timing ran in fp32)
        arch: bf16_exactness(
            copy.deepcopy(m).to(torch.bfloat16), exact_prompts, 100, args.sentence_len
        )
        for arch, m in models.items()
    }
    report = {
        "protocol": protocol,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "gpthf_config": hf_cfg.to_dict(),
        "sentence_len": args.sentence_len,
        "modes": MODES,
        "peer": "transformers LlamaForCausalLM (sdpa), generate()" if peer is not None else None,
        "points": points,
        "exactness": {"dtype": "torch.bfloat16", "prompt": 100, "new": 100, **exactness},
        "goals": goals(points),
    }
    out = (
        args.out
        or Path(__file__).parent
        / "results"
        / f"generation{'' if protocol == 'full' else '_' + protocol.replace('-', '_')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\nThroughput, whole generate() call (tokens/s, prefill included):\n")
    print(table(points, "tokens_per_s"))
    print("\nDecode only (tokens/s after the first new token):\n")
    print(table(points, "decode_tokens_per_s"))
    print("\nCosts:\n")
    print(cost_table(points))
    print(f"\nExactness of the cached modes against the full forward (bf16, "
          f"{args.exactness_prompts} prompts of 100 tokens, 100 new):\n")  # fmt: skip
    print("| model | mode | max logit diff | greedy agreement |\n|---|---|---|---|")
    for arch, modes in exactness.items():
        for mode, e in modes.items():
            print(f"| {arch} | {mode} | {e['max_logit_diff']:.3g} | {e['greedy_agreement']:.1%} |")
    print()
    for name, g in report["goals"].items():
        print(f"- {name}: {json.dumps(g)}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
