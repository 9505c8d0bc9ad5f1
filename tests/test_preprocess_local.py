"""The preprocessing job end to end on in-process Ray and the local filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
from pipeline.manifest import ManifestError, read_manifest
from pipeline.preprocess import ChangedInputError, run_preprocess
from pipeline.storage import StorageError
from pipeline.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import make_document

pytestmark = pytest.mark.usefixtures("ray_session")


def write_jsonl(path: Path, docs: list[str], start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"{path.stem}-{start + i}", "text": text}) + "\n")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(7)
    src = tmp_path / "raw"
    for k in range(3):
        write_jsonl(src / f"part-{k}.jsonl", [make_document(rng) for _ in range(40)])
    return src


def config(src: Path | str, out: Path | str, tok: Path, **packing: object) -> PreprocessConfig:
    return PreprocessConfig(
        input=InputConfig(paths=[str(src)], id_field="id"),
        output=str(out),
        tokenizer=str(tok),
        packing=PackingConfig(
            **{
                "sentences_per_block": 8,
                "max_sentence_tokens": 16,
                "heldout_fraction": 0.2,
                **packing,
            }
        ),  # type: ignore[arg-type]
        workers=2,
        plot=False,
    )


def test_full_run_manifest_matches_the_shards(
    corpus: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = config(corpus, out, tokenizer_path)
    cfg.plot = True
    result = run_preprocess(cfg)
    assert result.version == 1 and len(result.new_inputs) == 3
    manifest = read_manifest(str(out))
    assert manifest is not None
    tok = load_tokenizer(str(tokenizer_path))
    assert manifest.tokenizer.sha256 == tok.sha256
    assert (out / "tokenizer.json").read_text() == tok.json
    assert manifest.eos_id == tok.special_ids["end_of_sentence"]
    assert manifest.sentences_per_block == 8
    doc_split: dict[str, str] = {}
    for split in ("train", "heldout"):
        refs = manifest.shards(split)
        assert refs, f"no {split} shards"
        rows = tokens = 0
        for s, uri in zip(refs, manifest.shard_uris(str(out), split), strict=True):
            data = Path(uri).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s.sha256
            table = pq.read_table(uri)
            assert table.num_rows == s.rows
            n_tok = sum(len(x) for x in table.column("input_ids").to_pylist())
            assert n_tok == s.tokens
            assert sum(sum(x) for x in table.column("sentence_lengths").to_pylist()) == n_tok
            assert sum(table.column("num_bytes").to_pylist()) == s.bytes
            for ids in table.column("document_ids").to_pylist():
                for d in ids:
                    assert doc_split.setdefault(d, split) == split, f"{d} in both splits"
            rows += s.rows
            tokens += s.tokens
        totals = manifest.totals(split)
        assert (rows, tokens) == (totals["rows"], totals["tokens"])
    assert len(doc_split) == 120
    assert 0.05 < sum(v == "heldout" for v in doc_split.values()) / 120 < 0.4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 120 and stats["skipped"] == {}
    assert stats["tokens"] == sum(manifest.totals(s)["tokens"] for s in ("train", "heldout"))
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Where the driver's seconds went: every phase up to the stats, which add up to no more
    # than the driver's time so far, and processing (the work itself) among them.
    seconds = stats["last_run"]["seconds"]
    phases = {k: v for k, v in seconds.items() if k != "driver_so_far"}
    assert {"checks", "plan", "processing", "commit shards"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and seconds["processing"] > 0
    # (each figure is rounded to the millisecond: allow half of one per figure)
    assert sum(phases.values()) <= seconds["driver_so_far"] + 5e-4 * (len(phases) + 1)
    assert "Ray start" not in phases, "Ray was already running: nothing to start"
    assert not list((out / "_staging").glob("2*")), "staging cleaned up after the commit"


def test_rerun_writes_nothing_and_new_file_adds_only_its_shards(
    corpus: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    out = tmp_path / "out"
    first = run_preprocess(config(corpus, out, tokenizer_path))
    before = snapshot(out)
    again = run_preprocess(config(corpus, out, tokenizer_path))
    assert not again.wrote_anything and again.version == 1
    assert snapshot(out) == before, "an idempotent re-run must not touch a single file"

    write_jsonl(corpus / "part-9.jsonl", [make_document(random.Random(9)) for _ in range(10)])
    third = run_preprocess(config(corpus, out, tokenizer_path))
    assert third.version == 2 and third.new_inputs == [str(corpus / "part-9.jsonl")]
    after = snapshot(out)
    changed = {k for k in before if k in after and after[k] != before[k]}
    assert changed <= {"manifest.json", "stats.json"}, changed
    new = set(after) - set(before)
    manifest = read_manifest(str(out))
    assert manifest is not None and manifest.version == 2
    # ... and the deduplication index's rows for the new file's documents.
    index = {r.path for r in manifest.dedup_index if r.added_in_version == 2}
    assert index and all(p.startswith(f"dedup/{manifest.run_id}/") for p in index)
    assert new == {"manifests/v00002.json", *third.shards_added, *index}
    assert all("part-9-" in p for p in third.shards_added)
    assert {e.added_in_version for e in manifest.inputs} == {1, 2}
    assert len(first.shards_added) + len(third.shards_added) == sum(
        len(manifest.shards(s)) for s in ("train", "heldout")
    )


def test_changing_settings_or_tokenizer_into_existing_output_is_refused(
    corpus: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    out = tmp_path / "out"
    run_preprocess(config(corpus, out, tokenizer_path))
    with pytest.raises(ManifestError, match=r"sentences_per_block: existing 8, requested 9"):
        run_preprocess(config(corpus, out, tokenizer_path, sentences_per_block=9))
    with pytest.raises(ManifestError, match="max_sentence_tokens"):
        run_preprocess(config(corpus, out, tokenizer_path, max_sentence_tokens=20))
    other = tmp_path / "other-tok.json"
    train_tokenizer([str(corpus)], str(other), vocab_size=300)
    with pytest.raises(ManifestError, match="tokenizer sha256"):
        run_preprocess(config(corpus, out, other))


def test_changed_input_is_refused_or_replaced(
    corpus: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    out = tmp_path / "out"
    first = run_preprocess(config(corpus, out, tokenizer_path))
    target = corpus / "part-1.jsonl"
    write_jsonl(target, ["Brand new text. Only this."])
    os.utime(target, ns=(1, 1))
    with pytest.raises(ChangedInputError, match=r"part-1\.jsonl"):
        run_preprocess(config(corpus, out, tokenizer_path))
    cfg = config(corpus, out, tokenizer_path)
    cfg.on_changed = "replace"
    res = run_preprocess(cfg)
    assert res.version == 2 and res.new_inputs == [str(target)]
    old = [p for p in first.shards_added if "part-1-" in p]
    assert old and not any((out / p).exists() for p in old), "replaced shards are removed"
    manifest = read_manifest(str(out))
    assert manifest is not None
    entry = next(e for e in manifest.inputs if e.uri == str(target))
    assert entry.stats["counts"]["documents"] == 1


def test_hostile_inputs_are_counted_and_skipped(tmp_path: Path, tokenizer_path: Path) -> None:
    src = tmp_path / "raw"
    rng = random.Random(3)
    write_jsonl(src / "good.jsonl", [make_document(rng) for _ in range(5)])
    (src / "bad.jsonl").write_bytes(b'{"text": "Fine one."}\n{broken\n{"text": 7}\n{"other": 1}\n')
    (src / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (src / "empty.txt").write_bytes(b"")
    (src / "_SUCCESS").write_bytes(b"")  # bookkeeping files are not inputs
    out = tmp_path / "out"
    res = run_preprocess(config(src, out, tokenizer_path))
    assert len(res.new_inputs) == 4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {
        "binary_file": 1,
        "malformed_json": 1,
        "missing_text_field": 1,
        "non_string_text": 1,
        "empty_document": 1,
    }
    assert stats["documents"] == 6
    assert any("bad.jsonl:2" in x for x in stats["skipped_examples"]["malformed_json"])
    # Strict mode turns the first of them into a clear failure, and commits nothing.
    strict_out = tmp_path / "strict"
    cfg = config(src, strict_out, tokenizer_path)
    cfg.strict = True
    from pipeline.counters import StrictModeError

    with pytest.raises(StrictModeError, match="run without --strict"):
        run_preprocess(cfg)
    assert read_manifest(str(strict_out)) is None


def test_missing_or_empty_inputs_fail_before_any_work(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        run_preprocess(config(tmp_path / "nope", tmp_path / "out", tokenizer_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no input files"):
        run_preprocess(config(tmp_path / "empty", tmp_path / "out", tokenizer_path))
    with pytest.raises(StorageError, match="matches no files"):
        run_preprocess(config(tmp_path / "empty" / "*.jsonl", tmp_path / "out", tokenizer_path))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_interrupted_run_leaves_nothing_visible(
    corpus: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    """A run killed before its commit leaves only staging files, which readers never see."""
    from pipeline import preprocess as pp

    out = tmp_path / "out"
    original = pp._commit

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed before commit")

    pp._commit = crash  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_preprocess(config(corpus, out, tokenizer_path))
    finally:
        pp._commit = original
    assert read_manifest(str(out)) is None
    assert not (out / "train").exists()
    res = run_preprocess(config(corpus, out, tokenizer_path))
    assert res.version == 1 and len(res.new_inputs) == 3
