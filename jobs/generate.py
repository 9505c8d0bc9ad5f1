"""Generation job: ``gpthf generate --checkpoint EXPORT --prompt TEXT [...]``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="an export folder (OUT/export of `gpthf train`)"
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", default="kv", help="kv, sentence-cache or full (GPT: kv or full)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--json", action="store_true")


def generate_from_export(uri: str, prompts: list[str], **kw: Any) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from training.export import load_export
    from training.generation.decode import generate_text

    device = kw.pop("device", "cpu")
    exported = load_export(uri, device=device)
    tok = Tokenizer.from_str(exported.tokenizer_json)
    t0 = time.perf_counter()
    with torch.no_grad():
        texts, result = generate_text(exported.model, tok, prompts, **kw)
    dt = time.perf_counter() - t0
    new_tokens = sum(len(t) for t in result.tokens)
    return {
        "arch": exported.model_config.arch,
        "mode": kw.get("mode"),
        "texts": texts,
        "new_tokens": new_tokens,
        "seconds": dt,
        "tokens_per_s": new_tokens / dt if dt else None,
        "natural_end_rate": result.natural_end_rate,
        "stopped_at_eod": [bool(x) for x in result.stopped_at_eod],
    }


def main(args: argparse.Namespace) -> int:
    out = generate_from_export(
        args.checkpoint,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device="cuda" if args.gpu else "cpu",
    )
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for prompt, text in zip(args.prompt, out["texts"], strict=True):
        print(f"> {prompt}\n{text}\n")
    rate = out["natural_end_rate"]
    print(
        f"[generate] {out['arch']} {out['mode']}: {out['new_tokens']} tokens in {out['seconds']:.2f}s "
        f"({out['tokens_per_s']:.0f} tok/s); sentences ended naturally: "
        + (f"{rate:.0%}" if rate == rate else "n/a")
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["generate", *sys.argv[1:]]))
