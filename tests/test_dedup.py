"""Deduplication across an output and every night (pipeline/dedup.py), with planted copies.

Every test plants its copies for real (files on disk, runs of the real pipeline) and asserts
that they were planted: the same corpus without them, or with ``--dedup none``, keeps more.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import DedupConfig, InputConfig, PackingConfig, PreprocessConfig
from pipeline.counters import StrictModeError
from pipeline.fingerprints import Fingerprinter
from pipeline.manifest import Manifest, ManifestError
from pipeline.preprocess import run_preprocess
from tests.conftest import make_document


def _docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n)]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    return path


def _cfg(
    src: list[Path] | Path, out: Path, tok: Path, mode: str = "exact", **kw: object
) -> PreprocessConfig:
    paths = [str(p) for p in src] if isinstance(src, list) else [str(src)]
    return PreprocessConfig(
        input=InputConfig(paths=paths, id_field="id", **kw.pop("input", {})),  # type: ignore[arg-type]
        output=str(out),
        tokenizer=str(tok),
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16, heldout_fraction=0.3),
        dedup=DedupConfig(mode=mode),  # type: ignore[arg-type]
        plot=False,
        **kw,  # type: ignore[arg-type]
    )


def _doc_ids(out: Path, split: str | None = None) -> list[str]:
    m = Manifest.require(str(out))
    ids: list[str] = []
    for s in m.splits if split is None else [split]:
        for ref in m.shards(s):
            rows = pq.read_table(out / ref.path, columns=["document_ids", "first_sentence_offset"])
            for doc_ids, first in zip(
                rows.column("document_ids").to_pylist(),
                rows.column("first_sentence_offset").to_pylist(),
                strict=True,
            ):
                # A document that continues from the previous block is listed there already.
                ids.extend(doc_ids[1:] if first > 0 else doc_ids)
    return ids


def _shards(out: Path) -> dict[str, str]:
    m = Manifest.require(str(out))
    return {r.path: r.sha256 for s in m.splits for r in m.shards(s)}


def test_same_text_under_two_names_in_one_night_is_kept_once(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    docs = _docs(1, 30)
    raw = tmp_path / "raw"
    _write(raw / "a.jsonl", [(f"a{i}", t) for i, t in enumerate(docs)])
    # b repeats a's documents 5..14 (re-fetched under new ids, one with other spacing and
    # line ends: the fingerprint is of the normalised text), and adds 10 of its own.
    copies = [(f"b{i}", t) for i, t in enumerate(docs[5:15])]
    copies[0] = (copies[0][0], "  " + copies[0][1].replace(" ", "  \r\n", 3))
    _write(raw / "b.jsonl", copies + [(f"b-own{i}", t) for i, t in enumerate(_docs(2, 10))])
    r = run_preprocess(_cfg(raw, tmp_path / "out", tokenizer_path))
    ids = _doc_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 40
    assert {f"a{i}" for i in range(30)} <= set(ids), "the first copy by input URI survives"
    assert not any(i.startswith("b") and not i.startswith("b-own") for i in ids)
    assert r.stats["skipped"]["duplicate_exact"] == 10
    assert "copy of" in r.stats["skipped_examples"]["duplicate_exact"][0]
    assert r.run_stats["dedup"]["duplicate_exact"] == 10
    # The copies were planted: without deduplication all 50 documents are kept.
    run_preprocess(_cfg(raw, tmp_path / "plain", tokenizer_path, mode="none"))
    assert len(_doc_ids(tmp_path / "plain")) == 50


def test_copies_across_nights_and_of_held_out_documents_are_skipped(
    tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = _docs(3, 40)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write(raw / "night1.jsonl", [(f"n1-{i}", t) for i, t in enumerate(docs)])
    run_preprocess(_cfg(raw, out, tokenizer_path))
    heldout = _doc_ids(out, "heldout")
    assert heldout, "the fixture needs held-out documents"
    held_texts = [docs[int(i.split("-")[1])] for i in heldout]
    # Night 2: the held-out documents again under new ids (their new ids hash into train
    # mostly: without deduplication they would contaminate the evaluation), two of night 1's
    # train documents, and new text.
    train_copy = [t for i, t in enumerate(docs) if f"n1-{i}" not in heldout][:2]
    again = held_texts + train_copy
    _write(
        raw / "night2.jsonl",
        [(f"n2-copy{i}", t) for i, t in enumerate(again)]
        + [(f"n2-new{i}", t) for i, t in enumerate(_docs(4, 5))],
    )
    r = run_preprocess(_cfg(raw, out, tokenizer_path))
    assert r.new_inputs == [str(raw / "night2.jsonl")]
    ids = _doc_ids(out)
    assert not [i for i in ids if "copy" in i], "no copy of an earlier night's document"
    assert sum("n2-new" in i for i in ids) == 5
    assert r.run_stats["dedup"]["duplicate_exact"] == len(again)
    lookup = r.run_stats["dedup"]["lookup"]
    assert lookup["matches"] == len(again) and lookup["files"] >= 1
    # Planted: the copies' new ids do land in train when nothing deduplicates.
    run_preprocess(_cfg(raw, tmp_path / "plain", tokenizer_path, mode="none"))
    leaked = [i for i in _doc_ids(tmp_path / "plain", "train") if "n2-copy" in i]
    assert any(int(i.removeprefix("n2-copy")) < len(held_texts) for i in leaked)
    # The contamination check (from the command line) agrees: clean with deduplication,
    # contaminated without.
    from jobs.cli import main

    for folder, clean in ((out, True), (tmp_path / "plain", False)):
        assert main(["contamination", "--output", str(folder), "--mode", "exact", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert (found["contaminated"] == 0) == clean, found


def _mutate(words: list[str], fraction: float, rng: random.Random) -> list[str]:
    out = list(words)
    for k in rng.sample(range(len(out)), int(len(out) * fraction)):
        out[k] = f"zz{rng.randrange(10**6)}"
    return out


def _jaccard(fp: Fingerprinter, a: str, b: str) -> float:
    x, y = set(fp.shingles([a])), set(fp.shingles([b]))
    return len(x & y) / len(x | y)


def test_near_copies_caught_above_the_threshold_and_kept_below() -> None:
    """datatrove's setup (5-grams, 14 bands x 8 rows) flags a pair with probability
    1 - (1 - J^8)^14: 0.99 at J = 0.85, 4e-5 at J = 0.2. Planted pairs of known Jaccard."""
    fp = Fingerprinter.from_config(DedupConfig(mode="near"))
    rng = random.Random(5)
    caught, kept = [], []
    for k in range(20):
        words = " ".join(_docs(100 + k, 1)).split()[:400]
        base = " ".join(words)
        close = " ".join(_mutate(words, 0.008, rng))  # ~3 words changed: J ~ 0.93
        far = " ".join(_mutate(words, 0.2, rng))  # J ~ 0.2
        j_close, j_far = _jaccard(fp, base, close), _jaccard(fp, base, far)
        assert j_close >= 0.85 and j_far <= 0.35, (j_close, j_far)
        kb, kc, kf = (set(k.tolist()) for k in fp.band_keys([base, close, far]))
        caught.append(bool(kb & kc))
        kept.append(not kb & kf)
    assert all(caught) and all(kept), (caught, kept)


def test_near_copies_skipped_end_to_end_and_survivor_independent_of_workers(
    tmp_path: Path, tokenizer_path: Path, ray_session: None
) -> None:
    rng = random.Random(9)
    docs = _docs(6, 60)
    raw = tmp_path / "raw"
    # One near copy (a changed date line) and one exact copy per later file, spread so that
    # the files are cut into pieces that different workers process.
    _write(raw / "a.jsonl", [(f"a{i}", t) for i, t in enumerate(docs[:30])])
    near = "Fetched on 2026-12-05. " + docs[3]
    _write(
        raw / "b.jsonl",
        [(f"b{i}", t) for i, t in enumerate(docs[30:])] + [("b-near", near), ("b-exact", docs[7])],
    )
    far = " ".join(_mutate(docs[4].split(), 0.3, rng))
    _write(raw / "c.jsonl", [("c-far", far), ("c-near", "Fetched on 2026-12-06. " + docs[3])])
    here = run_preprocess(_cfg(raw, tmp_path / "here", tokenizer_path, mode="near"))
    on_ray = run_preprocess(
        _cfg(
            raw,
            tmp_path / "ray",
            tokenizer_path,
            mode="near",
            input={"split_bytes": 4096},
            workers=3,
            local_below_bytes=0,
        )
    )
    assert here.stats["skipped"] == {"duplicate_exact": 1, "duplicate_near": 2}
    assert on_ray.stats["skipped"] == here.stats["skipped"]
    ids = set(_doc_ids(tmp_path / "here"))
    assert {"a3", "a7", "c-far"} <= ids and not ids & {"b-near", "b-exact", "c-near"}
    assert set(_doc_ids(tmp_path / "ray")) == ids, "same survivors with 3 workers and pieces"
    m = Manifest.require(str(tmp_path / "ray"))
    assert len(m.inputs) == 3 and any(e.shards and "-000" in e.shards[0] for e in m.inputs)


def test_strict_runs_count_duplicates_instead_of_failing(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    docs = _docs(7, 5)
    raw = tmp_path / "raw"
    _write(raw / "a.jsonl", [(f"a{i}", t) for i, t in enumerate(docs)] + [("a-again", docs[0])])
    r = run_preprocess(_cfg(raw, tmp_path / "out", tokenizer_path, strict=True))
    assert r.stats["skipped"] == {"duplicate_exact": 1}
    # ... while a real fault still fails the strict run.
    (raw / "a.jsonl").write_text((raw / "a.jsonl").read_text() + "{not json\n")
    with pytest.raises(StrictModeError):
        run_preprocess(_cfg(raw, tmp_path / "out2", tokenizer_path, strict=True))


def test_other_dedup_settings_on_an_existing_output_are_refused(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    raw = _write(tmp_path / "raw" / "a.jsonl", [("a", _docs(8, 1)[0])])
    out = tmp_path / "out"
    run_preprocess(_cfg(raw, out, tokenizer_path, mode="none"))
    _write(tmp_path / "raw" / "b.jsonl", [("b", _docs(9, 1)[0])])
    with pytest.raises(ManifestError, match="--dedup none"):
        run_preprocess(_cfg(tmp_path / "raw", out, tokenizer_path, mode="exact"))
    assert run_preprocess(_cfg(tmp_path / "raw", out, tokenizer_path, mode="none")).version == 2


def test_a_killed_commit_leaves_the_index_consistent(
    tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _docs(10, 20)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write(raw / "a.jsonl", [(f"a{i}", t) for i, t in enumerate(docs[:10])])
    run_preprocess(_cfg(raw, out, tokenizer_path))
    _write(raw / "b.jsonl", [(f"b{i}", t) for i, t in enumerate(docs[5:])])

    def killed(self: Manifest, output: str, storage: object = None) -> None:
        raise KeyboardInterrupt("killed at the commit point")

    monkeypatch.setattr(Manifest, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(_cfg(raw, out, tokenizer_path))
    monkeypatch.undo()
    m = Manifest.require(str(out))
    assert m.version == 1 and all((out / r.path).exists() for r in m.dedup_index)
    r = run_preprocess(_cfg(raw, out, tokenizer_path))
    assert r.run_stats["dedup"]["duplicate_exact"] == 5, "the killed run's index was not used"
    ids = _doc_ids(out)
    assert len(ids) == len(set(ids)) == 20
    listed = {r.path for r in Manifest.require(str(out)).dedup_index}
    on_disk = {str(p.relative_to(out)) for p in (out / "dedup").rglob("*.parquet")}
    assert listed == on_disk, "the killed run's index files were removed"


def test_contamination_of_an_output_made_without_dedup_is_reported_and_removed(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    from pipeline.config import StorageConfig
    from pipeline.contamination import ContaminationConfig, check_contamination
    from pipeline.unit import heldout_hash

    docs = _docs(12, 40)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write(raw / "a.jsonl", [(f"a{i}", t) for i, t in enumerate(docs)])
    # b: every a document again under a new id, one of them as a near copy (a date line).
    rows = [(f"b{i}", t) for i, t in enumerate(docs)]
    rows[0] = ("b0", "Fetched on 2026-12-06. " + docs[0])
    _write(raw / "b.jsonl", rows)
    run_preprocess(_cfg(raw, out, tokenizer_path, mode="none"))
    held = {i for i in _doc_ids(out, "heldout")}

    def is_held(doc_id: str) -> bool:
        return heldout_hash(doc_id, 0) < 0.3

    assert held == {d for d in [*(f"a{i}" for i in range(40)), *(r[0] for r in rows)] if is_held(d)}
    # Planted: a held-out document whose copy (the other file's id) is in train.
    want = {d for d in held if not is_held(("b" if d[0] == "a" else "a") + d[1:])}
    assert want, "the fixture needs contaminated held-out documents"
    near_one = {"a0", "b0"} & want
    check = ContaminationConfig(output=str(out), mode="near", storage=StorageConfig())
    report = check_contamination(check)
    assert report.heldout_documents == len(held)
    assert (report.exact, report.near) == (len(want - near_one), len(near_one))
    exact_only = check_contamination(ContaminationConfig(output=str(out), mode="exact"))
    assert exact_only.contaminated == len(want - near_one)
    assert not report.removed and Manifest.require(str(out)).version == 1

    train_before = sorted(_doc_ids(out, "train"))
    check.remove = True
    removed = check_contamination(check)
    assert removed.removed and removed.version == 2
    assert set(_doc_ids(out, "heldout")) == held - want
    assert sorted(_doc_ids(out, "train")) == train_before, "train keeps every document"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"]["heldout_copy_of_train"] == len(want)
    check.remove = False
    assert check_contamination(check).contaminated == 0


def test_a_key_range_with_too_many_files_is_merged_and_old_files_swept(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    import time

    from pipeline.dedup_index import STALE_S, sweep

    docs = _docs(13, 40)
    raw, out = tmp_path / "raw", tmp_path / "out"

    def night(k: int, rows: list[tuple[str, str]]) -> dict:
        _write(raw / f"n{k}.jsonl", rows)
        cfg = _cfg(raw, out, tokenizer_path)
        cfg.dedup.index_buckets, cfg.dedup.index_max_files = 1, 2
        return run_preprocess(cfg).run_stats

    night(1, [(f"n1-{i}", t) for i, t in enumerate(docs[:10])])
    night(2, [(f"n2-{i}", t) for i, t in enumerate(docs[10:20])])
    assert len(Manifest.require(str(out)).dedup_index) == 2
    night(3, [(f"n3-{i}", t) for i, t in enumerate(docs[20:30])])
    m = Manifest.require(str(out))
    assert len(m.dedup_index) == 1, m.dedup_index
    (merged,) = m.dedup_index
    assert merged.rows == 30 and merged.path.startswith(f"dedup/{m.run_id}/")
    # A copy of night 1's documents is still caught through the merged file.
    run = night(4, [("n4-copy", docs[3]), *((f"n4-{i}", t) for i, t in enumerate(docs[30:]))])
    assert run["dedup"]["duplicate_exact"] == 1 and run["dedup"]["lookup"]["files"] == 1
    # The merged-away files stay for a day (a run that planned against the old manifest may
    # still read them), then go; listed files never do.
    on_disk = {str(p.relative_to(out)) for p in (out / "dedup").rglob("*.parquet")}
    listed = {r.path for r in Manifest.require(str(out)).dedup_index}
    assert len(on_disk - listed) == 2
    assert sweep(str(out), None, listed, time.time()) == []
    gone = sweep(str(out), None, listed, time.time() + STALE_S + 1)
    assert sorted(gone) == sorted(on_disk - listed)
    assert {str(p.relative_to(out)) for p in (out / "dedup").rglob("*.parquet")} == listed
