"""Hostile input costs only itself: each bad record is skipped and counted once, by reason, and
its good neighbours are kept; a huge line is skipped without being held, in bounded memory."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import zstandard

from pipeline.config import InputConfig
from pipeline.counters import Counters, StrictModeError
from pipeline.readers import CHUNK_BYTES, _lines, read_documents

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _read(
    path: Path, cfg: InputConfig | None = None, strict: bool = False
) -> tuple[list[str], Counters]:
    counters = Counters(strict=strict)
    fs = fsspec.filesystem("file")
    docs = list(read_documents(fs, str(path), str(path), cfg or InputConfig(), counters))
    return [d.text for d in docs], counters


def _rec(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


GOOD = ["First good one.", "Second good one.", "Third good one.", "Fourth good one."]


def test_lone_cr_jsonl_keeps_every_good_record(tmp_path: Path) -> None:
    lines = [_rec(GOOD[0]), _rec(GOOD[1]), b"{broken", _rec(GOOD[2]), _rec(GOOD[3])]
    p = tmp_path / "mac.jsonl"
    p.write_bytes(b"\r".join(lines) + b"\r")
    docs, c = _read(p)
    assert docs == GOOD
    assert dict(c.skipped) == {"malformed_json": 1}
    assert c.examples["malformed_json"] == [f"{p}:3"]
    assert c.counts["records"] == 5


def test_mixed_line_ends_and_crlf_split_across_chunks(tmp_path: Path) -> None:
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(
        _rec(GOOD[0]) + b"\r\n" + _rec(GOOD[1]) + b"\n" + _rec(GOOD[2]) + b"\r" + _rec(GOOD[3])
    )
    docs, c = _read(p)
    assert docs == GOOD and not c.skipped
    # A CRLF whose CR ends one chunk and whose LF starts the next is one line end.
    assert list(_lines([b"a\r", b"\nb\r", b"\r", b"c"], 100)) == [
        (b"a", 1),
        (b"b", 1),
        (b"", 0),
        (b"c", 1),
    ]


def test_nul_byte_costs_only_its_record(tmp_path: Path) -> None:
    p = tmp_path / "nul.jsonl"
    first = b'{"text": "has a \x00 raw NUL"}'  # in the first line: it used to drop the file
    escaped = _rec("escaped \x00 NUL")  # valid JSON (\u0000), still a NUL in the text
    p.write_bytes(b"\n".join([first, _rec(GOOD[0]), escaped, _rec(GOOD[1])]) + b"\n")
    docs, c = _read(p)
    assert docs == GOOD[:2]
    assert dict(c.skipped) == {"nul_byte": 2}
    assert c.examples["nul_byte"] == [f"{p}:1", f"{p}:3"]

    t = tmp_path / "nul.txt"
    t.write_bytes(b"Para one.\n\nPara \x00 two.\n\nPara three.\n")
    docs, c = _read(t, InputConfig(text_document="paragraph"))
    assert docs == ["Para one.", "Para three."]
    assert dict(c.skipped) == {"nul_byte": 1} and c.examples["nul_byte"] == [f"{t}#1"]


def test_binary_through_and_through_is_one_file_but_latin1_text_is_records(tmp_path: Path) -> None:
    p = tmp_path / "blob.jsonl"
    p.write_bytes(bytes(range(256)) * 40)
    docs, c = _read(p)
    assert docs == [] and dict(c.skipped) == {"binary_file": 1}
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(
        b"\n".join([_rec(GOOD[0]), '{"text": "caf\xe9"}'.encode("latin-1"), _rec(GOOD[1])])
    )
    docs, c = _read(q)
    assert docs == GOOD[:2] and dict(c.skipped) == {"invalid_utf8": 1}


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
}


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_compression_found_by_magic_bytes_not_name(tmp_path: Path, compression: str) -> None:
    compress = COMPRESSORS[compression]
    jsonl = b"".join(_rec(t) + b"\n" for t in GOOD)
    p = tmp_path / "looks-plain.jsonl"
    p.write_bytes(compress(jsonl))
    docs, c = _read(p)
    assert docs == GOOD and not c.skipped

    t = tmp_path / "looks-plain.txt"
    t.write_bytes(compress("\n\n".join(GOOD).encode()))
    docs, c = _read(t, InputConfig(text_document="paragraph"))
    assert docs == GOOD and not c.skipped
    docs, c = _read(t)
    assert docs == ["\n\n".join(GOOD)] and not c.skipped


def test_gzip_named_jsonl_and_plain_named_gz(tmp_path: Path) -> None:
    jsonl = b"".join(_rec(t) + b"\n" for t in GOOD)
    (tmp_path / "a.jsonl").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b.jsonl.gz").write_bytes(jsonl)  # the name lies the other way
    for name in ("a.jsonl", "b.jsonl.gz"):
        docs, c = _read(tmp_path / name)
        assert docs == GOOD and not c.skipped, name


def test_zstd_named_txt(tmp_path: Path) -> None:
    t = tmp_path / "book.txt"
    t.write_bytes(zstandard.ZstdCompressor().compress(b"Call me Ishmael. Some years ago."))
    docs, c = _read(t)
    assert docs == ["Call me Ishmael. Some years ago."] and not c.skipped


def _huge_line(n_bytes: int) -> bytes:
    sentence = b"The ship sails on. "
    return b'{"text": "' + sentence * (n_bytes // len(sentence)) + b'"}'


def test_huge_line_is_skipped_as_one_record(tmp_path: Path) -> None:
    p = tmp_path / "huge.jsonl"
    p.write_bytes(b"\n".join([_rec(GOOD[0]), _huge_line(50 * MiB), _rec(GOOD[1])]) + b"\n")
    docs, c = _read(p)
    assert docs == GOOD[:2]
    assert dict(c.skipped) == {"record_too_large": 1}
    (example,) = c.examples["record_too_large"]
    assert example.startswith(f"{p}:2 (") and "input.max_record_bytes=8388608" in example
    # Strict mode names the file and the line.
    with pytest.raises(StrictModeError, match=r"huge.jsonl:2 .*record too large"):
        _read(p, strict=True)
    # Just at the limit is kept, one byte over is not.
    line = _rec("x" * 100)
    q = tmp_path / "edge.jsonl"
    q.write_bytes(line + b"\n" + _rec("x" * 101) + b"\n")
    docs, c = _read(q, InputConfig(max_record_bytes=len(line)))
    assert docs == ["x" * 100] and dict(c.skipped) == {"record_too_large": 1}


def test_huge_text_document_and_paragraph(tmp_path: Path) -> None:
    t = tmp_path / "big.txt"
    big = b"Words and more words. " * (3 * CHUNK_BYTES // 22)
    t.write_bytes(b"Short one.\n\n" + big + b"\n\nAfter it.\n")
    cfg = InputConfig(max_record_bytes=CHUNK_BYTES)
    docs, c = _read(t, cfg)
    assert docs == [] and dict(c.skipped) == {"record_too_large": 1}
    assert c.examples["record_too_large"][0].startswith(f"{t}#0 (")
    para = InputConfig(max_record_bytes=CHUNK_BYTES, text_document="paragraph")
    docs, c = _read(t, para)
    assert docs == ["Short one.", "After it."]
    assert dict(c.skipped) == {"record_too_large": 1}
    assert c.examples["record_too_large"][0].startswith(f"{t}#1 (")


_WORKER = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile
    from pipeline.config import InputConfig, PackingConfig, StorageConfig
    from pipeline.pieces import WorkUnit
    from pipeline.storage import InputFile
    from pipeline.tokenizer import LoadedTokenizer
    from pipeline.unit import UnitContext, process_unit

    tok_path, small, big, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tok = LoadedTokenizer.from_json(open(tok_path).read())
    ctx = UnitContext(
        input=InputConfig(max_record_bytes=limit), packing=PackingConfig(),
        storage=StorageConfig(), tokenizer_json=tok.json, special_ids=tok.special_ids,
        staging_uri=tempfile.mkdtemp(),
    )
    def run(p):
        f = InputFile(uri=p, size=os.path.getsize(p), fingerprint="f")
        return process_unit(WorkUnit(f), ctx)
    run(small)  # imports, tokenizer, Parquet writer: the worker's baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = run(big)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak, "stats": record["stats"]}))
    """
)


@pytest.mark.parametrize("limit", [1 * MiB, 8 * MiB])
def test_worker_peak_rss_is_bounded_on_a_50mb_line(
    tmp_path: Path, tokenizer_path: Path, limit: int
) -> None:
    """The process that runs the unit (a Ray worker in production) grows by at most
    2 x max_record_bytes + 8 MiB: the pending line (<= the limit), one read chunk and its split
    copy (2 x CHUNK_BYTES = 2 MiB), and allocator slack. It used to grow by 2.5 GiB (~50x the
    line: the whole line decoded, parsed, normalised, split and tokenized)."""
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"".join(_rec(f"Small doc {i}. It is fine.") + b"\n" for i in range(50)))
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"\n".join([_rec(GOOD[0]), _huge_line(50 * MiB), _rec(GOOD[1])]) + b"\n")
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tokenizer_path), str(small), str(big), str(limit)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = (result["peak_kib"] - result["base_kib"]) * 1024
    assert result["stats"]["skipped"] == {"record_too_large": 1}
    assert result["stats"]["counts"]["documents"] == 2
    assert growth < 2 * limit + 8 * MiB, f"worker grew by {growth / MiB:.1f} MiB"


def test_scripts_emoji_and_html_are_text_and_empty_files_cost_nothing(tmp_path: Path) -> None:
    texts = [
        "東京は日本の首都です。大阪は二番目です。",
        "ภาษาไทยไม่มีช่องว่างระหว่างคำ แต่มีระหว่างประโยค",
        "اللغة العربية تكتب من اليمين إلى اليسار.",
        "Rockets 🚀 and flags 🏳️‍🌈 are one character each to a reader.",
        "<html><body><p>Markup stays text &amp; is kept.</p></body></html>",
    ]
    p = tmp_path / "world.jsonl"
    p.write_bytes(b"\n".join(_rec(t) for t in texts) + b"\n")
    docs, c = _read(p)
    assert docs == texts and not c.skipped
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    docs, c = _read(empty)
    assert docs == [] and not c.skipped
