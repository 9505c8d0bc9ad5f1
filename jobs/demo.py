"""The main job on the embedded default (in-process Ray, local files, the sample corpus):
tokenizer -> preprocess -> train a tiny GPTHF and its GPT baseline -> evaluate both on the
held-out split -> generate with every mode -> compare the two runs (PNG + table)."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEMO_VOCAB = 4096
DEMO_HELDOUT = 0.05
DEMO_STEPS = 150
DEMO_NEW_TOKENS = 48
DEMO_PROMPTS = ["Enter the King and Queen. The king speaks.", "What news from the court?"]


def demo_train_config(work: Path, preset: str) -> Any:
    from training.train.config import load_train_config

    return load_train_config(
        None,
        {
            "data.uri": str(work / "data"),
            "run.output": str(work / f"train-{preset}"),
            "model.preset": preset,
            "run.workers": 1,
            "run.resume": True,  # a second `make demo` continues (or finds the run complete)
            "deepspeed.zero_stage": 1,
            "deepspeed.micro_batch_rows": 4,
            "optim.total_steps": DEMO_STEPS,
            "optim.warmup_steps": 20,
            "optim.lr": 2e-3,
            "run.checkpoint_every": 100,
            "run.eval_every": 50,
            "run.log_every": 25,
        },
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.stats import format_stats
    from pipeline.tokenizer import train_tokenizer
    from training.train.driver import format_summary, init_ray_for_training, run_training

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
    # Start Ray as training needs it (with the state API Ray Train polls), before preprocessing
    # would start it without.
    init_ray_for_training()
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

    for preset in ("gpthf-tiny", "gpt-tiny"):  # GPTHF and its equal-size GPT baseline
        t0 = time.perf_counter()
        print(format_summary(run_training(demo_train_config(work, preset))))
        print(f"[demo] {preset}: training took {time.perf_counter() - t0:.0f}s")

    from training.eval.config import EvalConfig
    from training.eval.job import run_eval
    from training.eval.report import format_table

    report = run_eval(
        EvalConfig(
            checkpoints=[str(work / f"train-{p}" / "export") for p in ("gpthf-tiny", "gpt-tiny")],
            data=str(work / "data"),
            output=str(work / "eval"),
        ),
        progress=sys.stderr.isatty(),
    )
    print(f"\n[demo] held-out evaluation ({report.batching}), report in {work / 'eval'}:")
    print(format_table(report), end="")

    from training.generation.text import generate_from_export

    export = str(work / "train-gpthf-tiny" / "export")
    print(f"\n[demo] generation from {export}, greedy, {DEMO_NEW_TOKENS} new tokens per prompt:")
    for mode in ("full", "sentence-cache", "kv"):
        out = generate_from_export(export, DEMO_PROMPTS, max_new_tokens=DEMO_NEW_TOKENS, mode=mode)
        ends = (
            f"natural sentence ends {out.natural_end_rate:.0%}"
            if not math.isnan(out.natural_end_rate)  # nan: no sentence ended at all
            else "no sentence ended"
        )
        print(f"  {mode:15s} {out.tokens_per_s or 0:7.0f} tok/s  {ends}")
    for prompt, text in zip(DEMO_PROMPTS, out.texts, strict=True):
        print(f"  > {prompt}\n    {text}")

    from training.compare import compare_runs

    runs = [str(work / f"train-{p}") for p in ("gpthf-tiny", "gpt-tiny")]
    compare_runs(runs, str(work / "compare"), [str(work / "eval")])
    print(f"\n[demo] runs compared ({work / 'compare'}: compare.png, compare.md):")
    print((work / "compare" / "compare.md").read_text())
    return 0
