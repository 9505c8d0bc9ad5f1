"""``gpthf compare``: curves and table of real run-folder files, evaluation figures beside them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hf import _export
from training.compare import CompareError, compare_runs
from training.eval.report import CheckpointScore, EvalReport
from training.eval.scoring import Sums
from training.export import load_export
from training.model.flops import flops_per_token

REPO = Path(__file__).resolve().parent.parent


def _run(root: Path, tokenizer_path: Path, arch: str, losses: list[float]) -> Path:
    run = root / f"train-{arch}"
    _export(tokenizer_path, run / "export", arch, seed=1)
    lines = []
    for k, loss in enumerate(losses, 1):
        rec = {"step": 10 * k, "loss": loss, "tokens_seen": 1000 * k, "tokens": 1000}
        if k % 2 == 0:
            rec["val_loss"] = loss + 0.1
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": 10 * len(losses), "final": True}))  # end-of-session record
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"tokens_per_s": 123.0}))
    return run


def test_compare_writes_png_table_and_json(tokenizer_path: Path, tmp_path: Path) -> None:
    a = _run(tmp_path, tokenizer_path, "gpthf", [6.0, 5.5, 5.2, 5.0])
    b = _run(tmp_path, tokenizer_path, "gpt", [6.1, 5.7, 5.4])
    total = Sums(
        rows=2, tokens=100, targets=98, bytes=400, nll=196.0, eos_targets=10, eos_correct=7
    )
    report = EvalReport(
        data="d", split="heldout", manifest_version=1, tokenizer_sha256="x", batching="prepack",
        token_budget=1024, actors=1, gpu=False, wall_s=1.0,
        checkpoints=(
            CheckpointScore(
                checkpoint=str(a / "export"), arch="gpthf", step=40, model_config_hash="h",
                schedule_hash="s", tokenizer_sha256="x", parameters=1, shards=(), total=total,
                wall_s=2.0,
            ),
        ),
    )  # fmt: skip
    report.write(str(tmp_path / "eval"))
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "compare", str(a), str(b),
         "--eval", str(tmp_path / "eval"), "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if "| train-" in line}
    assert set(rows) == {"train-gpthf", "train-gpt"}
    assert "| 5.0000 | 5.1000 |" in rows["train-gpthf"]  # final loss and final val loss
    assert "| 5.4000 | 5.8000 |" in rows["train-gpt"]  # its last validation was at step 20
    assert f"| {math.exp(196 / 98):.3f} |" in rows["train-gpthf"]  # token ppl of its eval
    assert "| - |" in rows["train-gpt"]  # no evaluation for this run
    data = {d["name"]: d for d in json.loads((out / "compare.json").read_text())}
    assert data["train-gpthf"]["tokens"] == [1000, 2000, 3000, 4000]
    assert data["train-gpthf"]["val_loss"] == [5.6, 5.1]
    # The exports name a data folder ("test") that holds no manifest: the FLOPs axis cannot be
    # computed, and is said to be unknown instead of computed for a made-up block shape.
    assert (
        data["train-gpthf"]["flops"] == [] and data["train-gpthf"]["train_flops_per_token"] is None
    )
    assert "| n/a |" in rows["train-gpthf"]
    assert "Training FLOPs of train-gpthf: n/a, its data folder test holds no manifest" in md
    assert "train-gpthf: training FLOPs n/a" in proc.stderr


def test_compare_flops_come_from_the_runs_data(tokenizer_path: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.synthetic_shards import SyntheticSpec, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(rows=24, sentences=8, vocab_size=512, shards=2))
    a = _run(tmp_path, tokenizer_path, "gpthf", [6.0, 5.5])
    cfg = json.loads((a / "export" / "config.json").read_text())
    (a / "export" / "config.json").write_text(json.dumps(cfg | {"data": str(data)}))
    (curve,) = compare_runs([str(a)], str(tmp_path / "cmp"))
    from pipeline.manifest import read_manifest

    m = read_manifest(str(data))
    assert m is not None
    shards = m.shards("train")
    block = round(sum(s.tokens for s in shards) / sum(s.rows for s in shards))
    sentence = round(sum(s.tokens for s in shards) / sum(s.sentences for s in shards))
    model = load_export(str(a / "export")).model_config
    per_token = 3 * flops_per_token(model, block, sentence).total
    assert curve.flops == pytest.approx([per_token * 1e3, per_token * 2e3])
    assert not curve.flops_unknown


def test_compare_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="not a finished training run"):
        compare_runs([str(tmp_path / "empty")], str(tmp_path / "out"))
