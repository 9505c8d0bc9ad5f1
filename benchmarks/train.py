"""What the trainer costs: ``gpthf train`` against a bare torch loop of the same work, and the
fixed cost of a small fit, part by part.

    .venv/bin/python benchmarks/train.py                 # the pair, 24 steps of 8 blocks, 3 repeats
    .venv/bin/python benchmarks/train.py --quick         # gpthf-tiny, 10 steps of 4 blocks, 3 repeats
    .venv/bin/python benchmarks/train.py --pair gpthf-8-4,gpt-12 --gpu   # a GPU node

Under the benchmark protocol (``benchmarks/protocol.py``). Sides, per model of ``--pair``, in
turn within each of ``--repeats`` repeats (the order rotating):

- **trainer**: ``gpthf train`` as a user runs it, in a subprocess (Python start-up, the
  embedded Ray's start and stop, Ray Train + DeepSpeed ZeRO, checkpoint, export): a fresh
  output each time, ``--total-steps`` steps on the sample corpus (preprocessed once,
  ``--workdir`` keeps it). RAY_ADDRESS is removed from its environment.
- **bare, trainer threads**: the same model, batch, optimizer and data in this process, no
  Ray, no DeepSpeed (:class:`BareLoop`): the rank's shards read with pyarrow in the trainer's
  order (``training.data.order``), collated as the worker does, the model built under the
  run's seed, forward + summed cross-entropy over the step's targets + backward, the global
  gradient norm clipped, the run's AdamW (same parameter groups) and warmup + cosine schedule
  stepped. At the torch threads a Ray Train worker runs with (Ray sets OMP_NUM_THREADS to the
  worker's whole CPUs, at least 1; each trainer run's own count, from its summary, is checked
  against it).
- **bare, all cores**: the same loop at this process's cores (a reference row).

**Steady state**: tokens/s over the steps after the first ``WARMUP_STEPS`` (the trainer's from
its metrics.jsonl, each step's wall time from the end of the step before: data wait, collate,
forward, backward, optimizer, metrics; the bare loop's timed the same way). The sides are
asserted to have measured the same steps and tokens (``same_work``), and their first step's
loss (same seed, same batch, before any update) to agree within ``LOSS_RTOL``: the proof they
do the same work. trainer / bare is taken per repeat (median, min-max). Goal:
``trainer_over_bare`` >= 0.9 at the same threads.

**Fixed cost** of each trainer run: wall (launch to exit) minus its steps' time, with its
parts from the run's summary.json ``phases`` (``training.train.driver.run_phases``): start-up
(Python, imports, config; launch to the run's start), setup (config and data checks), Ray
start, worker group start, engine build (deepspeed.initialize), first batch (the data
pipeline's start to its first batch), validation, checkpoint, worker stop, export, other;
shutdown (the export's end to the process's exit: the embedded Ray going down). Median and
min-max over the repeats. Goal: <= 15 s for a small fit on the embedded Ray.

Result: ``benchmarks/results/train[_quick].json`` (or ``--out``) with the environment, and the
table beside it as ``.md``. A missed goal is said in the output, as ``GOAL MISSED``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.protocol import (  # noqa: E402
    MIN_REPEATS,
    Run,
    Samples,
    Spread,
    interleave,
    markdown_table,
    ratio,
    same_work,
    write_result,
)

WARMUP_STEPS = 3
"""Steps left out of the steady state (the first batch, first allocations)."""
LOSS_RTOL = {"fp32": 1e-4, "bf16": 3e-2}
"""How close the first step's loss of the bare loop must be to the trainer's (relative)."""
GOALS = {"trainer_over_bare": 0.9, "fixed_cost_s": 15.0}
FIXED_PARTS = (
    "startup",
    "setup",
    "ray_start",
    "retries",
    "worker_start",
    "engine_build",
    "first_batch",
    "validate",
    "checkpoint",
    "worker_stop",
    "export",
    "other",
    "shutdown",
)
"""The parts of a trainer run's fixed cost, in the order they happen (``other``: what the
run's summary leaves unaccounted inside the run)."""


# ----------------------------------------------------------------------------------- the data


def prepare_data(work: Path) -> Path:
    """The sample corpus, preprocessed once into ``work/data`` (kept by ``--workdir``), in this
    process: Ray is never started here."""
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    corpus = ensure_sample_corpus()
    tok = work / "tokenizer.json"
    if not tok.exists():
        train_tokenizer([str(corpus)], str(tok), vocab_size=8192, sample_bytes=20_000_000)
    out = work / "data"
    run_preprocess(
        PreprocessConfig(
            input=InputConfig(paths=[str(corpus)]),
            output=str(out),
            tokenizer=str(tok),
            packing=PackingConfig(heldout_fraction=0.05),
            plot=False,
            local_below_bytes=1 << 40,  # in this process, without Ray
        )
    )
    return out


# ------------------------------------------------------------------------------ the configs


def run_overrides(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The training settings both sides use (dotted keys of ``TrainConfig``)."""
    return {
        "model.preset": preset,
        "run.workers": 1,
        "run.gpu": bool(args.gpu),
        "run.cpus_per_worker": args.cpus_per_worker,
        "deepspeed.zero_stage": args.zero_stage,
        "deepspeed.micro_batch_rows": args.micro_batch,
        "optim.total_steps": args.steps,
        "optim.warmup_steps": min(5, args.steps),
        # One checkpoint and one validation, at the end: a small fit as a user runs it, and
        # nothing inside the steady state.
        "run.checkpoint_every": args.steps,
        "run.eval_every": args.steps,
    }


def write_yaml(path: Path, overrides: dict[str, Any]) -> Path:
    """Dotted overrides as the nested YAML ``--config`` reads (None values left out)."""
    import yaml

    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(nested, sort_keys=True))
    return path


def trainer_threads(cpus_per_worker: float | None) -> int:
    """The torch threads of a CPU Ray Train worker: Ray sets OMP_NUM_THREADS, where it is not
    set already, to the worker's whole CPUs, at least 1; ``run.cpus_per_worker`` unset is at
    most 1 on CPU (``driver.default_cpus_per_worker``)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, math.floor(cpus_per_worker or 1.0))


# ----------------------------------------------------------------------------- the bare loop


class BareLoop:
    """The trainer's step on one process, without Ray or DeepSpeed.

    The model under the run's seed (``TrainWorker.build``), the run's AdamW and schedule
    (``training.train.optimizer.build_optimizer``); batches in the order the trainer's rank 0
    reads them (``batches``); ``step``: per micro-batch forward, the summed NLL over the
    step's targets, backward, then the gradient norm clipped to ``optim.grad_clip``, the
    optimizer and schedule stepped (what DeepSpeed does at the step's boundary). One rank and
    no pruning: the trainer runs this benchmark with one worker and no gates.
    """

    def __init__(self, setup: Any, device: str = "cpu") -> None:
        import torch

        from training.model import build_model
        from training.train.optimizer import build_optimizer

        cfg, mc = setup.cfg, setup.model_config
        if setup.world != 1 or mc.prune:
            raise ValueError("the bare loop is one rank without pruning gates")
        self.setup, self.device = setup, torch.device(device)
        bf16 = cfg.deepspeed.bf16
        self.bf16 = bf16 if bf16 is not None else self.device.type == "cuda"
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(mc).to(self.device)
        self.model.train()
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.optim, cfg.pruning.lr_scale
        )

    def batches(self) -> Iterator[tuple[int, list[Any]]]:
        """(step, micro-batches) from step 0: rank 0's shards read with pyarrow, chunked and
        shuffled by ``training.data.order`` (what Ray Data streams to the trainer's worker)."""
        from training.data.order import rank_micro_batches, resume_point, stream_paths
        from training.train.local import arrow_stream

        s, data = self.setup, self.setup.cfg.data
        rp = resume_point(s.plans, 0, 0, s.rows_per_step, data.shuffle_chunk_rows)
        uris = [f"{s.data_uri}/{p}" for p in stream_paths(s.plans, 0, rp)]
        return rank_micro_batches(
            arrow_stream(uris, s.cfg.storage),
            s.plans,
            0,
            0,
            micro_rows=s.cfg.deepspeed.micro_batch_rows,
            grad_accum=s.cfg.deepspeed.grad_accum,
            chunk_rows=data.shuffle_chunk_rows,
            seed=data.shuffle_seed,
        )

    def step(self, micro_batches: Sequence[Any]) -> tuple[float, int, float]:
        """One optimizer step; (loss: summed NLL over the targets, real tokens, collate s)."""
        import torch
        import torch.nn.functional as F

        from training.data.collate import IGNORE_INDEX, collate_blocks

        cfg, mc = self.setup.cfg, self.setup.model_config
        t0 = time.perf_counter()
        collated = [
            collate_blocks(m, pad_id=mc.pad_id, pad_to_multiple=cfg.data.pad_to_multiple)
            for m in micro_batches
        ]
        collate_s = time.perf_counter() - t0
        targets = sum(b.num_targets for b in collated)
        tokens = sum(b.num_tokens for b in collated)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in collated:
            b = b.to(self.device)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                logits = self.model(b.input_ids, b.sentence_ids, b.document_ids)
            nll = F.cross_entropy(
                logits.float().flatten(0, 1),
                b.labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (nll / targets).backward()
            total += nll.detach().double()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (
            float(total) / targets,
            tokens,
            collate_s,
        )  # the read syncs the device, as the worker's


def bare_run(setup: Any, threads: int, device: str = "cpu") -> Run:
    """The bare loop over the run's steps at ``threads`` torch threads; the Run's seconds are
    those of the steps after ``WARMUP_STEPS``, each timed from the end of the step before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        loop = BareLoop(setup, device)
        batches = loop.batches()
        build_s = time.perf_counter() - t0
        losses, times, tokens, waits = [], [], [], []
        t_last = time.perf_counter()
        for _ in range(setup.end_step):
            t = time.perf_counter()
            _, micros = next(batches)
            wait = time.perf_counter() - t
            loss, n, collate_s = loop.step(micros)
            now = time.perf_counter()
            times.append(now - t_last)
            t_last = now
            losses.append(loss)
            tokens.append(n)
            waits.append(wait + collate_s)
    finally:
        torch.set_num_threads(before)
    k = WARMUP_STEPS
    return Run(
        sum(times[k:]),
        {"steps": len(times[k:]), "tokens": sum(tokens[k:])},
        {
            "threads": threads,
            "losses": losses,
            "build_s": build_s,
            "first_step_s": times[0],
            "wall_s": build_s + sum(times),
            "data_wait_frac": sum(waits[k:]) / sum(times[k:]),
        },
    )


# ------------------------------------------------------------------------------- the trainer


def trainer_run(
    gpthf: str, config: Path, data: Path, out: Path, logs: Path, threads: int, steps: int
) -> Run:
    """``gpthf train`` in a subprocess, a fresh output; the Run's seconds are its steps after
    ``WARMUP_STEPS`` (metrics.jsonl), its extra the fixed cost and its parts."""
    from training.train.driver import read_metrics

    if out.exists():
        shutil.rmtree(out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [gpthf, "train", "--config", str(config), "--data", str(data), "--output", str(out)]
    log = logs / f"{out.name}.log"
    launched = time.time()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    ended = launched + wall
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"gpthf train failed (exit {proc.returncode}), log {log}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("torch_threads") != threads:
        raise SystemExit(
            f"the trainer's worker ran torch on {summary.get('torch_threads')} threads, the bare "
            f"loop on {threads}: set OMP_NUM_THREADS or --cpus-per-worker so that they agree"
        )
    records = {r["step"]: r for r in read_metrics(str(out)) if "loss" in r}
    if sorted(records) != list(range(1, steps + 1)):
        raise SystemExit(f"{out}/metrics.jsonl lacks steps: {sorted(records)}")
    steady = [records[s] for s in range(WARMUP_STEPS + 1, steps + 1)]
    phases = summary.get("phases") or {}
    if "steps" not in phases:
        raise SystemExit(f"{out}/summary.json has no steps phase (a retried fit?): {phases}")
    total = phases.pop("total")
    parts = {"startup": summary["started_at"] - launched}
    parts |= {k: v for k, v in phases.items() if k != "steps"}
    parts["shutdown"] = ended - summary["started_at"] - total
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return Run(
        sum(r["step_time_s"] for r in steady),
        {"steps": len(steady), "tokens": sum(r["tokens"] for r in steady)},
        {
            "threads": summary["torch_threads"],
            "losses": [records[s]["loss"] for s in range(1, steps + 1)],
            "wall_s": wall,
            "steps_s": phases["steps"],
            "fixed_s": wall - phases["steps"],
            "parts": parts,
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
            "mfu": statistics.median(mfu) if mfu else None,
            "log": str(log),
        },
    )


# ------------------------------------------------------------------------------- the report


def measure(args: argparse.Namespace, work: Path, data: Path) -> dict[str, Any]:
    """Every side of every model, interleaved within each repeat; checked and summarised."""
    import functools

    from training.train.config import load_train_config
    from training.train.driver import setup_run

    threads = trainer_threads(args.cpus_per_worker)
    cores = len(os.sched_getaffinity(0))
    device = "cuda" if args.gpu else "cpu"
    gpthf = str(Path(sys.executable).parent / "gpthf")
    if not Path(gpthf).exists():
        raise SystemExit(f"{gpthf} not found: install the project (pip install -e .) in this venv")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    presets = args.pair.split(",")
    runs = iter(range(10**6))
    sides: dict[str, Callable[[], Run]] = {}
    configs = {}
    for preset in presets:
        overrides = run_overrides(preset, args)
        yaml_path = write_yaml(work / f"{preset}.yaml", overrides)
        cfg = load_train_config(yaml_path, {"data.uri": str(data), "run.output": str(work)})
        configs[preset] = cfg.to_dict(redact=True)
        setup = setup_run(cfg, verify=False)

        def trainer_side(preset: str = preset, yaml_path: Path = yaml_path) -> Run:
            out = work / f"run-{preset}-{next(runs)}"
            try:
                return trainer_run(gpthf, yaml_path, data, out, logs, threads, args.steps)
            finally:
                shutil.rmtree(out, ignore_errors=True)

        sides[f"{preset} trainer"] = trainer_side
        sides[f"{preset} bare"] = functools.partial(bare_run, setup, threads, device)
        if cores != threads and not args.gpu:
            sides[f"{preset} bare all cores"] = functools.partial(bare_run, setup, cores, device)
    if args.repeats < MIN_REPEATS:
        print(f"# --repeats {args.repeats} < {MIN_REPEATS}: a rehearsal, not a protocol figure")
    t = interleave(sides, args.repeats)

    precision = "bf16" if args.gpu else "fp32"
    models: dict[str, Any] = {}
    for preset in presets:
        trainer = f"{preset} trainer"
        bares = [n for n in sides if n.startswith(f"{preset} bare")]
        same_work(t, trainer, *bares)
        loss_check = {b: first_losses(t, trainer, b, LOSS_RTOL[precision]) for b in bares}
        runs_ = t[trainer].runs
        fixed: dict[str, Any] = {
            "wall_s": Spread.of([r.extra["wall_s"] for r in runs_]).to_dict(),
            "steps_s": Spread.of([r.extra["steps_s"] for r in runs_]).to_dict(),
            "fixed_s": Spread.of([r.extra["fixed_s"] for r in runs_]).to_dict(),
            "parts": {
                k: Spread.of([r.extra["parts"].get(k, 0.0) for r in runs_]).to_dict()
                for k in FIXED_PARTS
            },
        }
        fixed_median = fixed["fixed_s"]["median"]
        over_bare = ratio(t, trainer, f"{preset} bare")
        entry: dict[str, Any] = {
            "work": dict(t[trainer].work),
            "tokens_per_s": {n: t[n].rate("tokens").to_dict() for n in [trainer, *bares]},
            "threads": {n: t[n].runs[0].extra["threads"] for n in [trainer, *bares]},
            "data_wait_frac": {
                n: Spread.of([r.extra["data_wait_frac"] for r in t[n].runs]).to_dict()
                for n in [trainer, *bares]
            },
            "trainer_over_bare": over_bare.to_dict(),
            "fixed_cost": fixed,
            "loss_check": loss_check,
            "goals": {
                "trainer_over_bare": {
                    "goal": GOALS["trainer_over_bare"],
                    "median": over_bare.spread.median,
                    "met": over_bare.spread.median >= GOALS["trainer_over_bare"],
                },
                "fixed_cost_s": {
                    "goal": GOALS["fixed_cost_s"],
                    "median": fixed_median,
                    "met": fixed_median <= GOALS["fixed_cost_s"],
                },
            },
        }
        if f"{preset} bare all cores" in t:
            entry["trainer_over_bare_all_cores"] = ratio(
                t, trainer, f"{preset} bare all cores"
            ).to_dict()
        mfu = [r.extra["mfu"] for r in runs_ if r.extra["mfu"] is not None]
        if mfu:
            entry["mfu"] = Spread.of(mfu).to_dict()
        models[preset] = entry
    pair: dict[str, Any] = {}
    if len(presets) == 2:
        a, b = presets
        same_work(t, f"{a} trainer", f"{b} trainer")  # one data order and batch: the same tokens
        pair = {
            "trainer": ratio(t, f"{a} trainer", f"{b} trainer").to_dict(),
            "bare": ratio(t, f"{a} bare", f"{b} bare").to_dict(),
        }
    return {
        "threads": {"trainer": threads, "all_cores": cores},
        "configs": configs,
        "models": models,
        "pair_over": {"side": presets[0], "base": presets[-1], **pair} if pair else None,
        "samples": {n: s.summary() for n, s in t.items()},
        "losses": {n: [r.extra["losses"] for r in s.runs] for n, s in t.items()},
        "logs": [r.extra["log"] for n in sides if n.endswith("trainer") for r in t[n].runs],
    }


def first_losses(t: dict[str, Samples], trainer: str, bare: str, rtol: float) -> dict[str, Any]:
    """The first step's loss (same seed, same batch, no update yet) of ``bare`` against the
    trainer's, per repeat; a difference beyond ``rtol`` (relative) ends the benchmark. The
    largest difference over all steps is reported (the optimizers' rounding differs)."""
    first, every = [], []
    for a, b in zip(t[trainer].runs, t[bare].runs, strict=True):
        la, lb = a.extra["losses"], b.extra["losses"]
        rel = [abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True)]
        first.append(rel[0])
        every.append(max(rel))
    if max(first) > rtol:
        raise SystemExit(
            f"{bare}'s first loss differs from {trainer}'s by {max(first):.2e} (relative, > "
            f"{rtol:g}): the two do not train the same model on the same batch"
        )
    return {"first_step_rel_diff_max": max(first), "any_step_rel_diff_max": max(every)}


def _x(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f}x ({r['low']:.3f}-{r['high']:.3f})"


def _s(r: dict[str, Any], nd: int = 2) -> str:
    return f"{r['median']:.{nd}f} ({r['low']:.{nd}f}-{r['high']:.{nd}f})"


def goal_lines(report: dict[str, Any]) -> list[str]:
    out = []
    for preset, m in report["models"].items():
        g = m["goals"]
        r, f = g["trainer_over_bare"], g["fixed_cost_s"]
        out.append(
            f"{'goal met' if r['met'] else 'GOAL MISSED'}: {preset} trainer / bare loop at the "
            f"same threads {r['median']:.3f}x (goal >= {r['goal']}x)"
        )
        out.append(
            f"{'goal met' if f['met'] else 'GOAL MISSED'}: {preset} fixed cost of a small fit "
            f"{f['median']:.1f} s (goal <= {f['goal']:g} s)"
        )
    return out


def report_markdown(report: dict[str, Any]) -> str:
    th = report["threads"]
    lines = [
        f"`gpthf train` (subprocess, embedded Ray, {report['zero_stage_text']}) against a bare "
        f"torch loop of the same model, batch, optimizer and data; {report['steps']} steps of "
        f"{report['micro_batch_rows']} blocks, steady state = steps {WARMUP_STEPS + 1}-"
        f"{report['steps']}; trainer worker {th['trainer']} torch thread(s), all cores = "
        f"{th['all_cores']}; median (min-max) of {report['repeats']} interleaved repeats, "
        f"ratios per repeat{' (smoke: fewer than 3)' if report['smoke'] else ''}.",
        "",
    ]
    rows = []
    for preset, m in report["models"].items():
        trainer = f"{preset} trainer"
        for name, tps in m["tokens_per_s"].items():
            side = name[len(preset) + 1 :]
            if name == trainer:
                rel = "1"
            elif side == "bare":
                rel = _x(m["trainer_over_bare"])
            else:
                rel = _x(m["trainer_over_bare_all_cores"])
            rows.append(
                [
                    preset,
                    side,
                    m["threads"][name],
                    f"{tps['median']:,.0f} ({tps['low']:,.0f}-{tps['high']:,.0f})",
                    f"{m['data_wait_frac'][name]['median']:.1%}",
                    rel,
                ]
            )
    lines.append(
        markdown_table(
            ["model", "side", "threads", "tokens/s (steady)", "data wait", "trainer / side"],
            rows,
        )
    )
    presets = list(report["models"])
    header = ["part of the fixed cost (s)", *presets]
    prow = [[p, *(_s(report["models"][m]["fixed_cost"]["parts"][p]) for m in presets)]
            for p in FIXED_PARTS]  # fmt: skip
    fc = [report["models"][m]["fixed_cost"] for m in presets]
    prow.append(["**fixed cost = wall - steps**", *(f"**{_s(f['fixed_s'])}**" for f in fc)])
    prow.append(["steps", *(_s(f["steps_s"]) for f in fc)])
    prow.append(["wall (launch to exit)", *(_s(f["wall_s"]) for f in fc)])
    lines += ["", markdown_table(header, prow)]
    if report.get("pair_over"):
        p = report["pair_over"]
        lines += [
            "",
            f"{p['side']} / {p['base']} tokens/s: trainer {_x(p['trainer'])}, bare loop "
            f"{_x(p['bare'])}",
        ]
    lines += ["", *(f"- {g}" for g in goal_lines(report))]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pair", default=None, help="models (default gpthf-tiny,gpt-tiny)")
    ap.add_argument("--steps", type=int, default=None, help="steps a run (default 24)")
    ap.add_argument("--repeats", type=int, default=MIN_REPEATS, help="interleaved repeats")
    ap.add_argument("--micro-batch", type=int, default=None, help="blocks a step (default 8)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=None,
                    help="the trainer's run.cpus_per_worker (default: its own default)")  # fmt: skip
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16 (the bare loop: autocast)")
    ap.add_argument(
        "--quick", action="store_true", help="one model (gpthf-tiny), 10 steps of 4 blocks"
    )
    ap.add_argument("--workdir", default=None, help="keeps the preprocessed data and run logs")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/train[_quick].json)")
    args = ap.parse_args()
    args.pair = args.pair or ("gpthf-tiny" if args.quick else "gpthf-tiny,gpt-tiny")
    args.steps = args.steps or (10 if args.quick else 24)
    args.micro_batch = args.micro_batch or (4 if args.quick else 8)
    if args.steps <= WARMUP_STEPS:
        raise SystemExit(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpthf-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = prepare_data(work)
        print(f"data: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        measured = measure(args, work, data)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "pair": args.pair.split(","),
        "device": "cuda" if args.gpu else "cpu",
        "steps": args.steps,
        "warmup_steps_left_out": WARMUP_STEPS,
        "micro_batch_rows": args.micro_batch,
        "zero_stage": args.zero_stage,
        "zero_stage_text": f"DeepSpeed ZeRO-{args.zero_stage}",
        "repeats": args.repeats,
        "smoke": args.repeats < MIN_REPEATS,
        "quick": args.quick,
        "timing": f"{args.repeats} interleaved repeats (order rotating) of the trainer and the "
        "bare loops; tokens/s over the steady-state steps, median (min-max); ratios per repeat; "
        "fixed cost = wall - steps, per trainer run",
        **measured,
    }
    md = report_markdown(report)
    report["table"] = md
    name = "train_quick" if args.quick else "train"
    path = write_result(name, report, args.out)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    for line in goal_lines(report):
        print(line)
    print(f"written to {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
