"""Training job: ``python -m jobs.train --data URI --output URI [--config FILE] ...``."""

from __future__ import annotations

import argparse
import json
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a `gpthf preprocess` output (its manifest is read)")
    p.add_argument("--output", help="run folder (local or s3://): checkpoints, metrics, export")
    p.add_argument("--config", help="YAML file: any field of training.train.config.TrainConfig")
    p.add_argument("--model", help="model preset (gpthf-tiny, gpt-tiny, gpthf-8-4, gpt-12, ...)")
    p.add_argument("--model-overrides", help="JSON of ModelConfig fields, e.g. '{\"d_model\": 64}'")
    p.add_argument("--workers", type=int)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument(
        "--placement-strategy", choices=["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"]
    )
    p.add_argument("--gpu", action="store_true", default=None)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--micro-batch", type=int, help="blocks per worker per micro-batch")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--total-steps", type=int, help="length of the schedule")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="stop at this step without changing the run")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run name inside --output (default train)")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue from the last checkpoint"
    )
    p.add_argument("--activation-checkpointing", action="store_true", default=None)


def overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "data.uri": args.data,
        "run.output": args.output,
        "model.preset": args.model,
        "model.overrides": json.loads(args.model_overrides) if args.model_overrides else None,
        "run.workers": args.workers,
        "run.cpus_per_worker": args.cpus_per_worker,
        "run.placement_strategy": args.placement_strategy,
        "run.gpu": args.gpu,
        "deepspeed.zero_stage": args.zero_stage,
        "deepspeed.micro_batch_rows": args.micro_batch,
        "deepspeed.grad_accum": args.grad_accum,
        "deepspeed.activation_checkpointing": args.activation_checkpointing,
        "optim.lr": args.lr,
        "optim.total_steps": args.total_steps,
        "optim.warmup_steps": args.warmup_steps,
        "run.max_steps": args.max_steps,
        "run.checkpoint_every": args.checkpoint_every,
        "run.eval_every": args.eval_every,
        "run.seed": args.seed,
        "run.name": args.name,
        "run.resume": args.resume,
    }


def main(args: argparse.Namespace) -> int:
    from training.train.config import load_train_config
    from training.train.driver import format_summary, run_training

    cfg = load_train_config(args.config, overrides(args))
    result = run_training(cfg)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
