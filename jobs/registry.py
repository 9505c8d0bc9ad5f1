"""The commands that run as jobs: each module has ``add_args(parser)`` (its flags, generated from
its config dataclass) and ``main(args)``, and is runnable as ``python -m <module>`` through
``jobs.entry.run_job``. The CLI and ``gpthf submit`` both read this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    module: str
    help: str


JOBS = {
    "preprocess": Job("jobs.preprocess", "raw corpora -> packed sentence blocks + manifest"),
    "contamination": Job(
        "jobs.contamination", "held-out documents with a copy in train: report, or --remove"
    ),
    "nightly": Job("jobs.nightly", "incremental preprocessing of what arrived since the last run"),
    "train": Job("jobs.train", "train GPTHF (or the GPT baseline) with Ray Train + DeepSpeed"),
    "eval": Job("jobs.evaluate", "batch perplexity evaluation of exports over held-out shards"),
    "study": Job(
        "jobs.study", "GPTHF against the GPT as the paper compares them: train, evaluate, report"
    ),
    "generate": Job("jobs.generate", "generate text from a trained export (cached, fast)"),
}
