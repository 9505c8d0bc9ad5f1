"""Generation memory against prompt length: does a long prompt's prefill stay linear?

    .venv/bin/python benchmarks/prompt_memory.py [--lengths 8000 16000 32000] [--arch gpthf gpt]

Each (arch, length) runs in a fresh process: the tiny preset (vocab 512), a random prompt of
25-token sentences, ``generate`` in kv mode for 4 new tokens, one thread; reported is the
process's peak RSS growth over its state just before ``generate`` (the prefill's working set).
Linear memory doubles with the prompt; the ``x per 2x`` column says by how much it grew.
Results: ``benchmarks/results/prompt_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from training.generation.decode import generate
from training.model import ModelConfig, build_model
torch.set_num_threads(1)
c = ModelConfig.preset({arch!r} + "-tiny", vocab_size=512)
m = build_model(c).eval()
ids = torch.randint(3, 512, ({n},), generator=torch.Generator().manual_seed(0))
ids[torch.arange(24, {n}, 25)] = c.eos_id
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
generate(m, [ids.tolist()], max_new_tokens=4, mode="kv")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8000, 16000, 32000])
    ap.add_argument("--arch", nargs="+", default=["gpthf", "gpt"])
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_memory.json"
    )
    args = ap.parse_args()
    rows = []
    for arch in args.arch:
        for n in args.lengths:
            code = PROBE.format(root=str(ROOT), arch=arch, n=n)
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            rows.append(
                {"arch": arch, "prompt_tokens": n, "peak_rss_growth_bytes": int(out.stdout)}
            )
            print(f"  {arch} {n}: {int(out.stdout) / 2**20:,.0f} MiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print("\n| model | prompt tokens | peak RSS growth MiB | x per 2x |\n|---|---|---|---|")
    for i, r in enumerate(rows):
        prev = rows[i - 1] if i and rows[i - 1]["arch"] == r["arch"] else None
        grow = "-"
        if prev and r["prompt_tokens"] == 2 * prev["prompt_tokens"]:
            grow = f"{r['peak_rss_growth_bytes'] / prev['peak_rss_growth_bytes']:.2f}x"
        print(
            f"| {r['arch']} | {r['prompt_tokens']} | {r['peak_rss_growth_bytes'] / 2**20:,.0f} "
            f"| {grow} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
