"""``run_study``: data -> train every (model, seed) -> evaluate every export -> generation ->
report. Each stage skips what is already done, so a re-run only rewrites the report and a
study killed midway continues where it stopped (a run resumes from its last checkpoint).

Ray path (default): the real trainer (Ray Train + DeepSpeed) and `gpthf eval`'s Ray Data job.
``local``: ``training.train.local`` and the in-process scorer, for a machine without Ray.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.storage import filesystem_for, write_bytes_atomic
from training.study.config import StudyConfig, StudyConfigError
from training.study.plan import PlannedRun, StudyPlan, plan_study


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def _read_json(uri: str, storage: Any) -> Any | None:
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write_json(uri: str, data: Any, storage: Any) -> None:
    fs, path = filesystem_for(uri, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_bytes_atomic(fs, path, json.dumps(data, indent=1, allow_nan=False).encode())


# ---------------------------------------------------------------------------- data


def prepare_data(cfg: StudyConfig) -> str:
    """The data set's URI: the configured one, or the sample corpus prepared (once) in
    OUTPUT/data with the study's tokenizer and packing."""
    if cfg.data.uri:
        return cfg.data.uri.rstrip("/")
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    out = cfg.output.rstrip("/")
    data, tok = f"{out}/data", f"{out}/tokenizer.json"
    if Manifest.read(data, cfg.storage) is not None:
        return data
    corpus = ensure_sample_corpus()
    fs, tok_path = filesystem_for(tok, cfg.storage)
    if not fs.exists(tok_path):
        log(f"tokenizer: vocab {cfg.data.vocab_size} from {corpus}")
        train_tokenizer([str(corpus)], tok, vocab_size=cfg.data.vocab_size, sample_bytes=20_000_000)
    pre = PreprocessConfig(
        input=InputConfig(paths=[str(corpus)]),
        output=data,
        tokenizer=tok,
        packing=PackingConfig(
            sentences_per_block=cfg.data.sentences_per_block,
            heldout_fraction=cfg.data.heldout_fraction,
        ),
        storage=cfg.storage,
    )
    if cfg.local:  # no Ray on this machine: process in this process, however large
        pre.local_below_bytes = 1 << 62
    result = run_preprocess(pre)
    log(f"data: manifest v{result.version} in {data}")
    return data


# ---------------------------------------------------------------------------- train


def export_step(run: PlannedRun) -> int | None:
    """The step of the run's export, if it has one."""
    raw = _read_json(f"{run.folder}/export/config.json", run.train.storage)
    return int(raw["step"]) if raw and "step" in raw else None


def run_slots(cfg: StudyConfig, plan: StudyPlan) -> int:
    """How many runs train at once: ``train.parallel_runs``, or (0) as many as the cluster's
    CPUs (and GPUs) hold, a run taking its workers' CPUs plus one for the data tasks that feed
    them (fewer starve the data pipeline: STACK.md's 2-CPU hang); --local: one."""
    if cfg.local:
        return 1
    if cfg.train.parallel_runs:
        return cfg.train.parallel_runs
    import ray

    from training.train.driver import DATA_TASK_CPUS, default_cpus_per_worker

    res = ray.cluster_resources()
    total = res.get("CPU", 0.0)
    run = plan.runs[0].train.run
    cpus = run.cpus_per_worker
    if cpus is None:
        cpus = default_cpus_per_worker(run.workers, total, run.gpu)
    slots = int(total // (run.workers * cpus + DATA_TASK_CPUS)) if cpus > 0 else 1
    if run.gpu:
        slots = min(slots, int(res.get("GPU", 0.0) // run.workers))
    return max(1, slots)


def _train_task(train_cfg: Any) -> str:
    """One run, in a Ray task of its own (side by side with the study's other runs)."""
    from training.train.driver import format_summary, run_training

    return format_summary(run_training(train_cfg))


def train_runs(cfg: StudyConfig, plan: StudyPlan) -> None:
    todo = []
    for i, run in enumerate(plan.runs, 1):
        if export_step(run) == plan.steps:
            log(f"run {i}/{len(plan.runs)} {run.name}: trained ({plan.steps} steps), skipped")
        else:
            todo.append((i, run))
    if not todo:
        return
    if not cfg.local:
        from training.train.driver import init_ray_for_training

        init_ray_for_training()
    slots = min(run_slots(cfg, plan), len(todo))
    if slots > 1:
        _train_side_by_side(plan, todo, slots)
        return
    from training.train.driver import format_summary

    for i, run in todo:
        log(f"run {i}/{len(plan.runs)} {run.name}: training {plan.steps} steps in {run.folder}")
        t0 = time.perf_counter()
        if cfg.local:
            from training.train.local import run_local

            result = run_local(run.train)
        else:
            from training.train.driver import run_training

            result = run_training(run.train)
        print(format_summary(result), flush=True)
        log(f"run {run.name}: {time.perf_counter() - t0:.0f} s")
        _check_export(run, plan)


def _check_export(run: PlannedRun, plan: StudyPlan) -> None:
    if export_step(run) != plan.steps:
        raise UserError(f"run {run.name} ended without an export of step {plan.steps}")


def _train_side_by_side(plan: StudyPlan, todo: list[tuple[int, PlannedRun]], slots: int) -> None:
    """``slots`` runs at a time, each the real trainer in a Ray task (the task holds no CPU;
    its workers reserve theirs). A run that fails stops new ones from starting; those already
    training finish (nothing they did is lost), then the first failure is raised."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_train_task)
    log(f"training {len(todo)} runs, {slots} at a time")
    waiting = list(todo)
    running: dict[Any, tuple[int, PlannedRun, float]] = {}
    failure: BaseException | None = None
    while waiting or running:
        while waiting and len(running) < slots and failure is None:
            i, run = waiting.pop(0)
            log(f"run {i}/{len(plan.runs)} {run.name}: training {plan.steps} steps in {run.folder}")
            running[task.remote(run.train)] = (i, run, time.perf_counter())
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1)
        i, run, t0 = running.pop(done[0])
        try:
            print(ray.get(done[0]), flush=True)
            log(f"run {run.name}: {time.perf_counter() - t0:.0f} s")
            _check_export(run, plan)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log(f"run {run.name} failed: {str(cause).strip().splitlines()[-1][:300]}")
            failure = failure or cause
        except UserError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


# ---------------------------------------------------------------------------- eval


def eval_runs(cfg: StudyConfig, plan: StudyPlan, data: str) -> dict[str, Any]:
    """Every export scored on the held-out split by `gpthf eval`'s job (one report per run,
    OUTPUT/eval/<run>/report.json); a report of the same export step is reused."""
    from training.eval.config import EvalConfig
    from training.eval.job import run_eval
    from training.eval.report import EvalReport

    out = cfg.output.rstrip("/")
    reports: dict[str, Any] = {}
    for run in plan.runs:
        folder = f"{out}/eval/{run.name}"
        export = f"{run.folder}/export"
        raw = _read_json(f"{folder}/report.json", cfg.storage)
        if raw is not None:
            report = EvalReport.from_dict(raw)
            if report.checkpoints and report.checkpoints[0].step == plan.steps:
                reports[run.name] = report
                continue
        log(f"eval {run.name} on {data} (heldout)")
        reports[run.name] = run_eval(
            EvalConfig(
                checkpoints=[export],
                data=data,
                output=folder,
                gpu=cfg.gpu,
                local=cfg.local,
                storage=cfg.storage,
            )
        )
    return reports


# ---------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Prompts:
    by_context: dict[int, list[list[int]]]
    skipped: dict[int, str]
    """Contexts without prompts, and why."""


def held_out_prompts(cfg: StudyConfig, data: str, manifest: Manifest) -> Prompts:
    from training.study.generation import cut_prompts, document_tokens, read_split_rows

    docs = document_tokens(read_split_rows(data, "heldout", manifest, cfg.storage))
    g = cfg.generation
    by_context: dict[int, list[list[int]]] = {}
    skipped: dict[int, str] = {}
    for ctx in g.contexts:
        prompts = cut_prompts(
            docs, ctx, g.prompts, eos_id=manifest.eos_id, eod_id=manifest.eod_id, seed=g.seed
        )
        if prompts:
            by_context[ctx] = prompts
        else:
            longest = max((len(d) for d in docs), default=0)
            skipped[ctx] = f"no held-out document has {ctx} tokens of sentences (longest {longest})"
    return Prompts(by_context, skipped)


def generation_runs(cfg: StudyConfig, plan: StudyPlan, prompts: Prompts) -> dict[str, Any]:
    """Per run OUTPUT/generation/<run>.json: text statistics at every context; speed of every
    mode for the first seed of each model (speed does not depend on the seed)."""
    import torch
    from tokenizers import Tokenizer

    from training.export import load_export
    from training.study.generation import measure_speed, measure_text, sampling_kwargs

    g = cfg.generation
    out = cfg.output.rstrip("/")
    key = cfg.generation_hash()
    results: dict[str, Any] = {}
    device = "cuda" if cfg.gpu and torch.cuda.is_available() else "cpu"
    for run in plan.runs:
        uri = f"{out}/generation/{run.name}.json"
        cached = _read_json(uri, cfg.storage)
        if cached and cached.get("key") == key and cached.get("step") == plan.steps:
            results[run.name] = cached
            continue
        timed = run.seed == cfg.seeds[0]
        log(f"generation {run.name}" + (" (text and speed)" if timed else " (text)"))
        exp = load_export(f"{run.folder}/export", cfg.storage, device=device)
        tok = Tokenizer.from_str(exp.tokenizer_json)
        sampling = sampling_kwargs(g.temperature, g.top_k, g.seed)
        text, speed = [], []
        for ctx, ps in prompts.by_context.items():
            stats = measure_text(
                exp.model, tok, ps, context=ctx, new_tokens=g.new_tokens, sampling=sampling,
                samples=g.samples,
            )  # fmt: skip
            text.append(stats)
            if timed:
                speed += measure_speed(
                    exp.model, ps, context=ctx, new_tokens=g.speed_tokens, repeats=g.repeats,
                    sampling=sampling,
                )  # fmt: skip
        from dataclasses import asdict

        record = {
            "key": key,
            "step": plan.steps,
            "device": device,
            "threads": torch.get_num_threads(),
            "text": [_finite(asdict(t)) for t in text],
            "speed": [_finite(s.to_dict()) for s in speed],
        }
        _write_json(uri, record, cfg.storage)
        results[run.name] = record
    return results


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None (strict JSON)."""
    import math

    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------- the study


def _command(argv: list[str] | None) -> str:
    """How this study was started, as a user would type it again."""
    if argv is not None:
        return "gpthf study " + " ".join(argv)
    first = Path(sys.argv[0]).name
    if first == "study.py":  # python -m jobs.study (a Ray job)
        return "python -m jobs.study " + " ".join(sys.argv[1:])
    return " ".join([first, *sys.argv[1:]])


def environment(cfg: StudyConfig, argv: list[str] | None) -> dict[str, Any]:
    import os

    import torch

    def version(pkg: str) -> str | None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(pkg)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if cfg.gpu and torch.cuda.is_available() else None
    return {
        "command": _command(argv),
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "versions": {p: version(p) for p in ("torch", "ray", "deepspeed", "tokenizers", "gpthf")},
        "path": "local (no Ray)" if cfg.local else "Ray Train + DeepSpeed, Ray Data eval",
    }


def run_study(cfg: StudyConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """The whole study; returns the report (also written to OUTPUT/study.{json,md,png})."""
    from training.study.report import build_report, write_report

    cfg.validate_for_run()
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    manifest = Manifest.require(data, cfg.storage)
    plan = plan_study(cfg, data, manifest)  # every refusal happens here, before any training
    log(
        f"{len(plan.runs)} runs ({len(cfg.models)} models x {len(cfg.seeds)} seeds), "
        f"{plan.steps} steps of ~{plan.tokens_per_step:,.0f} tokens each "
        f"(budget {cfg.budget_tokens:,})"
    )
    out = cfg.output.rstrip("/")
    _write_json(f"{out}/study_config.json", cfg.to_dict(redact=True), cfg.storage)
    train_runs(cfg, plan)
    evals = eval_runs(cfg, plan, data)
    prompts = held_out_prompts(cfg, data, manifest)
    generation = generation_runs(cfg, plan, prompts)
    report = build_report(
        cfg, plan, manifest, data, evals, generation, prompts, environment(cfg, argv)
    )
    write_report(report, out, cfg.storage)
    log(f"report: {out}/study.md, study.json, study.png ({time.perf_counter() - t0:.0f} s)")
    return report


__all__ = ["StudyConfigError", "run_study"]
