"""Read, normalise and split stages, without Ray: bad input is counted by reason, never lost silently."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import unicodedata
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig
from pipeline.counters import Counters, StrictModeError
from pipeline.readers import detect, read_documents, sniff_compression
from pipeline.text import _CONTROL, _PARAGRAPH_SEPARATOR, normalise, split_sentences


def _read(
    path: Path, cfg: InputConfig | None = None, strict: bool = False
) -> tuple[list, Counters]:
    counters = Counters(strict=strict)
    fs = fsspec.filesystem("file")
    docs = list(read_documents(fs, str(path), str(path), cfg or InputConfig(), counters))
    return docs, counters


def test_normalise_keeps_paragraphs_apart_and_collapses_whitespace() -> None:
    text = "A   heading\r\n\r\nFirst line\nwrapped\there.\x07 Second\u200b one!\n \n\nLast"
    assert normalise(text) == ["A heading", "First line wrapped here. Second one!", "Last"]
    assert normalise("  \n\n \t ") == []


# Every character class normalise treats specially: line ends (LF, CR, CRLF, U+2028/2029),
# blank-line whitespace (space, tab) and other whitespace (NBSP, ideographic space, VT, FS),
# controls and zero-width marks, and a letter with a combining accent (NFC composes it).
_TRICKY = [
    "a",
    "b",
    ".",
    " ",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "\u2028",
    "\u2029",
    "\u00a0",
    "\u3000",
    "\x0b",
    "\x1c",
    "\x07",
    "\x85",
    "\u200b",
    "\ufeff",
    "e\u0301",
    "\u00e9",
    "Z",
]


def _normalise_reference(text: str) -> list[str]:
    """What normalise() means, step by step (its original implementation)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace(_PARAGRAPH_SEPARATOR, "\n\n").replace("\u2028", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t]*\n", text))
    return [p for p in paragraphs if p]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TRICKY), max_size=40).map("".join))
def test_normalise_equals_its_plain_definition(text: str) -> None:
    # normalise() skips steps that cannot change the text and groups lines instead of
    # splitting on a regex: it must stay the same function as the step-by-step definition.
    assert normalise(text) == _normalise_reference(text)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.lists(st.sampled_from([*_TRICKY, ". ", "! ", "? ", "Mr. ", "\u3002"]), max_size=60).map(
            "".join
        ),
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300),
    )
)
def test_sentences_are_single_spaced_words(text: str) -> None:
    # pipeline.packing counts a sentence's words as its spaces plus one, without splitting it:
    # every sentence is non-empty, has no whitespace at either end, and words one space apart.
    for s in split_sentences(normalise(text)):
        assert s and s == s.strip() and s.split(" ") == s.split(), repr(s)


def test_split_sentences_never_glues_a_heading_to_the_next_paragraph() -> None:
    sentences = split_sentences(normalise("ACT I\n\nEnter the king. He speaks slowly! Why?"))
    assert sentences == ["ACT I", "Enter the king.", "He speaks slowly!", "Why?"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jsonl", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("a.jsonl.zst", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.txt", "text"),
        ("a.txt.xz", "text"),
        ("a.weird", "text"),
    ],
)
def test_detect_format_by_name(name: str, expected: str) -> None:
    assert detect(name) == expected
    assert detect(name, "parquet") == "parquet"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (gzip.compress(b"x"), "gzip"),
        (zstandard.ZstdCompressor().compress(b"x"), "zstd"),
        (bz2.compress(b"x"), "bz2"),
        (bz2.compress(b""), "bz2"),
        (lzma.compress(b"x"), "xz"),
        (b"BZh is how this text file starts", None),
        (b'{"text": "plain"}', None),
        (b"", None),
    ],
)
def test_compression_is_sniffed_from_magic_bytes(head: bytes, expected: str | None) -> None:
    assert sniff_compression(head[:16]) == expected


def test_jsonl_bad_records_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "Good one. Fine.", "id": "d1"}).encode(),
        b"{not json",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff\xfe utf8"}',
        json.dumps(["a", "list"]).encode(),
        b"",
        json.dumps({"text": "Second good."}).encode(),
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    docs, c = _read(p, InputConfig(id_field="id"))
    assert [d.text for d in docs] == ["Good one. Fine.", "Second good."]
    assert docs[0].doc_id == "d1"
    assert docs[1].doc_id == f"{p}#8"  # derived: path + record index
    assert dict(c.skipped) == {
        "malformed_json": 2,
        "missing_text_field": 1,
        "non_string_text": 1,
        "empty_document": 1,
        "invalid_utf8": 1,
    }
    assert c.examples["malformed_json"] == [f"{p}:2", f"{p}:7"]
    assert c.counts["records"] == 8


def test_strict_mode_fails_at_the_first_bad_record_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok."}\n{oops\n')
    with pytest.raises(StrictModeError, match=r"bad.jsonl:2: malformed json"):
        _read(p, strict=True)


def test_compressed_jsonl_gz_and_zst(tmp_path: Path) -> None:
    payload = b"".join(json.dumps({"text": f"Doc {i} here."}).encode() + b"\n" for i in range(5))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        docs, c = _read(tmp_path / name)
        assert [d.text for d in docs] == [f"Doc {i} here." for i in range(5)]
        assert not c.skipped


def test_corrupt_gzip_keeps_what_was_read_and_counts_the_file(tmp_path: Path) -> None:
    payload = b"".join(json.dumps({"text": f"Doc {i}."}).encode() + b"\n" for i in range(2000))
    blob = gzip.compress(payload)
    (tmp_path / "t.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    docs, c = _read(tmp_path / "t.jsonl.gz")
    assert 0 < len(docs) < 2000
    assert c.skipped["unreadable_file"] == 1


def test_binary_file_among_inputs_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "image.txt"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10)
    docs, c = _read(p)
    assert docs == [] and c.skipped["binary_file"] == 1
    q = tmp_path / "blob.jsonl"
    q.write_bytes(bytes(range(256)) * 10)
    docs, c = _read(q)
    assert docs == [] and c.skipped["binary_file"] == 1


def test_plain_text_file_and_paragraph_documents(tmp_path: Path) -> None:
    p = tmp_path / "book.txt"
    p.write_text("Para one. Still one.\n\nPara two.\n\n\n  \nPara three!")
    docs, _ = _read(p)
    assert len(docs) == 1 and docs[0].doc_id == f"{p}#0"
    docs, _ = _read(p, InputConfig(text_document="paragraph"))
    assert [d.text.strip() for d in docs] == ["Para one. Still one.", "Para two.", "Para three!"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait.".encode("latin-1"))
    docs, c = _read(bad)
    assert docs == [] and c.skipped["invalid_utf8"] == 1


def test_parquet_text_column_ids_and_nulls(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["One. Two.", None, "Three."], "key": ["a", "b", None]}), p)
    docs, c = _read(p, InputConfig(text_field="content", id_field="key"))
    assert [(d.doc_id, d.text) for d in docs] == [("a", "One. Two."), (f"{p}#2", "Three.")]
    assert c.skipped["missing_text_field"] == 1
    docs, c = _read(p, InputConfig(text_field="nope"))
    assert docs == [] and c.skipped["missing_text_field"] == 1
    assert "no column 'nope'" in c.examples["missing_text_field"][0]


def test_counters_merge_and_roundtrip() -> None:
    a, b = Counters(), Counters()
    a.add("tokens", 5)
    a.skip("malformed_json", "x:1")
    a.add_sentence_lengths(__import__("numpy").array([3, 3, 5]))
    b.add("tokens", 7)
    b.add_sentence_lengths(__import__("numpy").array([9]))
    b.add_document_sentences(5)
    m = Counters.from_dict(a.to_dict()).merge(b)
    d = m.to_dict()
    assert d["counts"] == {"tokens": 12}
    assert d["skipped"] == {"malformed_json": 1}
    assert d["sentence_tokens_hist"][3] == 2 and d["sentence_tokens_hist"][9] == 1
    assert sum(d["doc_sentences_hist_log2"]) == 1 and d["doc_sentences_hist_log2"][3] == 1
