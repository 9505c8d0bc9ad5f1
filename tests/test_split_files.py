"""Large files cut into pieces that workers share (pipeline/pieces.py), on in-process Ray.

The guarantee: a split file's blocks hold the same sentences, in the same documents, with the
same document ids, as the file processed whole; only where blocks and shards end differs.
Every format that is cut is checked against its own whole run, bad records included.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
from pipeline.manifest import read_manifest
from pipeline.pieces import local_map, plan_units
from pipeline.preprocess import run_preprocess
from pipeline.storage import StorageConfig, expand_inputs
from tests.conftest import make_document

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(src: Path, out: Path, tok: Path, split_bytes: int, **inp: object):
    cfg = PreprocessConfig(
        input=InputConfig(paths=[str(src)], split_bytes=split_bytes, **inp),  # type: ignore[arg-type]
        output=str(out),
        tokenizer=str(tok),
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16, heldout_fraction=0.3),
        plot=False,
    )
    return run_preprocess(cfg)


def _documents(out: Path) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """split -> document id -> its sentences (token tuples) in order, over every shard."""
    m = read_manifest(str(out))
    docs: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    for split, shards in m.splits.items():
        per: dict[str, list[tuple[int, ...]]] = defaultdict(list)
        for shard in shards:
            for row in pq.read_table(out / shard.path).to_pylist():
                pos = 0
                for length, d in zip(row["sentence_lengths"], row["document_index"], strict=True):
                    per[row["document_ids"][d]].append(tuple(row["input_ids"][pos : pos + length]))
                    pos += length
        docs[split] = dict(per)
    return docs


def _compare(src: Path, tmp: Path, tok: Path, split_bytes: int, **inp: object) -> None:
    whole = _run(src, tmp / "whole", tok, 0, **inp)
    cut = _run(src, tmp / "cut", tok, split_bytes, **inp)
    assert len(cut.shards_added) > len(whole.shards_added), "the file was not cut"
    assert _documents(tmp / "cut") == _documents(tmp / "whole")
    # The same records read, skipped and counted: the file once, each bad record once.
    assert _same_counts(cut.run_stats["counts"], whole.run_stats["counts"])
    assert cut.run_stats["skipped"] == whole.run_stats["skipped"]
    assert cut.run_stats["counts"]["files"] == 1
    m = read_manifest(str(tmp / "cut"))
    assert [e.shards for e in m.inputs] == [tuple(sorted(cut.shards_added))]
    again = _run(src, tmp / "cut", tok, split_bytes, **inp)
    assert not again.wrote_anything


def _same_counts(a: dict[str, int], b: dict[str, int]) -> bool:
    # Blocks (and so block-level totals) may differ: each piece ends its own last block.
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    return differ <= {"blocks"}


def test_jsonl_cut_by_lines_keeps_documents_ids_and_bad_records(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    rng = random.Random(3)
    src = tmp_path / "raw" / "big.jsonl"
    src.parent.mkdir()
    lines = [json.dumps({"text": make_document(rng)}) for _ in range(150)]
    lines[20] = "{not json"  # malformed: counted once, wherever the cuts fall
    lines[40] = ""  # a blank line still takes an index
    lines[60] = json.dumps({"other": "no text"})
    body = "\n".join(lines[:100]) + "\r\n" + "\r\n".join(lines[100:]) + "\n"
    src.write_bytes(body.encode())
    _compare(src.parent, tmp_path, tokenizer_path, split_bytes=4096)


def test_text_cut_at_blank_lines_never_inside_a_paragraph(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    rng = random.Random(4)
    src = tmp_path / "raw" / "book.txt"
    src.parent.mkdir()
    paragraphs = []
    for _ in range(120):
        # Paragraphs of several lines, so that a cut at a mere line end would split one.
        paragraphs.append("\n".join(make_document(rng, 2) for _ in range(3)))
    src.write_text("\n\n".join(paragraphs) + "\n")
    _compare(src.parent, tmp_path, tokenizer_path, split_bytes=4096, text_document="paragraph")


def test_parquet_cut_by_row_groups(tmp_path: Path, tokenizer_path: Path) -> None:
    rng = random.Random(5)
    src = tmp_path / "raw" / "big.parquet"
    src.parent.mkdir()
    texts: list[str | None] = [make_document(rng) for _ in range(200)]
    texts[33] = None  # a missing text: skipped and counted once
    pq.write_table(pa.table({"text": texts}), src, row_group_size=10)
    _compare(src.parent, tmp_path, tokenizer_path, split_bytes=2048)


def test_files_that_cannot_be_cut_stay_whole(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "raw"
    src.mkdir()
    body = "".join(json.dumps({"text": f"Sentence {i}. Another one."}) + "\n" for i in range(500))
    (src / "packed.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (src / "plain.jsonl").write_text(body)
    (src / "one-line.txt").write_text("no blank line here " * 1000)  # text: one doc per file
    files = expand_inputs([str(src)], StorageConfig())
    cfg = InputConfig(split_bytes=1024, text_document="paragraph")
    units = plan_units(files, cfg, StorageConfig(), local_map)
    pieces = {u.file.uri.rsplit("/", 1)[-1]: u.pieces for u in units if u.piece == 0}
    assert pieces["packed.jsonl.gz"] == 1  # compressed: one stream
    assert pieces["one-line.txt"] == 1  # no blank line to cut at
    assert pieces["plain.jsonl"] > 1
    plain = [u for u in units if u.file.uri.endswith("plain.jsonl")]
    # Contiguous byte ranges, each after a line end, numbered as the file's lines are.
    assert plain[0].span.start == 0 and plain[-1].span.end is None
    data = (src / "plain.jsonl").read_bytes()
    for a, b in itertools.pairwise(plain):
        assert a.span.end == b.span.start and data[b.span.start - 1 : b.span.start] == b"\n"
        assert b.span.first_record == data[: b.span.start].count(b"\n")


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 48 << 20), min_size=1, max_size=300),
    workers=st.integers(1, 64),
)
def test_groups_keep_every_unit_once_in_order_and_balance_the_workers(
    sizes: list[int], workers: int
) -> None:
    # Tasks take consecutive groups of units: every unit exactly once, in order; a group
    # passes the target only when it is one unit larger than the target; a large run has
    # several groups per worker, so that no worker is left with a long tail while others wait;
    # and a small run still gives every worker a group.
    from pipeline.distributed import GROUPS_PER_WORKER, MIN_TASK_BYTES, group_target, group_units
    from pipeline.pieces import WorkUnit
    from pipeline.storage import InputFile

    units = [WorkUnit(InputFile(f"f{i}", n, "x")) for i, n in enumerate(sizes)]
    groups = group_units(units, workers)
    assert [u for g in groups for u in g] == units
    total = sum(sizes)
    target = group_target(total, workers)
    for g in groups:
        assert g and (sum(u.size for u in g) <= target or len(g) == 1)
    if max(sizes) <= target:
        assert len(groups) >= min(workers, len(units))
        if total >= GROUPS_PER_WORKER * workers * MIN_TASK_BYTES:
            assert len(groups) >= GROUPS_PER_WORKER * workers // 2
