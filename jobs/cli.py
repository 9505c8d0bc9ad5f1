"""``gpthf``: the command line. Each subcommand parses, builds, runs and closes; logic lives elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs.entry import add_job_parser, run_command
from jobs.registry import JOBS
from pipeline.config import InputConfig, StorageConfig
from pipeline.settings import choices_of


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pipeline.tokenizer import train_tokenizer

    input_cfg = InputConfig(
        format=args.format, text_field=args.text_field, text_document=args.text_document
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


def cmd_sample_corpus(args: argparse.Namespace) -> int:
    from pipeline.sample_corpus import ensure_sample_corpus

    print(ensure_sample_corpus())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpthf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, job in JOBS.items():
        add_job_parser(sub.add_parser(name, help=job.help, description=job.help), name)

    from jobs.submit import add_jobs_args, add_submit_args, cmd_jobs, cmd_submit

    sm = sub.add_parser("submit", help="run one of our commands as a Ray job on a cluster")
    add_submit_args(sm)
    sm.set_defaults(func=cmd_submit)
    jb = sub.add_parser("jobs", help="list, inspect, follow or stop submitted Ray jobs")
    add_jobs_args(jb)
    jb.set_defaults(func=cmd_jobs)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = tok_sub.add_parser("train", help="train a byte-level BPE on a sample of the inputs")
    t.add_argument("inputs", nargs="+", metavar="INPUT")
    t.add_argument("--output", required=True, help="where to write tokenizer.json (local or URL)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--sample-bytes", type=int, default=50_000_000, help="text sampled for training")
    t.add_argument("--format", choices=choices_of(InputConfig, "format"), default="auto")
    t.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    t.add_argument(
        "--text-document", choices=choices_of(InputConfig, "text_document"), default="file"
    )
    t.add_argument("--endpoint-url", help="S3-protocol endpoint (default: AWS_ENDPOINT_URL)")
    t.set_defaults(func=cmd_tokenizer_train)

    from jobs import compare, demo, hf

    e = sub.add_parser("export-hf", help="write a Hugging Face folder of a trained model")
    hf.add_export_args(e)
    e.set_defaults(func=hf.cmd_export_hf)
    i = sub.add_parser("import-hf", help="a folder written by export-hf back into a gpthf export")
    hf.add_import_args(i)
    i.set_defaults(func=hf.cmd_import_hf)
    le = sub.add_parser(
        "lm-eval", help="lm-evaluation-harness with --model gpthf registered", add_help=False
    )
    hf.add_lm_eval_args(le)
    le.set_defaults(func=hf.cmd_lm_eval)
    c = sub.add_parser("compare", help="runs side by side: loss curves (PNG) and a table")
    compare.add_args(c)
    c.set_defaults(func=compare.main)

    d = sub.add_parser("demo", help="the main job on the embedded default, end to end")
    demo.add_args(d)
    d.set_defaults(func=demo.main)

    s = sub.add_parser("sample-corpus", help="fetch (once) and print the sample corpus folder")
    s.set_defaults(func=cmd_sample_corpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's own (argparse would eat them)
        from jobs.hf import cmd_lm_eval

        ns = argparse.Namespace(lm_eval_args=argv[1:])
        return run_command("lm-eval", cmd_lm_eval, ns)
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
