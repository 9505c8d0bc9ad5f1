"""Processes killed for real (SIGKILL by PID) in the middle of a run: nothing lost, nothing twice.

Each test starts `gpthf` as a subprocess (its own in-process Ray), waits until the process to
kill is doing work, kills it, and compares the result with an uninterrupted run. The Ray
processes a killed driver leaves behind are ours: the test records them and stops them itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.manifest import Manifest
from tests.conftest import make_document

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}


def _corpus(root: Path, files: int = 8, docs: int = 400) -> Path:
    rng = random.Random(11)
    root.mkdir(parents=True)
    for k in range(files):
        (root / f"part-{k}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"p{k}-{i}", "text": make_document(rng)}) + "\n"
                for i in range(docs)
            )
        )
    return root


def _preprocess_cmd(raw: Path, out: Path, tok: Path) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "preprocess", str(raw), "--output", str(out),
        "--tokenizer", str(tok), "-S", "8", "-M", "32", "--heldout-fraction", "0.3",
        "--workers", "2", "--no-plot",
        "--local-below-bytes", "0",  # a Ray worker to kill, however small the corpus
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _listed(out: Path) -> dict[str, str]:
    m = Manifest.require(str(out))
    return {s.path: s.sha256 for split in m.splits for s in m.shards(split)}


def _wait_for(what: str, found: Callable[[], object], proc: subprocess.Popen[str]) -> object:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hit = found()
        if hit:
            return hit
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _descendant(proc: subprocess.Popen[str], marker: str) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()) or marker in child.name():
                return child
        except psutil.Error:
            continue
    return None


def _descendants(proc: subprocess.Popen[str], marker: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()) or marker in child.name():
                found.append(child)
        except psutil.Error:
            continue
    return found


def _kill_and_see_it_replaced(proc: subprocess.Popen[str], marker: str) -> tuple[int, int]:
    """Kill one process of ``marker`` under ``proc`` and wait for a process of the same kind
    that was not there at the kill: the observable sign that Ray recovered, not that the run
    happened to need nothing more from the dead one. Returns (killed pid, replacement pid)."""
    victim = _wait_for(f"a {marker} process", lambda: _descendant(proc, marker), proc)
    assert isinstance(victim, psutil.Process)
    seen = {p.pid for p in _descendants(proc, marker)}
    victim.kill()
    new = _wait_for(
        f"a replacement {marker} process",
        lambda: next((p for p in _descendants(proc, marker) if p.pid not in seen), None),
        proc,
    )
    assert isinstance(new, psutil.Process)
    return victim.pid, new.pid


def _stop_tree(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _corpus(tmp_path_factory.mktemp("killed") / "raw")


@pytest.fixture(scope="module")
def reference(corpus: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    _run(_preprocess_cmd(corpus, out, tokenizer_path))
    return out


def test_killed_preprocessing_driver_then_rerun_equals_an_uninterrupted_run(
    corpus: Path, reference: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _preprocess_cmd(corpus, out, tokenizer_path),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for("a staged shard", lambda: list((out / "_staging").glob("2*/*/*.parquet")), proc)
        leftovers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _stop_tree(leftovers)
    # Readers see nothing, or a manifest whose every shard exists.
    m = Manifest.read(str(out))
    if m is not None:
        assert all((out / p).exists() for p in _listed(out))
    rerun = _run(_preprocess_cmd(corpus, out, tokenizer_path))
    assert _listed(out) == _listed(reference), "same shards and bytes as the uninterrupted run"
    assert "staging of 1 other run(s)" in rerun.stderr, "the killed run's staging is reported"


def test_killed_preprocessing_worker_is_retried_and_the_output_is_identical(
    corpus: Path, reference: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _preprocess_cmd(corpus, out, tokenizer_path),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        killed, replacement = _kill_and_see_it_replaced(proc, "_GroupProcessor")
        assert killed != replacement
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert _listed(out) == _listed(reference)


@pytest.mark.timeout(900)
def test_killed_evaluation_actor_is_replaced_and_every_token_counted_once(
    reference: Path, tmp_path: Path
) -> None:
    from training.export import ExportConfig, write_export
    from training.model import ModelConfig, build_model

    m = Manifest.require(str(reference))
    mc = ModelConfig.preset(
        "gpthf-tiny",
        vocab_size=m.vocab_size,
        eos_id=m.eos_id,
        pad_id=m.pad_id,
        eod_id=m.eod_id,
        max_sentence_tokens=m.max_sentence_tokens,
    )
    torch.manual_seed(0)
    export = tmp_path / "export"
    write_export(
        str(export),
        build_model(mc).state_dict(),
        ExportConfig(mc, 0, 0, m.tokenizer.sha256, m.special_ids),
        (reference / "tokenizer.json").read_text(),
    )

    def eval_cmd(output: Path) -> list[str]:
        return [
            sys.executable, "-m", "jobs.cli", "eval", "--checkpoint", str(export), "--data",
            str(reference), "--output", str(output), "--batch-rows", "4",
        ]  # fmt: skip

    clean = tmp_path / "clean"
    _run(eval_cmd(clean))
    cmd = eval_cmd(tmp_path / "eval")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        killed, replacement = _kill_and_see_it_replaced(proc, "_Scorer")
        assert killed != replacement
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    got = json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"][0]
    want = json.loads((clean / "report.json").read_text())["checkpoints"][0]
    assert got["total"]["tokens"] == m.totals("heldout")["tokens"]
    assert got["total"]["targets"] == want["total"]["targets"]
    assert got["total"]["nll"] == pytest.approx(want["total"]["nll"], rel=1e-9)
