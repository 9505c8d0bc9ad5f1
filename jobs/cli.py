"""``gpthf``: the command line. Each subcommand parses, builds, runs and closes; logic lives elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pipeline.config import ConfigError, InputConfig, StorageConfig

EXIT_USAGE = 2


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files, prefixes or globs (local or s3://)"
    )
    p.add_argument("--output", help="output location (local path or s3://bucket/prefix)")
    p.add_argument("--tokenizer", help="tokenizer JSON (local or URL)")
    p.add_argument("--config", help="YAML file; any field of PreprocessConfig (flags override it)")
    p.add_argument("--sentences-per-block", "-S", type=int, dest="S", help="S (default 32)")
    p.add_argument("--max-sentence-tokens", "-M", type=int, dest="M", help="M (default 64)")
    p.add_argument("--heldout-fraction", type=float, help="documents held out (default 0.01)")
    p.add_argument("--seed", type=int, help="seed of the held-out split (default 0)")
    p.add_argument("--strict", action="store_true", default=None, help="skipped records are fatal")
    p.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"])
    p.add_argument("--text-field", help="JSONL field / Parquet column with the text (default text)")
    p.add_argument("--id-field", help="field with a stable document id (default: path#record)")
    p.add_argument(
        "--text-document", choices=["file", "paragraph"], help="plain-text document unit"
    )
    p.add_argument("--workers", type=int, help="concurrent tasks (default: one per CPU)")
    p.add_argument(
        "--on-changed", choices=["error", "replace"], help="inputs changed since processed"
    )
    p.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-plot", action="store_true", help="skip stats.png")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def preprocess_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "input.paths": args.inputs or None,
        "output": args.output,
        "tokenizer": args.tokenizer,
        "packing.sentences_per_block": args.S,
        "packing.max_sentence_tokens": args.M,
        "packing.heldout_fraction": args.heldout_fraction,
        "packing.seed": args.seed,
        "strict": args.strict,
        "input.format": args.format,
        "input.text_field": args.text_field,
        "input.id_field": args.id_field,
        "input.text_document": args.text_document,
        "workers": args.workers,
        "on_changed": args.on_changed,
        "storage.endpoint_url": args.endpoint_url,
        "plot": False if args.no_plot else None,
    }


def cmd_preprocess(args: argparse.Namespace) -> int:
    from jobs.preprocess import main as run

    return run(args)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pipeline.tokenizer import train_tokenizer

    input_cfg = InputConfig(
        format=args.format or "auto",
        text_field=args.text_field or "text",
        text_document=args.text_document or "file",
    )
    loaded = train_tokenizer(
        args.inputs,
        args.output,
        vocab_size=args.vocab_size,
        sample_bytes=args.sample_bytes,
        input_cfg=input_cfg,
        storage=StorageConfig(endpoint_url=args.endpoint_url),
    )
    print(
        f"tokenizer written to {args.output}: vocab {loaded.vocab_size}, "
        f"special ids {loaded.special_ids}, sha256 {loaded.sha256[:16]}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jobs.train import main as run

    return run(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from jobs.generate import main as run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from jobs.evaluate import main as run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import main as run

    return run(args)


def cmd_sample_corpus(args: argparse.Namespace) -> int:
    from pipeline.sample_corpus import ensure_sample_corpus

    print(ensure_sample_corpus())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpthf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="raw corpora -> packed sentence blocks + manifest")
    _add_preprocess_args(p)
    p.set_defaults(func=cmd_preprocess)

    tr = sub.add_parser(
        "train", help="train GPTHF (or the GPT baseline) with Ray Train + DeepSpeed"
    )
    from jobs.train import add_args as add_train_args

    add_train_args(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="batch perplexity evaluation of exports over held-out shards")
    from jobs.evaluate import add_args as add_eval_args

    add_eval_args(ev)
    ev.set_defaults(func=cmd_eval)

    from jobs.submit import add_jobs_args, add_submit_args, cmd_jobs, cmd_submit

    sm = sub.add_parser("submit", help="run one of our commands as a Ray job on a cluster")
    add_submit_args(sm)
    sm.set_defaults(func=cmd_submit)
    jb = sub.add_parser("jobs", help="list, inspect, follow or stop submitted Ray jobs")
    add_jobs_args(jb)
    jb.set_defaults(func=cmd_jobs)

    ng = sub.add_parser(
        "nightly", help="incremental preprocessing of what arrived since the last run"
    )
    from jobs.nightly import add_args as add_nightly_args
    from jobs.nightly import main as nightly_main

    add_nightly_args(ng)
    ng.set_defaults(func=nightly_main)

    g = sub.add_parser("generate", help="generate text from a trained export (cached, fast)")
    from jobs.generate import add_args as add_generate_args

    add_generate_args(g)
    g.set_defaults(func=cmd_generate)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = tok_sub.add_parser("train", help="train a byte-level BPE on a sample of the inputs")
    t.add_argument("inputs", nargs="+", metavar="INPUT")
    t.add_argument("--output", required=True, help="where to write tokenizer.json (local or URL)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--sample-bytes", type=int, default=50_000_000, help="text sampled for training")
    t.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"])
    t.add_argument("--text-field")
    t.add_argument("--text-document", choices=["file", "paragraph"])
    t.add_argument("--endpoint-url")
    t.set_defaults(func=cmd_tokenizer_train)

    d = sub.add_parser("demo", help="the main job on the embedded default, end to end")
    d.add_argument(
        "--workdir", default="runs/demo", help="where the demo writes (default runs/demo)"
    )
    d.add_argument("--fresh", action="store_true", help="delete the workdir first")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample-corpus", help="fetch (once) and print the sample corpus folder")
    s.set_defaults(func=cmd_sample_corpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from jobs.submit import SubmitError
    from pipeline.manifest import ManifestError
    from pipeline.preprocess import ChangedInputError
    from pipeline.storage import StorageError
    from pipeline.tokenizer import TokenizerError
    from training.checkpoint import CheckpointError
    from training.config import TrainConfigError
    from training.eval_job import EvalError

    user_errors = (
        ConfigError,
        StorageError,
        ManifestError,
        TokenizerError,
        ChangedInputError,
        TrainConfigError,
        CheckpointError,
        EvalError,
        SubmitError,
    )
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except user_errors as exc:
        print(f"gpthf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
