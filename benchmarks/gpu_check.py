"""One command that proves the GPU path: tests, bf16 DeepSpeed training, model benchmarks, eval.

    make gpu-check OUT=DIR                        # on a CUDA machine (Ray not needed)
    python benchmarks/gpu_check.py --out DIR      # the same
    python benchmarks/gpu_check.py --out DIR --cpu   # every stage at toy sizes, on a CPU

Stages, each in its own process with its own time limit; a stage that fails is recorded with
its error and the next one still runs; the exit code is 0 only if every stage passed:

1. ``tests``: the ``gpu``-marked tests (CUDA modes equal CPU in fp32; bf16 forward, backward and
   generation; FlexAttention against the gathered SDPA path). On a CPU they are skipped, which
   the table says.
2. ``train``: ``training.train.local`` under ``torchrun`` (one process, NCCL on CUDA), DeepSpeed
   ZeRO-2, bf16, for gpt-12 and gpthf-8-4 on synthetic blocks of the block schema
   (``benchmarks/synthetic_shards.py``; 40 sentences ~ 1k tokens a block): tokens/s and MFU
   (median over the steps after the warm-up; MFU against the device's dense bf16 peak,
   ``training.train.metrics.PEAK_FLOPS``), peak memory, loss finite and falling. The GPT's run
   goes through ``benchmarks/profile_train.py``: two of its steps run under torch.profiler
   (left out of the throughput figures), which gives their wall time against the time the
   device spent in kernels, and the top operators: what sets the pace when MFU is low.
3. ``resume``: gpthf-8-4 with ``--deterministic``, trained N steps straight through, and again
   stopped at N/2 (``--max-steps``) then continued with ``--resume``: the losses after the
   checkpoint must equal the uninterrupted run's (exactly where the kernels are deterministic;
   the table gives the largest difference either way, and the difference of the steps before
   the checkpoint, where the two runs did the same thing, as the noise floor).
4. ``train_step``: ``benchmarks/train_step.py`` in bf16, GPTHF vs GPT vs the Hugging Face
   Llama peer at T = 1k/2k/4k (and the FlexAttention backend where it runs).
5. ``generation``: ``benchmarks/generation.py --protocol gpu-check``: prompts of 2k and 8k
   tokens at batch 1 and 32, GPTHF kv vs GPT kv vs Llama kv, prefill and decode apart, and the
   bf16 exactness of the cached modes.
6. ``eval``: ``benchmarks/eval.py``: prepacked vs padded scoring, tokens/s and peak memory.

Written to ``--out``: ``gpu_check.json`` (every figure, each stage's status, error and log
tail), ``gpu_check.md`` (the table), ``gpu_check.log`` (every stage's output) and the
benchmarks' own JSON files. The whole run is meant to fit in 8 minutes on one H200; stages
that would start after ``--budget-s`` are recorded as not run (failed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages' figures use training.model (no install needed)
STAGES = ("tests", "train", "resume", "train_step", "generation", "eval")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and its CPU rehearsal."""

    models: tuple[str, str]
    resume_model: str
    vocab_size: int
    sentences: int
    rows: int
    micro_batch: int
    train_steps: int
    warmup_steps: int
    resume_steps: int
    resume_micro_batch: int
    train_step_args: tuple[str, ...]
    generation_args: tuple[str, ...]
    eval_args: tuple[str, ...]
    timeouts: dict[str, int]


GPU = Sizes(
    models=("gpt-12", "gpthf-8-4"),
    resume_model="gpthf-8-4",
    vocab_size=8192,
    sentences=40,
    rows=640,
    micro_batch=16,
    train_steps=16,
    warmup_steps=5,
    resume_steps=6,
    resume_micro_batch=4,
    train_step_args=(
        "--preset", "gpthf-8-4", "--sentences", "40", "80", "160", "--doc-sentences", "20", "0",
        "--batch", "8", "--steps", "2", "--repeats", "2", "--attention", "sdpa", "flex",
    ),
    generation_args=("--protocol", "gpu-check", "--repeats", "2", "--exactness-prompts", "4"),
    eval_args=("--rows", "512", "--repeats", "2"),
    timeouts={"tests": 120, "train": 150, "resume": 120, "train_step": 90, "generation": 120,
              "eval": 60},
)  # fmt: skip

CPU = Sizes(
    models=("gpt-tiny", "gpthf-tiny"),
    resume_model="gpthf-tiny",
    vocab_size=512,
    sentences=8,
    rows=96,
    micro_batch=2,
    train_steps=6,
    warmup_steps=1,
    resume_steps=4,
    resume_micro_batch=2,
    train_step_args=(
        "--quick", "--sentences", "8", "--doc-sentences", "4", "--batch", "2", "--steps", "1",
        "--repeats", "1", "--vocab-size", "512", "--no-peer",
    ),
    generation_args=("--protocol", "cpu-check", "--repeats", "1", "--no-peer", "--threads", "1",
                     "--exactness-prompts", "2"),
    eval_args=("--quick", "--rows", "16", "--repeats", "1", "--threads", "1"),
    timeouts={"tests": 120, "train": 120, "resume": 120, "train_step": 60, "generation": 90,
              "eval": 60},
)  # fmt: skip


@dataclass
class StageResult:
    name: str
    status: str = "fail"
    """"pass", "fail" (an error or a goal of correctness unmet) or "skip" (cannot run here)."""
    seconds: float = 0.0
    summary: str = ""
    """One line for the table."""
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    log_tail: str = ""


class StageFailed(Exception):
    """A stage's own verdict: it ran, and something it checks does not hold."""


class Check:
    """The run's state: output folder, work folder, log, sizes."""

    def __init__(self, out: Path, work: Path, sizes: Sizes, cpu: bool, python: str) -> None:
        self.out, self.work, self.sizes, self.cpu, self.python = out, work, sizes, cpu, python
        self.log = (out / "gpu_check.log").open("a")
        self.tail = ""

    def run(self, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run ``cmd`` from the repo root in its own process group; its output goes to the log.
        Raises StageFailed on a non-zero exit or a timeout (the group is killed)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])]
        )
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            self._keep(output)
            raise StageFailed(f"timed out after {timeout:.0f}s: {' '.join(cmd[:6])} ...") from None
        self._keep(output)
        if proc.returncode != 0:
            raise StageFailed(
                f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{_last_lines(output, 8)}"
            )
        return output

    def _keep(self, output: str) -> None:
        self.log.write(output)
        self.log.flush()
        self.tail = (self.tail + output)[-4000:]

    @property
    def device_flag(self) -> list[str]:
        return [] if self.cpu else ["--gpu"]

    def copy_out(self, src: Path) -> None:
        if src.exists():
            shutil.copy(src, self.out / src.name)


def _last_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------------------------
# Stages


def stage_tests(ck: Check, timeout: float) -> StageResult:
    r = StageResult("tests")
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    junit = ck.work / "junit.xml"
    cmd = [ck.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *files]  # fmt: skip
    failed = None
    try:
        ck.run(cmd, timeout)
    except StageFailed as exc:
        failed = exc
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    r.figures = {**counts, "passed": passed, "files": files}
    r.summary = (
        f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
        f"{counts['skipped']} skipped ({len(files)} files)"
    )
    if failed is not None or counts["failures"] or counts["errors"]:
        raise StageFailed(r.summary + (f"; {failed}" if failed else ""))
    if ck.cpu:
        r.status = "skip" if passed == 0 else "pass"
        r.summary += "; no CUDA here" if passed == 0 else ""
    else:
        r.status = "pass" if passed and not counts["skipped"] else "fail"
    return r


def _data(ck: Check) -> Path:
    data = ck.work / "data"
    if not (data / "manifest.json").exists():
        s = ck.sizes
        ck.run(
            [ck.python, "benchmarks/synthetic_shards.py", str(data), "--rows", str(s.rows),
             "--sentences", str(s.sentences), "--vocab-size", str(s.vocab_size)],
            60,
        )  # fmt: skip
    return data


def _train(
    ck: Check,
    model: str,
    output: Path,
    steps: int,
    timeout: float,
    extra: list[str],
    profile: tuple[int, int, Path] | None = None,
) -> list[dict[str, Any]]:
    """One ``torchrun`` of ``training.train.local`` (through ``benchmarks/profile_train.py``
    with ``profile`` = (steps to skip, steps to profile, JSON path)); returns its metrics.jsonl
    records."""
    s = ck.sizes
    entry = ["-m", "training.train.local"]
    if profile is not None:
        skip, n, path = profile
        entry = ["benchmarks/profile_train.py", "--skip", str(skip), "--profile", str(n),
                 "--top", "12", "--json", str(path), "--"]  # fmt: skip
    cmd = [
        ck.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        *entry, "--data", str(_data(ck)), "--output", str(output),
        "--model", model, "--zero-stage", "2", "--total-steps", str(steps),
        "--warmup-steps", str(s.warmup_steps), "--eval-every", "100000", "--run.eval_rows", "8",
        *ck.device_flag, *extra,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1" if ck.cpu else "4"}
    ck.run(cmd, timeout, env=env)
    path = output / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r and not r.get("final")}


def stage_train(ck: Check, timeout: float) -> StageResult:
    r = StageResult("train")
    s = ck.sizes
    deadline = time.monotonic() + timeout
    problems, parts = [], []
    prof_path = ck.work / "profile.json"
    profiled = range(s.train_steps - 3, s.train_steps - 1)  # two steps near the end
    for i, model in enumerate(s.models):
        left = deadline - time.monotonic()
        records = _train(
            ck, model, ck.work / f"train-{model}", s.train_steps, left,
            ["--micro-batch", str(s.micro_batch), "--checkpoint-every", str(s.train_steps)],
            profile=(profiled.start - 1, len(profiled), prof_path) if i == 0 else None,
        )  # fmt: skip
        steps = [x for x in records if "loss" in x and not x.get("final")]
        final = next(x for x in records if x.get("final"))
        # After the warm-up (allocator, kernel selection), and never a step under the profiler.
        timed = [x for x in steps[s.warmup_steps :] if i or x["step"] not in profiled] or steps
        losses = [x["loss"] for x in steps]
        k = max(1, len(losses) // 5)
        first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
        mfu = [x["mfu"] for x in timed if x.get("mfu") is not None]
        fig = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed),
            "tokens_per_s_min": min(x["tokens_per_s"] for x in timed),
            "tokens_per_s_max": max(x["tokens_per_s"] for x in timed),
            "tokens_per_step": statistics.median(x["tokens"] for x in timed),
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gib": final["peak_memory_bytes"] / 2**30,
            "loss_first": first,
            "loss_last": last,
            "steps": len(steps),
            "data_wait_frac": statistics.median(x["data_wait_frac"] for x in timed),
        }
        r.figures[model] = fig
        if not all(math.isfinite(x) for x in losses):
            problems.append(f"{model}: a loss is not finite")
        if not last < first:
            problems.append(f"{model}: loss did not fall ({first:.3f} -> {last:.3f})")
        mfu_text = f", MFU {fig['mfu']:.1%}" if fig["mfu"] is not None else ""
        parts.append(
            f"{model} {fig['tokens_per_s']:,.0f} tok/s{mfu_text}, "
            f"{fig['peak_memory_gib']:.1f} GiB, loss {first:.2f}->{last:.2f}"
        )
    if prof_path.exists():
        prof = json.loads(prof_path.read_text())["steps"]
        r.figures["profile"] = {"model": s.models[0], "steps": prof}
        last = prof[-1]
        busy = last["device_busy_share"]
        parts.append(
            f"{s.models[0]} profiled step: wall {last['wall_ms']:.0f} ms"
            + (
                f", kernels {last['device_kernel_ms']:.0f} ms (device busy {busy:.0%})"
                if busy is not None
                else ""
            )
        )
    a, b = (r.figures[m] for m in s.models)
    flops = _flop_ratio(s.models, s.vocab_size, s.sentences)
    r.figures["flop_ratio_gpt_over_gpthf"] = flops
    r.figures["gpthf_over_gpt_tokens_per_s"] = b["tokens_per_s"] / a["tokens_per_s"]
    r.summary = "; ".join(parts) + (
        f"; GPTHF/GPT {r.figures['gpthf_over_gpt_tokens_per_s']:.2f}x tok/s (FLOP ratio "
        f"{flops:.2f}x)"
    )
    if problems:
        raise StageFailed("; ".join(problems))
    r.status = "pass"
    return r


def _flop_ratio(models: tuple[str, str], vocab: int, sentences: int) -> float:
    """GPT/GPTHF training FLOPs per token on blocks like the synthetic ones (analytic)."""
    from training.model import ModelConfig
    from training.model.flops import train_step_flops

    docs = [[25] * 20 for _ in range(sentences // 20 or 1)]
    gpt, hf = (ModelConfig.preset(m, vocab_size=vocab) for m in models)
    return train_step_flops(gpt, docs).total / train_step_flops(hf, docs).total


def stage_resume(ck: Check, timeout: float) -> StageResult:
    r = StageResult("resume")
    s = ck.sizes
    n, half = s.resume_steps, s.resume_steps // 2
    deadline = time.monotonic() + timeout
    common = ["--micro-batch", str(s.resume_micro_batch), "--checkpoint-every", str(half),
              "--deterministic"]  # fmt: skip
    straight = _losses(_train(ck, s.resume_model, ck.work / "resume-straight", n, timeout, common))
    stopped = ck.work / "resume-stopped"
    _train(ck, s.resume_model, stopped, n, deadline - time.monotonic(),
           [*common, "--max-steps", str(half)])  # fmt: skip
    resumed = _losses(_train(ck, s.resume_model, stopped, n, deadline - time.monotonic(),
                             [*common, "--resume"]))  # fmt: skip
    if sorted(resumed) != sorted(straight):
        raise StageFailed(f"steps differ: {sorted(resumed)} vs {sorted(straight)}")
    before = [abs(resumed[i] - straight[i]) for i in straight if i <= half]
    after = [abs(resumed[i] - straight[i]) for i in straight if i > half]
    r.figures = {
        "model": s.resume_model,
        "steps": n,
        "checkpoint_step": half,
        "losses_straight": [straight[i] for i in sorted(straight)],
        "losses_resumed": [resumed[i] for i in sorted(resumed)],
        "max_diff_before_checkpoint": max(before),
        "max_diff_after_resume": max(after),
        "bitwise_equal_after_resume": max(after) == 0.0,
    }
    r.summary = (
        f"{s.resume_model} {n} steps, resumed at {half}: max |loss diff| after resume "
        f"{max(after):.2g} (before the checkpoint, same work: {max(before):.2g})"
    )
    if max(after) != 0.0:
        raise StageFailed(r.summary + ": the resumed losses differ from the uninterrupted run's")
    r.status = "pass"
    return r


def _bench(ck: Check, script: str, args: tuple[str, ...], timeout: float, name: str) -> dict:
    out = ck.work / f"{name}.json"
    ck.run([ck.python, f"benchmarks/{script}", *args, "--out", str(out)], timeout)
    ck.copy_out(out)
    return dict(json.loads(out.read_text()))


def stage_train_step(ck: Check, timeout: float) -> StageResult:
    r = StageResult("train_step")
    rep = _bench(ck, "train_step.py", ck.sizes.train_step_args, timeout, "train_step")
    rows = []
    for e in rep["results"]:
        row = {
            "T": e["T"],
            "doc_sentences": e["doc_sentences"],
            # The peer's tok/s only where it did our GPT's work (one document per row).
            **{
                k: v["tokens_per_s"] if v.get("comparable", True) else None
                for k, v in e.items()
                if isinstance(v, dict)
            },
            "gpthf_over_gpt": e["speedup"],
            "flop_ratio": e["flops_ratio"],
            "gpt_over_llama": e.get("gpt_vs_llama"),
        }
        rows.append(row)
    r.figures = {"rows": rows, "goals": rep.get("goals"), "precision": rep.get("precision")}
    best = max(rows, key=lambda x: x["T"])
    r.summary = (
        f"T={best['T']}: GPTHF/GPT {best['gpthf_over_gpt']:.2f}x (FLOP ratio "
        f"{best['flop_ratio']:.2f}x)"
        + (f", GPT/Llama {best['gpt_over_llama']:.2f}x" if best["gpt_over_llama"] else "")
    )
    r.status = "pass"
    return r


def stage_generation(ck: Check, timeout: float) -> StageResult:
    r = StageResult("generation")
    rep = _bench(ck, "generation.py", ck.sizes.generation_args, timeout, "generation")
    points = []
    for p in rep["points"]:
        runs = p["runs"]
        points.append(
            {
                "prompt": p["prompt"],
                "batch": p["batch"],
                **{
                    f"{k} {what}": v[key]
                    for k, v in runs.items()
                    for what, key in (
                        ("prefill_s", "prefill_seconds"),
                        ("decode_tok_s", "decode_tokens_per_s"),
                    )
                    if key in v
                },
            }
        )
    r.figures = {"points": points, "goals": rep["goals"], "exactness": rep["exactness"]}
    longest = max(rep["points"], key=lambda p: (p["prompt"], p["batch"]))["runs"]
    ratio = longest["gpthf/kv"]["decode_tokens_per_s"] / longest["gpt/kv"]["decode_tokens_per_s"]
    agree = min(
        m["greedy_agreement"] for arch in ("gpt", "gpthf") for m in rep["exactness"][arch].values()
    )
    r.summary = f"longest point: GPTHF kv / GPT kv decode {ratio:.2f}x; bf16 greedy agreement >= {agree:.0%}"
    r.status = "pass"
    return r


def stage_eval(ck: Check, timeout: float) -> StageResult:
    r = StageResult("eval")
    args = (*ck.sizes.eval_args, "--device", "cpu" if ck.cpu else "cuda")
    rep = _bench(ck, "eval.py", args, timeout, "eval")
    rows = []
    for e in rep["results"]:
        mem = e["memory"]
        rows.append(
            {
                "arch": e["arch"],
                "workload": e["workload"],
                "pad_tok_s": e["pad_tokens_per_s"],
                "prepack_tok_s": e["prepack_tokens_per_s"],
                "speedup": e["speedup"],
                "pad_peak_mib": mem["pad"].get("cuda_peak_bytes", 0) / 2**20,
                "prepack_peak_mib": mem["prepack"].get("cuda_peak_bytes", 0) / 2**20,
                "nll_rel_diff": e["nll_rel_diff"],
            }
        )
    r.figures = {"rows": rows}
    mix = [x for x in rows if x["workload"] == "mix"]
    r.summary = "mix: prepack/pad " + ", ".join(f"{x['arch']} {x['speedup']:.2f}x" for x in mix)
    r.status = "pass"
    return r


RUNNERS: dict[str, Callable[[Check, float], StageResult]] = {
    "tests": stage_tests,
    "train": stage_train,
    "resume": stage_resume,
    "train_step": stage_train_step,
    "generation": stage_generation,
    "eval": stage_eval,
}


# --------------------------------------------------------------------------------------------
# Report


def environment(cpu: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        "mode": "cpu" if cpu else "gpu",
    }
    if torch.cuda.is_available() and not cpu:
        p = torch.cuda.get_device_properties(0)
        env.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    for name in ("deepspeed", "transformers", "ray"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"not importable ({type(exc).__name__})"
    try:
        env["commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        env["commit"] = None
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# gpu-check ({env['mode']}): {report['verdict']}",
        "",
        f"{env.get('device', platform.processor() or 'cpu')}, torch {env['torch']}, "
        f"deepspeed {env['deepspeed']}, python {env['python']}, commit {env.get('commit')}; "
        f"{report['seconds']:.0f} s in all",
        "",
        "| stage | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for s in report["stages"]:
        text = s["summary"] or ""
        if s["error"]:
            text = (text + "; " if text else "") + "ERROR: " + s["error"].splitlines()[0][:300]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {text} |")
    for s in report["stages"]:
        f = s["figures"]
        if s["name"] == "train" and f:
            lines += ["", "| model | tok/s (min-max) | MFU | peak GiB | loss first -> last |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for m, v in f.items():
                if isinstance(v, dict) and "tokens_per_s" in v:
                    mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "-"
                    lines.append(
                        f"| {m} | {v['tokens_per_s']:,.0f} ({v['tokens_per_s_min']:,.0f}-"
                        f"{v['tokens_per_s_max']:,.0f}) | {mfu} | {v['peak_memory_gib']:.2f} "
                        f"| {v['loss_first']:.3f} -> {v['loss_last']:.3f} |"
                    )
        if s["name"] == "train_step" and f.get("rows"):
            keys = [k for k in f["rows"][0] if k not in ("T", "doc_sentences")]
            lines += ["", "| T | sentences/doc | " + " | ".join(keys) + " |",
                      "|" + "---|" * (len(keys) + 2)]  # fmt: skip
            for row in f["rows"]:
                vals = [_cell(row.get(k)) for k in keys]
                lines.append(
                    f"| {row['T']} | {row['doc_sentences'] or 'one doc/row'} | "
                    + " | ".join(vals)
                    + " |"
                )
        if s["name"] == "generation" and f.get("points"):
            keys = sorted({k for p in f["points"] for k in p if k not in ("prompt", "batch")})
            lines += ["", "| prompt | batch | " + " | ".join(keys) + " |",
                      "|" + "---|" * (len(keys) + 2)]  # fmt: skip
            for p in f["points"]:
                lines.append(
                    f"| {p['prompt']} | {p['batch']} | "
                    + " | ".join(_cell(p.get(k)) for k in keys)
                    + " |"
                )
        if s["name"] == "eval" and f.get("rows"):
            lines += ["", "| model | workload | pad tok/s | prepack tok/s | speed-up "
                      "| peak MiB pad : prepack |", "|---|---|---|---|---|---|"]  # fmt: skip
            for x in f["rows"]:
                lines.append(
                    f"| {x['arch']} | {x['workload']} | {x['pad_tok_s']:,.0f} "
                    f"| {x['prepack_tok_s']:,.0f} | {x['speedup']:.2f}x "
                    f"| {x['pad_peak_mib']:.0f} : {x['prepack_peak_mib']:.0f} |"
                )
    prof = next(
        (s["figures"].get("profile") for s in report["stages"] if s["name"] == "train"), None
    )
    if prof:
        last = prof["steps"][-1]
        for title, key in (("device", "top_device"), ("host", "top_host")):
            if last[key]:
                lines += ["", f"{prof['model']}, one training step: top operators by {title} time",
                          "", "| operator | calls | self device ms | self host ms |",
                          "|---|---|---|---|"]  # fmt: skip
                lines += [
                    f"| {e['name'][:60]} | {e['calls']} | {e['self_device_ms']:.2f} "
                    f"| {e['self_cpu_ms']:.2f} |"
                    for e in last[key][:10]
                ]
    goals = report.get("goals")
    if goals:
        lines += ["", "Goals (measured, not tuned to):", ""]
        lines += [f"- {k}: {v}" for k, v in goals.items()]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def goals(stages: dict[str, StageResult]) -> dict[str, str]:
    """The issue's goals, as measured (informative: they do not decide the exit code)."""
    out = {}
    train = stages.get("train")
    if train and train.figures.get("gpt-12"):
        gpt = train.figures["gpt-12"]
        if gpt["mfu"] is not None:
            out["gpt-12 MFU >= 40%"] = f"{gpt['mfu']:.1%}"
        out["GPTHF tok/s >= GPT x FLOP ratio"] = (
            f"{train.figures['gpthf_over_gpt_tokens_per_s']:.2f}x vs "
            f"{train.figures['flop_ratio_gpt_over_gpthf']:.2f}x"
        )
    ts = stages.get("train_step")
    if ts and ts.figures.get("goals"):
        for k, v in ts.figures["goals"].items():
            out[f"train_step {k}"] = json.dumps(v)
    gen = stages.get("generation")
    if gen and gen.figures.get("goals"):
        for k, v in gen.figures["goals"].items():
            out[f"generation {k}"] = json.dumps(v)
    ev = stages.get("eval")
    if ev and ev.figures.get("rows"):
        mix = [x for x in ev.figures["rows"] if x["workload"] == "mix"]
        out["eval prepack >= 2x pad (mix)"] = ", ".join(f"{x['speedup']:.2f}x" for x in mix)
        out["eval prepack peak memory < pad (mix)"] = ", ".join(
            f"{x['prepack_peak_mib']:.0f} vs {x['pad_peak_mib']:.0f} MiB" for x in mix
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON, table and log")
    ap.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (a rehearsal)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=480, help="no stage starts after this")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {','.join(STAGES)}")

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "error: no CUDA device is visible (torch.cuda.is_available() is False). Run this on a "
            "GPU node, or add --cpu for the toy-size rehearsal.",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").write_text("")
    t0 = time.monotonic()
    work_ctx = tempfile.TemporaryDirectory(prefix="gpthf-gpucheck-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    ck = Check(args.out, work, CPU if args.cpu else GPU, args.cpu, sys.executable)
    env = environment(args.cpu)
    print(json.dumps(env), flush=True)
    results: dict[str, StageResult] = {}
    try:
        for name in stages:
            started = time.monotonic()
            if started - t0 > args.budget_s:
                results[name] = StageResult(
                    name, error=f"not run: the {args.budget_s:.0f}s budget was spent"
                )
                continue
            ck.tail = ""
            ck.log.write(f"\n===== stage {name} =====\n")
            timeout = min(ck.sizes.timeouts[name], max(30.0, args.budget_s - (started - t0)))
            try:
                res = RUNNERS[name](ck, timeout)
            except StageFailed as exc:
                res = StageResult(name, error=str(exc))
            except Exception as exc:  # a bug in the stage itself: recorded, the rest still run
                res = StageResult(name, error=f"{type(exc).__name__}: {exc}")
                ck.log.write(traceback.format_exc())
            res.seconds = time.monotonic() - started
            res.log_tail = ck.tail[-2000:]
            results[name] = res
            line = f"[gpu-check] {name}: {res.status} in {res.seconds:.0f}s: {res.summary}"
            print(line + (f" ERROR {res.error}" if res.error else ""), flush=True)
    finally:
        ck.log.close()
        if work_ctx is not None:
            work_ctx.cleanup()
    ok = all(r.status in ("pass", "skip") for r in results.values())
    report = {
        "verdict": "all passed"
        if ok
        else "FAILED: " + ", ".join(n for n, r in results.items() if r.status == "fail"),
        "seconds": time.monotonic() - t0,
        "environment": env,
        "stages": [asdict(r) for r in results.values()],
        "goals": goals(results),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print("\n" + table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
