"""Generation job: ``python -m jobs.generate --checkpoint EXPORT --prompt TEXT [...]``.

Every flag but ``--json`` is a field of ``training.generation.config.GenerateConfig``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from pipeline import settings
from training.generation.config import GenerateConfig


def add_args(p: argparse.ArgumentParser) -> None:
    settings.add_flags(p, GenerateConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def main(args: argparse.Namespace) -> int:
    cfg = settings.from_args(GenerateConfig, args)  # fails before torch loads
    from training.generation.text import generate_from_export

    out = generate_from_export(
        cfg.checkpoint,
        cfg.prompts,
        max_new_tokens=cfg.max_new_tokens,
        mode=cfg.mode,
        device="cuda" if cfg.gpu else "cpu",
        storage=cfg.storage,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        show_pruning=cfg.show_pruning or bool(cfg.pruning_html),
        prune_rule=cfg.prune_rule,
    )
    if out.pruning and cfg.pruning_html:
        page = "".join(
            f"<h2>Prompt {i + 1}: {html.escape(p)}</h2>" + r.to_html()
            for i, (p, r) in enumerate(zip(cfg.prompts, out.pruning, strict=True))
        )
        Path(cfg.pruning_html).write_text(page)
    if args.json:
        # NaN (no sentence ended, say) is not JSON: null instead, so any parser reads it.
        print(json.dumps(_no_nan(out.to_dict()), indent=1, allow_nan=False))
        return 0
    for i, (prompt, text) in enumerate(zip(cfg.prompts, out.texts, strict=True)):
        print(f"> {prompt}\n{text}\n")
        if out.pruning:
            print(out.pruning[i].to_text())
    if cfg.pruning_html:
        print(f"[generate] pruning report: {cfg.pruning_html}")
    rate = out.natural_end_rate
    print(
        f"[generate] {out.arch} {out.mode}"
        + (f" (pruning rule {out.prune_rule})" if out.prune_rule else "")
        + f": {out.new_tokens} tokens in {out.seconds:.2f}s "
        f"({out.tokens_per_s or 0:.0f} tok/s); sentences ended naturally: "
        + (f"{rate:.0%}" if rate == rate else "n/a")
    )
    return 0


if __name__ == "__main__":
    from jobs.entry import run_job

    sys.exit(run_job("generate"))
