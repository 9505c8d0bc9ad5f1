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

Under the benchmark protocol (``benchmarks/protocol.py``): at each point (prompt length, new
tokens, batch) every mode compared (GPTHF full/sentence-cache/kv, GPT full/kv, the Llama peer)
is one side, and the sides run in turn within each repeat, the order rotating
(``--repeats``, 3 by default). Every mode's figure is the median over the repeats with its
min-max; a ratio (GPTHF kv over GPT kv, sentence-cache over GPT full, GPT kv over Llama kv, ...)
is taken per repeat and reported as the median of those ratios with their min-max. Every side
of a point is asserted to have made the same number of new tokens from the same prompt tokens
before a ratio is formed, and the goals are judged on the medians.

Reported per point and mode: tokens/s (new tokens over the wall time of the whole ``generate``
call, prefill included), decode tokens/s (after the first new token, i.e. without the prefill)
and the prefill seconds, apart; analytic FLOPs per token (``training.model.flops``), and cache
bytes per sequence at the end (live slots, and allocated). Results, with the environment:
``benchmarks/results/generation[_quick].json`` (and ``.md``, the tables printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _peer
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
COLUMNS = ("llama/kv", "gpt/full", "gpt/kv", "gpthf/full", "gpthf/sentence-cache", "gpthf/kv")
RATIOS = (  # (side, base): how many times faster side is than base, per repeat
    ("gpthf/kv", "gpt/kv"),
    ("gpthf/sentence-cache", "gpt/full"),
    ("gpthf/kv", "gpt/full"),
    ("gpt/kv", "llama/kv"),
)
METRICS = {
    "tokens_per_s": "whole generate() call, prefill included",
    "decode_tokens_per_s": "decode only, after the first new token",
}
SC, KV, PEER = RATIOS[1], RATIOS[0], RATIOS[3]


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


def ours_side(
    model: Transformer,
    mode: str,
    prompts: list[list[int]],
    new: int,
    sentence_len: int,
    last: dict[str, Any],
    name: str,
) -> Callable[[], Run]:
    """One timed ``generate`` call: its work is the tokens it made (and the prompt tokens it
    read); the prefill and decode seconds travel apart; ``last[name]`` keeps the output."""
    device = model.embed.weight.device

    def side() -> Run:
        _sync(device)
        t0 = time.perf_counter()
        result = _generate(model, prompts, new, mode, sentence_len)
        _sync(device)
        seconds = time.perf_counter() - t0
        last[name] = result
        return Run(
            seconds,
            {
                "new_tokens": sum(len(t) for t in result.tokens),
                "prompt_tokens": sum(len(p) for p in prompts),
                "rows": len(prompts),
            },
            {
                "prefill_seconds": result.seconds["prefill"],
                "decode_seconds": result.seconds["decode"],
            },
        )

    return side


def llama_side(peer: Any, prompts: list[list[int]], new: int) -> Callable[[], Run]:
    """Hugging Face ``generate`` (greedy, default KV cache) on equal-length prompts."""
    device = peer.device
    ids = torch.tensor(prompts, device=device)

    def side() -> Run:
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
        seconds = time.perf_counter() - t0
        made = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return Run(
            seconds, {"new_tokens": made, "prompt_tokens": ids.numel(), "rows": ids.shape[0]}
        )

    return side


def _phase(s: Samples, key: str) -> Samples:
    """The same repeats timed by one phase (``prefill_seconds`` or ``decode_seconds``)."""
    return Samples(s.name, [Run(r.extra[key], r.work) for r in s.runs])


def _decoded(s: Samples) -> int:
    return int(s.work["new_tokens"] - s.work["rows"])  # each row's first token: the prefill


def _put(out: dict[str, Any], key: str, spread: Spread) -> None:
    """``key`` as the median, ``key_min`` and ``key_max`` its range over the repeats."""
    out.update({key: spread.median, f"{key}_min": spread.low, f"{key}_max": spread.high})


def summarize(s: Samples, model: Transformer | None, mode: str, result: Any) -> dict[str, Any]:
    """A mode's figures at one point: medians, with their min-max (``_min``, ``_max``)."""
    out: dict[str, Any] = {}
    _put(out, "tokens_per_s", s.rate("new_tokens"))
    out.update(seconds=s.median, repeats_s=[round(x, 6) for x in s.seconds], work=dict(s.work))
    if "prefill_seconds" in s.runs[0].extra:
        _put(out, "prefill_seconds", Spread.of([r.extra["prefill_seconds"] for r in s.runs]))
        dec = _phase(s, "decode_seconds")
        out["decode_seconds"] = dec.median
        n = _decoded(s)
        if n and min(dec.seconds) > 0:
            _put(out, "decode_tokens_per_s", Spread.of([n / x for x in dec.seconds]))
    if model is not None and result is not None:
        c = model.config
        pairs = list(zip(result.prompts, result.tokens, strict=True))
        prefill = sum(prefill_flops(c, p).total for p, _ in pairs)
        decode = sum(decode_flops(c, mode, p, t).total for p, t in pairs)
        made, n = s.work["new_tokens"], _decoded(s)
        out.update(
            flops_per_token=(prefill + decode) / made,
            decode_flops_per_token=decode / n if n else None,
            cache_bytes_live=result.cache_bytes["live"],
            cache_bytes_allocated=result.cache_bytes["allocated"],
            natural_end_rate=result.natural_end_rate,
        )
    return out


def point_ratios(t: dict[str, Samples]) -> list[dict[str, Any]]:
    """Per-repeat ratios of the sides present (``protocol.Ratio``), for the whole call
    (``metric`` tokens_per_s) and for decode alone (decode_tokens_per_s)."""
    out: list[dict[str, Any]] = []
    for side, base in RATIOS:
        if side not in t or base not in t:
            continue
        same_work(t, side, base)  # the same tokens made from the same prompt tokens
        out.append({**ratio(t, side, base).to_dict(), "metric": "tokens_per_s"})
        if all("decode_seconds" in t[n].runs[0].extra and _decoded(t[n]) for n in (side, base)):
            dec = {n: _phase(t[n], "decode_seconds") for n in (side, base)}
            out.append({**ratio(dec, side, base).to_dict(), "metric": "decode_tokens_per_s"})
    return out


def find_ratio(p: dict[str, Any], pair: tuple[str, str], metric: str) -> dict[str, Any] | None:
    side, base = pair
    return next(
        (r for r in p["ratios"] if (r["side"], r["base"], r["metric"]) == (side, base, metric)),
        None,
    )


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


def _cell(e: dict[str, Any], key: str, scale: float = 1.0) -> str:
    """``key`` of a mode's entry (times ``scale``) as median (min-max)."""
    if key not in e:
        return "-"
    lo, mid, hi = (_fmt(e[k] * scale) for k in (key + "_min", key, key + "_max"))
    return f"{mid} ({lo}-{hi})"


def _xcell(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"


def table(points: list[dict[str, Any]], key: str) -> str:
    """Tokens/s of every mode (``key``: tokens_per_s or decode_tokens_per_s), median (min-max)."""
    cols = [m for m in COLUMNS if any(key in p["runs"].get(m, {}) for p in points)]
    rows = [
        [
            p["prompt"],
            p["new"],
            p["batch"],
            *(_cell(p["runs"].get(m, {}), key) for m in cols),
        ]
        for p in points
    ]
    return markdown_table(["prompt", "new", "batch", *cols], rows)


def ratio_table(points: list[dict[str, Any]], key: str) -> str:
    """The per-repeat ratios: median (min-max) over the repeats."""
    pairs = [x for x in RATIOS if any(find_ratio(p, x, key) for p in points)]
    rows = [
        [
            p["prompt"],
            p["new"],
            p["batch"],
            *(_xcell(find_ratio(p, x, key)) for x in pairs),
        ]
        for p in points
    ]
    return markdown_table(["prompt", "new", "batch", *(f"{a} over {b}" for a, b in pairs)], rows)


def cost_table(points: list[dict[str, Any]]) -> str:
    """Analytic decode FLOPs per token and live cache per sequence at the end."""
    runs = ("gpt/full", "gpt/kv", "gpthf/full", "gpthf/sentence-cache", "gpthf/kv")
    rows = []
    for p in points:
        r = p["runs"]
        mflop = " : ".join(
            f"{r[k]['decode_flops_per_token'] / 1e6:.3g}"
            if k in r and r[k]["decode_flops_per_token"] is not None
            else "-"
            for k in runs
        )
        kib = " : ".join(
            f"{r[k]['cache_bytes_live'] / 1024:.4g}"
            for k in ("gpt/kv", "gpthf/kv", "gpthf/sentence-cache")
        )
        smaller = r["gpt/kv"]["cache_bytes_live"] / r["gpthf/kv"]["cache_bytes_live"]
        rows.append([p["prompt"], p["new"], p["batch"], mflop, kib, f"{smaller:.1f}x"])
    return markdown_table(
        [
            "prompt",
            "new",
            "batch",
            "MFLOP/token (decode) GPT full : GPT kv : HF full : HF sc : HF kv",
            "cache KiB/seq GPT kv : HF kv : HF sc",
            "cache GPT-kv / HF-kv",
        ],
        rows,
    )


def goals(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, judged on the medians of the per-repeat ratios (min-max beside)."""
    proto = [p for p in points if not p["long"]]
    longs = [p for p in points if p["long"]]
    out: dict[str, Any] = {}
    for key in METRICS:
        entry: dict[str, Any] = {}
        sc = [r for p in proto if (r := find_ratio(p, SC, key))]
        if sc:
            med = [r["median"] for r in sc]
            entry["sentence_cache_vs_gpt_full"] = {
                "min": min(med),
                "max": max(med),
                "lowest_repeat": min(r["low"] for r in sc),
                "goal": 3.0,
                "met": min(med) >= 3.0,
            }
        for p in longs:
            r = find_ratio(p, KV, key)
            if r is None:
                continue
            goal = LONG_GOALS.get(p["prompt"], 1.5)
            name = f"kv_vs_gpt_kv_{p['prompt']}" + (f"_b{p['batch']}" if p["batch"] != 32 else "")
            entry[name] = {
                "ratio": r["median"],
                "low": r["low"],
                "high": r["high"],
                "goal": goal,
                "met": r["median"] >= goal,
            }
        out[key] = entry
    peer = [r for p in points if (r := find_ratio(p, PEER, "tokens_per_s"))]
    if peer:
        med = [r["median"] for r in peer]
        out["gpt_kv_vs_llama_kv"] = {
            "min": min(med),
            "lowest_repeat": min(r["low"] for r in peer),
            "goal": 1.0,
            "met": min(med) >= 1.0,
        }
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


def _strict(x: Any) -> Any:
    """NaN and infinities as null (the result file is strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict(v) for v in x]
    return x


def report_markdown(report: dict[str, Any]) -> str:
    points, n = report["points"], report["repeats"]
    lines = [
        f"{report['protocol']} protocol, {report['device_name']} ({report['dtype']}): median "
        f"(min-max) of {n} interleaved repeats; ratios per repeat"
        + (" (smoke: fewer than 3)." if report["smoke"] else "."),
    ]
    for key, what in METRICS.items():
        lines += ["", f"Tokens/s, {what}:", "", table(points, key)]
        lines += ["", f"Ratios, {what}:", "", ratio_table(points, key)]
    lines += ["", "Prefill, ms:", ""]
    cols = [m for m in COLUMNS if any("prefill_seconds" in p["runs"].get(m, {}) for p in points)]
    lines.append(
        markdown_table(
            ["prompt", "new", "batch", *cols],
            [
                [
                    p["prompt"],
                    p["new"],
                    p["batch"],
                    *(_cell(p["runs"].get(m, {}), "prefill_seconds", 1e3) for m in cols),
                ]
                for p in points
            ],
        )
    )
    lines += ["", "Costs:", "", cost_table(points)]
    ex = report["exactness"]
    lines += [
        "",
        f"Exactness of the cached modes against the full forward (bf16, {ex['prompts']} prompts "
        f"of {ex['prompt']} tokens, {ex['new']} new):",
        "",
        markdown_table(
            ["model", "mode", "max logit diff", "greedy agreement"],
            [
                [arch, mode, f"{e['max_logit_diff']:.3g}", f"{e['greedy_agreement']:.1%}"]
                for arch in ("gpt", "gpthf")
                for mode, e in ex[arch].items()
            ],
        ),
        "",
        "Goals (medians):",
        "",
    ]
    for name, g in report["goals"].items():
        lines.append(f"- {name}: {json.dumps(g)}")
    return "\n".join(lines) + "\n"


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
    ap.add_argument(
        "--repeats",
        type=int,
        default=MIN_REPEATS,
        help=f"interleaved repeats per point: median of N with min-max (default {MIN_REPEATS}; "
        "fewer is a rehearsal, not a protocol figure)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face Llama peer")
    ap.add_argument(
        "--exactness-prompts", type=int, default=8, help="prompts for the bf16 exactness report"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.repeats < MIN_REPEATS:
        print(f"# --repeats {args.repeats} < {MIN_REPEATS}: a rehearsal, not a protocol figure")

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
          f"{models['gpt'].num_parameters() / 1e6:.1f}M params, {device} {dtype}, "
          f"{args.repeats} interleaved repeats", flush=True)  # fmt: skip

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
        last: dict[str, Any] = {}
        sides: dict[str, Callable[[], Run]] = {}
        for arch, mode in RUNS:
            if is_long and proto["long_modes"] and mode not in proto["long_modes"][arch]:
                continue
            name = f"{arch}/{mode}"
            sides[name] = ours_side(models[arch], mode, prompts, new, args.sentence_len, last, name)
        if peer is not None:
            sides["llama/kv"] = llama_side(peer, prompts, new)
        print(f"# P={prompt_len} N={new} B={batch}", file=sys.stderr, flush=True)
        t = interleave(sides, args.repeats)
        same_work(t, *t)  # every mode made the same tokens from the same prompts
        runs = {}
        for name, s in t.items():
            arch, mode = name.split("/")
            runs[name] = summarize(
                s, models.get(arch) if arch != "llama" else None, mode, last.get(name)
            )
            w = runs[name]
            print(f"  P={prompt_len} N={new} B={batch} {name}: {w['tokens_per_s']:.1f} "
                  f"({w['tokens_per_s_min']:.1f}-{w['tokens_per_s_max']:.1f}) tok/s", flush=True)  # fmt: skip
        points.append(
            {
                "prompt": prompt_len,
                "new": new,
                "batch": batch,
                "long": is_long,
                "runs": runs,
                "ratios": point_ratios(t),
            }
        )

    exact_prompts = make_prompts(args.exactness_prompts, 100, args.sentence_len, hf_cfg, seed=7)
    exactness = {  # always in bf16 (copies, when the timing ran in fp32)
        arch: bf16_exactness(
            copy.deepcopy(m).to(torch.bfloat16), exact_prompts, 100, args.sentence_len
        )
        for arch, m in models.items()
    }
    report: dict[str, Any] = {
        "protocol": protocol,
        "timing": f"{args.repeats} interleaved repeats (order rotating) per point after a "
        "warm-up; tokens/s median (min-max); ratios per repeat, median (min-max)",
        "repeats": args.repeats,
        "smoke": args.repeats < MIN_REPEATS,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "gpthf_config": hf_cfg.to_dict(),
        "sentence_len": args.sentence_len,
        "modes": MODES,
        "peer": "transformers LlamaForCausalLM (sdpa), generate()" if peer is not None else None,
        "points": points,
        "exactness": {
            "dtype": "torch.bfloat16",
            "prompts": args.exactness_prompts,
            "prompt": 100,
            "new": 100,
            **exactness,
        },
        "goals": goals(points),
    }
    md = report_markdown(report)
    report["table"] = md
    name = f"generation{'' if protocol == 'full' else '_' + protocol.replace('-', '_')}"
    path = write_result(name, _strict(report), args.out)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
