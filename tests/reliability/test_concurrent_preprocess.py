"""Two preprocessing runs into one output at once: nothing either run processed is lost.

Fault injected for real: a second, complete run commits into the output while the first is
between processing and commit (the first run's commit is entered only after the second has
committed); and two `gpthf preprocess` processes started together.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
from pipeline.manifest import Manifest
from pipeline.preprocess import run_preprocess
from tests.conftest import make_document

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, n_docs: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"id": f"{path.stem}-{i}", "text": make_document(rng)}) + "\n"
            for i in range(n_docs)
        )
    )


def _cfg(inputs: list[Path], out: Path, tok: Path) -> PreprocessConfig:
    return PreprocessConfig(
        input=InputConfig(paths=[str(p) for p in inputs], id_field="id"),
        output=str(out),
        tokenizer=str(tok),
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16, heldout_fraction=0.2),
        workers=1,
        plot=False,
    )


def _listed(out: Path) -> dict[str, str]:
    m = Manifest.require(str(out))
    return {s.path: s.sha256 for split in m.splits for s in m.shards(split)}


def _on_disk(out: Path) -> set[str]:
    return {
        str(p.relative_to(out)) for split in ("train", "heldout") for p in (out / split).glob("*")
    }


@pytest.mark.usefixtures("ray_session")
def test_a_run_that_loses_the_commit_race_rebases_onto_the_winner(
    tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    a = [raw / f"a{k}.jsonl" for k in range(3)]
    b = [raw / f"b{k}.jsonl" for k in range(2)]
    shared = raw / "shared.jsonl"
    for k, p in enumerate([*a, *b, shared]):
        _write(p, 20, k)
    out = tmp_path / "out"

    # The reference: one run over everything.
    reference = tmp_path / "reference"
    run_preprocess(_cfg([raw], reference, tokenizer_path))

    real_commit = Manifest.commit
    calls: list[int] = []

    def commit_after_the_other_run(self: Manifest, output: str, storage: object = None) -> None:
        if not calls:
            calls.append(self.version)
            # The other run (B and the shared file) starts and commits while A waits to commit.
            monkeypatch.setattr(Manifest, "commit", real_commit)
            other = run_preprocess(_cfg([*b, shared], out, tokenizer_path))
            assert other.version == 1
            monkeypatch.setattr(Manifest, "commit", commit_after_the_other_run)
        real_commit(self, output, storage)  # type: ignore[arg-type]

    monkeypatch.setattr(Manifest, "commit", commit_after_the_other_run)
    first = run_preprocess(_cfg([*a, shared], out, tokenizer_path))
    monkeypatch.setattr(Manifest, "commit", real_commit)

    assert calls == [1], "run A tried version 1 first and lost it"
    assert first.version == 2
    assert sorted(first.new_inputs) == sorted(str(p) for p in a), "shared.jsonl came from B"
    m = Manifest.require(str(out))
    assert {e.uri for e in m.inputs} == {str(p) for p in [*a, *b, shared]}
    assert _listed(out) == _listed(reference), "same shards, same bytes as one run"
    assert _on_disk(out) == set(_listed(out)), "no shard on disk is unlisted"
    assert json.loads((out / "manifest.json").read_text())["version"] == 2
    assert not list((out / "_staging").glob("2*")), "both runs cleaned their staging"


@pytest.mark.slow
def test_two_cli_runs_started_together_lose_nothing(tmp_path: Path, tokenizer_path: Path) -> None:
    raw = tmp_path / "raw"
    groups = {"x": [raw / "x" / f"x{k}.jsonl" for k in range(4)]}
    groups["y"] = [raw / "y" / f"y{k}.jsonl" for k in range(4)]
    for k, p in enumerate(groups["x"] + groups["y"]):
        _write(p, 15, 100 + k)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobs.cli",
                "preprocess",
                str(raw / name),
                "--output",
                str(out),
                "--tokenizer",
                str(tokenizer_path),
                "-S",
                "8",
                "-M",
                "16",
                "--workers",
                "1",
                # On Ray: seconds between planning and committing, so the two really race (a
                # small run in-process takes 0.1 s and the two would simply take turns).
                "--local-below-bytes",
                "0",
                "--no-plot",
                "--json",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("x", "y")
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    # The race happened: both planned against the empty output (each run reads the manifest in
    # its first second, then spends seconds starting Ray and processing), so exactly one lost
    # the commit of v1 and rebased; without this the test could pass with no race at all.
    rebased = [err for _, err in results if "another run committed manifest v1 first" in err]
    assert len(rebased) == 1, [err[-1500:] for _, err in results]
    m = Manifest.require(str(out))
    assert {e.uri for e in m.inputs} == {str(p) for p in groups["x"] + groups["y"]}
    assert m.version == 2 and len(list((out / "manifests").glob("v*.json"))) == 2
    assert _on_disk(out) == set(_listed(out))
    reference = tmp_path / "reference"
    run_reference = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "preprocess", str(raw), "--output", str(reference),
         "--tokenizer", str(tokenizer_path), "-S", "8", "-M", "16", "--workers", "1", "--no-plot"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run_reference.returncode == 0, run_reference.stderr[-3000:]
    assert _listed(out) == _listed(reference)


@pytest.mark.usefixtures("ray_session")
def test_overlapping_runs_with_copies_between_them_keep_each_document_once(
    tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A holds a document that run B, committing first, also holds (under another id in
    another file): A decides again against B's index and processes that file again without it."""
    raw = tmp_path / "raw"
    _write(raw / "a0.jsonl", 12, 50)
    _write(raw / "a1.jsonl", 12, 51)
    _write(raw / "b0.jsonl", 12, 52)
    copied = json.loads((raw / "a0.jsonl").read_text().splitlines()[3])
    with (raw / "b0.jsonl").open("a") as f:
        f.write(json.dumps({"id": "b0-copy", "text": copied["text"]}) + "\n")
    out = tmp_path / "out"
    real_commit = Manifest.commit
    calls: list[int] = []

    def commit_after_the_other_run(self: Manifest, output: str, storage: object = None) -> None:
        if not calls:
            calls.append(self.version)
            monkeypatch.setattr(Manifest, "commit", real_commit)
            assert run_preprocess(_cfg([raw / "b0.jsonl"], out, tokenizer_path)).version == 1
            monkeypatch.setattr(Manifest, "commit", commit_after_the_other_run)
        real_commit(self, output, storage)  # type: ignore[arg-type]

    monkeypatch.setattr(Manifest, "commit", commit_after_the_other_run)
    first = run_preprocess(_cfg([raw / "a0.jsonl", raw / "a1.jsonl"], out, tokenizer_path))
    monkeypatch.setattr(Manifest, "commit", real_commit)

    assert calls == [1] and first.version == 2
    # Planted and landed: A alone kept the copy (it was the first copy in A's order) ...
    assert first.run_stats["dedup"]["duplicate_exact"] == 1, "A decided again after the rebase"
    ids = _doc_ids(out)
    assert len(ids) == len(set(ids)) == 36, "every document once: the copy only from b0"
    assert "b0-copy" in ids and copied["id"] not in ids
    assert _on_disk(out) == set(_listed(out)), "no shard on disk is unlisted"
    m = Manifest.require(str(out))
    listed = {r.path for r in m.dedup_index}
    assert listed == {str(p.relative_to(out)) for p in (out / "dedup").rglob("*.parquet")}
    # Only the file that held the copy was processed again (a digest of its drops in its name).
    assert [e.uri for e in m.inputs if any("-x" in s for s in e.shards)] == [str(raw / "a0.jsonl")]


def _doc_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in _listed(out):
        t = pq.read_table(out / path, columns=["document_ids", "first_sentence_offset"])
        for doc_ids, first in zip(
            t.column("document_ids").to_pylist(),
            t.column("first_sentence_offset").to_pylist(),
            strict=True,
        ):
            ids.extend(doc_ids[1:] if first > 0 else doc_ids)
    return ids
