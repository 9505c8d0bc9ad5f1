"""The main job on the embedded default: sample corpus -> tokenizer -> preprocess (in-process Ray)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

DEMO_VOCAB = 4096
DEMO_HELDOUT = 0.05


def main(args: argparse.Namespace) -> int:
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.stats import format_stats
    from pipeline.tokenizer import train_tokenizer

    work = Path(args.workdir).absolute()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = ensure_sample_corpus()
    print(f"[demo] sample corpus: {corpus} ({len(list(corpus.glob('*.txt')))} files)")

    tok_path = work / "tokenizer.json"
    t0 = time.perf_counter()
    if not tok_path.exists():
        loaded = train_tokenizer(
            [str(corpus)], str(tok_path), vocab_size=DEMO_VOCAB, sample_bytes=20_000_000
        )
        print(
            f"[demo] tokenizer: vocab {loaded.vocab_size} trained in {time.perf_counter() - t0:.1f}s"
        )
    else:
        print(f"[demo] tokenizer: reusing {tok_path}")

    cfg = PreprocessConfig(
        input=InputConfig(paths=[str(corpus)]),
        output=str(work / "data"),
        tokenizer=str(tok_path),
        packing=PackingConfig(heldout_fraction=DEMO_HELDOUT),
    )
    t0 = time.perf_counter()
    result = run_preprocess(cfg, progress=sys.stderr.isatty())
    took = time.perf_counter() - t0
    if result.wrote_anything:
        print(
            f"[demo] preprocess: manifest v{result.version}, {len(result.shards_added)} shards in {took:.1f}s"
        )
    else:
        print(f"[demo] preprocess: nothing new, manifest v{result.version} ({took:.1f}s)")
    print(format_stats(result.stats))
    print(f"[demo] outputs in {work / 'data'} (manifest.json, stats.json, stats.png)")
    return 0
