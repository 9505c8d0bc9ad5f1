"""The main job on the embedded default (in-process Ray, local files, the sample corpus):
tokenizer -> preprocess -> train a tiny GPTHF and its GPT baseline -> evaluate both on the
held-out split -> generate text from both -> measure each generation mode's speed -> compare
the two runs (PNG + table). ``gpthf demo`` (``jobs/demo.py``) calls :func:`run_demo`.

Every step reuses what it finds in the work folder (a second run preprocesses nothing and
finds both training runs complete); ``fresh`` deletes the folder first.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.study.generation import SpeedRow

DEMO_VOCAB = 4096
DEMO_HELDOUT = 0.05
DEMO_STEPS = 150
DEMO_NEW_TOKENS = 48
DEMO_PROMPTS = ["Enter the King and Queen. The king speaks.", "What news from the court?"]
DEMO_PRESETS = ("gpthf-tiny", "gpt-tiny")  # GPTHF and its equal-size GPT baseline
DEMO_TEMPERATURE = 0.8
DEMO_TOP_K = 40
DEMO_SEED = 0
DEMO_SPEED_REPEATS = 3


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote and measured."""

    workdir: Path
    texts: dict[str, list[str]]
    """Per preset, the continuation of each of ``DEMO_PROMPTS``."""
    speed: dict[str, list[SpeedRow]]
    """Per preset, decode speed of every mode (``measure_speed``)."""


def demo_sampling(greedy: bool) -> dict[str, Any]:
    """Keyword arguments of ``decode.generate``: seeded sampling, or greedy (temperature 0)."""
    from training.study.generation import sampling_kwargs

    if greedy:
        return sampling_kwargs(0.0, 0, DEMO_SEED)
    return sampling_kwargs(DEMO_TEMPERATURE, DEMO_TOP_K, DEMO_SEED)


def describe_sampling(greedy: bool) -> str:
    if greedy:
        return "greedy"
    return f"seeded sampling (temperature {DEMO_TEMPERATURE}, top_k {DEMO_TOP_K}, seed {DEMO_SEED})"


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


def export_uri(work: Path, preset: str) -> str:
    return str(work / f"train-{preset}" / "export")


# ------------------------------------------------------------------------------------ steps


def prepare_data(work: Path) -> None:
    """Tokenizer (trained once) and preprocessing of the sample corpus into ``work/data``."""
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.stats import format_stats
    from pipeline.tokenizer import train_tokenizer
    from training.train.driver import init_ray_for_training

    corpus = ensure_sample_corpus()
    log(f"sample corpus: {corpus} ({len(list(corpus.glob('*.txt')))} files)")

    tok_path = work / "tokenizer.json"
    t0 = time.perf_counter()
    if not tok_path.exists():
        loaded = train_tokenizer(
            [str(corpus)], str(tok_path), vocab_size=DEMO_VOCAB, sample_bytes=20_000_000
        )
        log(f"tokenizer: vocab {loaded.vocab_size} trained in {time.perf_counter() - t0:.1f}s")
    else:
        log(f"tokenizer: reusing {tok_path}")

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
        log(
            f"preprocess: manifest v{result.version}, {len(result.shards_added)} shards in {took:.1f}s"
        )
    else:
        log(f"preprocess: nothing new, manifest v{result.version} ({took:.1f}s)")
    print(format_stats(result.stats))
    log(f"outputs in {work / 'data'} (manifest.json, stats.json, stats.png)")


def train_models(work: Path) -> None:
    from training.train.driver import format_summary, run_training

    for preset in DEMO_PRESETS:
        t0 = time.perf_counter()
        print(format_summary(run_training(demo_train_config(work, preset))))
        log(f"{preset}: training took {time.perf_counter() - t0:.0f}s")


def evaluate_models(work: Path) -> None:
    from training.eval.config import EvalConfig
    from training.eval.job import run_eval
    from training.eval.report import format_table

    report = run_eval(
        EvalConfig(
            checkpoints=[export_uri(work, p) for p in DEMO_PRESETS],
            data=str(work / "data"),
            output=str(work / "eval"),
        ),
        progress=sys.stderr.isatty(),
    )
    print()
    log(f"held-out evaluation ({report.batching}), report in {work / 'eval'}:")
    print(format_table(report), end="")


def generate_texts(work: Path, *, greedy: bool) -> dict[str, list[str]]:
    """Each prompt's continuation from every model (kv mode), printed for a person to read."""
    from training.generation.text import generate_from_export

    print()
    log(
        f"generation, {describe_sampling(greedy)}, kv mode, "
        f"{DEMO_NEW_TOKENS} new tokens per prompt:"
    )
    texts: dict[str, list[str]] = {}
    for preset in DEMO_PRESETS:
        out = generate_from_export(
            export_uri(work, preset),
            DEMO_PROMPTS,
            max_new_tokens=DEMO_NEW_TOKENS,
            mode="kv",
            **demo_sampling(greedy),
        )
        ends = (
            f"natural sentence ends {out.natural_end_rate:.0%}"
            if not math.isnan(out.natural_end_rate)  # nan: no sentence ended at all
            else "no sentence ended"
        )
        print(f"  {preset} ({ends}):")
        for prompt, text in zip(DEMO_PROMPTS, out.texts, strict=True):
            print(f"    > {prompt}\n      {text}")
        texts[preset] = out.texts
    return texts


def prompt_speed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    new_tokens: int,
    repeats: int,
    sampling: dict[str, Any],
) -> list[SpeedRow]:
    """Decode speed of every mode of ``model`` on text prompts, encoded as ``generate_text``
    encodes them (``measure_speed``: one untimed warm-up per mode, the same prompts and new
    tokens for every mode, modes interleaved over the repeats)."""
    from training.generation.text import encode_prompt
    from training.study.generation import measure_speed

    c = model.config
    ids = [
        encode_prompt(tokenizer, p, eos_id=c.eos_id, max_sentence_tokens=c.max_sentence_tokens)
        for p in prompts
    ]
    return measure_speed(
        model,
        ids,
        context=max(len(p) for p in ids),
        new_tokens=new_tokens,
        repeats=repeats,
        sampling=sampling,
    )


def format_speed(preset: str, rows: Sequence[SpeedRow]) -> list[str]:
    """One line per mode: median decode tokens/s and the range over the repeats."""
    return [
        f"  {preset:10s} {r.mode:14s} {r.median:7,.0f} tok/s "
        f"[{min(r.tokens_per_s):,.0f}-{max(r.tokens_per_s):,.0f}]"
        for r in rows
    ]


def measure_models(work: Path, *, greedy: bool) -> dict[str, list[SpeedRow]]:
    import torch
    from tokenizers import Tokenizer

    from training.export import load_export

    print()
    log(
        f"decode speed, {len(DEMO_PROMPTS)} prompts x {DEMO_NEW_TOKENS} new tokens, "
        f"{describe_sampling(greedy)}, {torch.get_num_threads()} CPU threads: median of "
        f"{DEMO_SPEED_REPEATS} repeats [min-max], after one untimed warm-up per mode, "
        "modes interleaved"
    )
    speed: dict[str, list[SpeedRow]] = {}
    for preset in DEMO_PRESETS:
        exp = load_export(export_uri(work, preset))
        rows = prompt_speed(
            exp.model,
            Tokenizer.from_str(exp.tokenizer_json),
            DEMO_PROMPTS,
            new_tokens=DEMO_NEW_TOKENS,
            repeats=DEMO_SPEED_REPEATS,
            sampling=demo_sampling(greedy),
        )
        print("\n".join(format_speed(preset, rows)), flush=True)
        speed[preset] = rows
    return speed


def compare_models(work: Path) -> None:
    from training.compare import compare_runs

    runs = [str(work / f"train-{p}") for p in DEMO_PRESETS]
    compare_runs(runs, str(work / "compare"), [str(work / "eval")])
    print()
    log(f"runs compared ({work / 'compare'}: compare.png, compare.md):")
    print((work / "compare" / "compare.md").read_text())


def run_demo(workdir: Path, *, fresh: bool, greedy: bool = False) -> DemoResult:
    """Every step of the demo in ``workdir`` (``fresh``: deleted first); ``greedy`` generates
    greedily instead of with seeded sampling."""
    work = workdir.absolute()
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    prepare_data(work)
    train_models(work)
    evaluate_models(work)
    texts = generate_texts(work, greedy=greedy)
    speed = measure_models(work, greedy=greedy)
    compare_models(work)
    return DemoResult(workdir=work, texts=texts, speed=speed)
