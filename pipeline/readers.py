"""Read stage: one input file -> a stream of (doc_id, text) documents, bad records counted.

A bad record costs only itself: it is skipped and counted once, by reason, and the reader goes
on with the next one. Only a file that is binary through and through, or unreadable, is counted
as a file. Memory stays bounded whatever the input: lines are read in chunks and a record over
``input.max_record_bytes`` is skipped without ever being held whole.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.counters import Counters, StrictModeError
from pipeline.storage import StorageError, is_transient

_COMPRESSION_EXTENSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
CHUNK_BYTES = 1 << 20
"""Bytes handed to the line splitter at a time; a pending line holds at most max_record_bytes."""
READ_BYTES = 8 << 10
"""Bytes asked of the (decompressing) stream per read: a corrupt stream fails a whole read, so
this is about what a truncated file loses before its error point."""
SNIFF_BYTES = 8192
BINARY_FRACTION = 0.3
"""A file whose first SNIFF_BYTES are more than this fraction non-text is skipped as binary.
Text, whatever its encoding problems, stays far below it (a Latin-1 file: a few percent); PNG,
ZIP, executables and compressed data without a known header are around 0.6."""
# C0 controls other than whitespace (and ESC, seen in terminal logs), DEL, and invalid UTF-8
# bytes (decoded with surrogateescape to U+DC80..U+DCFF, one per byte).
_NON_TEXT = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\udc80-\udcff]")


@dataclass(frozen=True)
class Span:
    """The part of a file that one work unit reads (:mod:`pipeline.pieces` plans them).

    Bytes ``[start, end)`` of an uncompressed JSONL or text file, cut right after a line end
    (JSONL) or at the start of a blank line (text paragraphs); or row groups ``[start, end)``
    of a Parquet file. ``first_record`` is the file-wide index of its first record, so that
    document ids and error locations are those of the file read whole.
    """

    start: int = 0
    end: int | None = None
    """None: to the end of the file."""
    first_record: int = 0

    @property
    def is_first(self) -> bool:
        """The span that opens the file: it alone counts the file and its file-level skips."""
        return self.start == 0

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.end is None


WHOLE = Span()


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    location: str
    """``uri#record`` (or ``uri:line``) for error reports."""


def detect(uri: str, configured: str = "auto") -> str:
    """The format from the name (a compression suffix is looked through); unknown is text.

    Compression is not taken from the name but from the content (:func:`sniff_compression`):
    a gzip file named ``.jsonl`` is still read, and so is an uncompressed one named ``.gz``.
    """
    if configured != "auto":
        return configured
    name = uri.lower()
    for ext in _COMPRESSION_EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    return "text"


def sniff_compression(head: bytes) -> str | None:
    """gzip, zstd, bz2 or xz from a file's first bytes (their magic numbers); None: plain."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    # "BZh", block size '1'..'9', then a block (pi) or end-of-stream (sqrt pi) magic: the
    # three letters alone could start a text file.
    if (
        head[:3] == b"BZh"
        and head[3:4].isdigit()
        and head[3:4] != b"0"
        and head[4:10] in (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
    ):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


def _open_decompressed(f: IO[bytes]) -> tuple[IO[bytes], str | None]:
    """Wrap a seekable binary file in the decompressor its magic bytes call for."""
    head = f.read(16)
    f.seek(0)
    compression = sniff_compression(head)
    stream: Any = f
    if compression == "gzip":
        stream = gzip.GzipFile(fileobj=f, mode="rb")
    elif compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    elif compression == "bz2":
        stream = bz2.BZ2File(f)
    elif compression == "xz":
        stream = lzma.LZMAFile(f)  # noqa: SIM115 (the caller closes it)
    return cast(IO[bytes], stream), compression


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    """The stream in chunks of CHUNK_BYTES (fewer only at the end).

    A read that fails (a truncated or corrupt compressed stream) first hands over the bytes
    read before it, so the records they complete are kept; then the error propagates.
    """
    while True:
        parts: list[bytes] = []
        n = 0
        while n < CHUNK_BYTES:
            try:
                part = f.read(min(READ_BYTES, CHUNK_BYTES - n))
            except Exception:
                if parts:
                    yield b"".join(parts)
                raise
            if not part:
                break
            parts.append(part)
            n += len(part)
        if not parts:
            return
        yield b"".join(parts)
        if n < CHUNK_BYTES:
            return


def _looks_binary(head: bytes) -> bool:
    if not head:
        return False
    text = head.decode("utf-8", errors="surrogateescape")
    return len(_NON_TEXT.findall(text)) > BINARY_FRACTION * len(head)


def _lines(chunks: Iterable[bytes], limit: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, n_bytes)`` per line, line end removed; ``line`` is None when over ``limit``.

    Line ends are ``\\n``, ``\\r\\n`` and a lone ``\\r`` (old Mac files, and files whose CRLF
    lost its LF). Splitting on a lone CR is safe for JSONL: JSON cannot hold a raw CR inside a
    string (it must be escaped as ``\\r``), so no valid record is ever cut; a raw CR inside
    a string is already an invalid record, and its pieces are counted as malformed records.
    (JSON does allow a CR as whitespace between tokens, but a JSONL record is one line: one
    that holds a CR between tokens is treated like one broken over two lines.) Only these
    three end a line: bytes.splitlines, unlike str.splitlines, ignores VT, FF, NEL and U+2028.
    Blank lines are yielded too (as ``b""``), so line numbers match an editor's.

    At most ``limit`` bytes of a pending line are held, plus one chunk: the rest of an
    overlong line is counted, not kept.
    """
    parts: list[bytes] = []
    size = 0
    overlong = False
    skip_lf = False  # the previous chunk ended in CR: a LF starting this one is its CRLF
    for chunk in chunks:
        if skip_lf:
            skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        pieces = chunk.splitlines(keepends=True)
        for piece in pieces:
            if piece.endswith(b"\r\n"):
                body, ended = piece[:-2], True
            elif piece.endswith((b"\n", b"\r")):
                body, ended = piece[:-1], True
            else:
                body, ended = piece, False
            size += len(body)
            if not overlong:
                if size > limit:
                    overlong, parts = True, []
                else:
                    parts.append(body)
            if ended:
                yield (None if overlong else b"".join(parts)), size
                parts, size, overlong = [], 0, False
        if pieces and pieces[-1].endswith(b"\r"):
            skip_lf = True
    if size or parts:
        yield (None if overlong else b"".join(parts)), size


def read_documents(
    fs: Any, path: str, uri: str, cfg: InputConfig, counters: Counters, span: Span = WHOLE
) -> Iterator[Document]:
    """Stream the documents of one file (or of one span of it). Never raises on bad data
    (unless strict): counts it.

    Storage faults are not bad data: they propagate (the storage layer has already retried).
    """
    fmt = detect(uri, cfg.format)
    if span.is_first:
        counters.add("files")
    try:
        if fmt == "parquet":
            yield from _read_parquet(fs, path, uri, cfg, counters, span)
            return
        if not span.is_whole:
            yield from _read_span(fs, path, uri, fmt, cfg, counters, span)
            return
        with fs.open(path, "rb") as raw:
            f, _ = _open_decompressed(raw)
            with f:
                chunks = _chunks(f)
                first = next(chunks, b"")
                if _looks_binary(first[:SNIFF_BYTES]):
                    counters.skip("binary_file", uri)
                    return
                stream = _prepend(first, chunks)
                if fmt == "jsonl":
                    yield from _read_jsonl(stream, uri, cfg, counters)
                elif cfg.text_document == "file":
                    yield from _read_text_file(stream, uri, cfg, counters)
                else:
                    yield from _read_paragraphs(stream, uri, cfg, counters)
    except (StrictModeError, StorageError):
        raise
    except (OSError, EOFError, ValueError) as exc:
        if is_transient(exc):
            raise
        # Corrupt compression, truncated Parquet, ...: documents read so far are kept.
        counters.skip("unreadable_file", f"{uri}: {type(exc).__name__}: {exc}")


class _Limited:
    """At most ``n`` bytes of a file, from where it stands."""

    def __init__(self, f: IO[bytes], n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.f.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def open_span(f: IO[bytes], span: Span) -> Iterator[bytes]:
    """The chunks of a byte span of an open, uncompressed file."""
    f.seek(span.start)
    if span.end is None:
        return _chunks(f)
    return _chunks(cast(IO[bytes], _Limited(f, span.end - span.start)))


def _read_span(
    fs: Any, path: str, uri: str, fmt: str, cfg: InputConfig, counters: Counters, span: Span
) -> Iterator[Document]:
    """One byte span of an uncompressed JSONL or paragraph-text file.

    Every span looks at the file's own first bytes, so a binary file is skipped by all of its
    spans alike (and counted once, by the first).
    """
    with fs.open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if sniff_compression(head[:16]) is not None:
            # The planner splits only plain files; this one was replaced by a compressed one.
            raise ValueError(f"{uri} is compressed now: it cannot be read by byte ranges")
        if _looks_binary(head):
            if span.is_first:
                counters.skip("binary_file", uri)
            return
        chunks = open_span(f, span)
        if fmt == "jsonl":
            yield from _read_jsonl(chunks, uri, cfg, counters, span.first_record)
        else:
            yield from _read_paragraphs(chunks, uri, cfg, counters, span.first_record)


def count_records(chunks: Iterable[bytes], fmt: str, cfg: InputConfig) -> int:
    """How many record indexes a span of a JSONL (lines, blank ones included) or paragraph-text
    file uses: what the next span's ``first_record`` adds to this one's."""
    if fmt == "jsonl":
        return sum(1 for _ in _lines(chunks, cfg.max_record_bytes))
    return sum(1 for _ in _paragraph_segments(chunks, cfg.max_record_bytes))


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _too_large(n: int, location: str, cfg: InputConfig, counters: Counters) -> None:
    counters.skip(
        "record_too_large",
        f"{location} ({n} bytes > input.max_record_bytes={cfg.max_record_bytes})",
    )


UTF8_BOM = b"\xef\xbb\xbf"


def _read_jsonl(
    chunks: Iterable[bytes], uri: str, cfg: InputConfig, counters: Counters, first: int = 0
) -> Iterator[Document]:
    for index, (raw, size) in enumerate(_lines(chunks, cfg.max_record_bytes), start=first):
        location = f"{uri}:{index + 1}"
        if raw is None:
            counters.add("records")
            _too_large(size, location, cfg, counters)
            continue
        if index == 0 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]  # a file saved "UTF-8 with BOM": the mark is not text
        if not raw.strip():
            continue
        counters.add("records")
        if b"\x00" in raw:
            counters.skip("nul_byte", location)
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            counters.skip("invalid_utf8", location)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counters.skip("malformed_json", location)
            continue
        if not isinstance(record, dict):
            counters.skip("malformed_json", location)
            continue
        doc = _document(record.get(cfg.text_field), record, index, uri, location, cfg, counters)
        if doc is not None:
            yield doc


def _document(
    text: Any,
    record: dict[str, Any] | None,
    index: int,
    uri: str,
    location: str,
    cfg: InputConfig,
    counters: Counters,
) -> Document | None:
    if text is None:
        counters.skip("missing_text_field", location)
        return None
    if not isinstance(text, str):
        counters.skip("non_string_text", location)
        return None
    if "\x00" in text:
        # Raw NUL bytes are caught before parsing; this is an escaped \u0000 (JSON) or a
        # Parquet string: a NUL in text means corruption, whichever way it arrived.
        counters.skip("nul_byte", location)
        return None
    if not text.strip():
        counters.skip("empty_document", location)
        return None
    doc_id = f"{uri}#{index}"
    if cfg.id_field is not None and record is not None:
        value = record.get(cfg.id_field)
        if value is None:
            counters.add("derived_ids")
        else:
            doc_id = str(value)
    return Document(doc_id=doc_id, text=text, location=location)


def _text_record(
    data: bytes, index: int, uri: str, cfg: InputConfig, counters: Counters
) -> Document | None:
    location = f"{uri}#{index}"
    counters.add("records")
    if b"\x00" in data:
        counters.skip("nul_byte", location)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        counters.skip("invalid_utf8", f"{location} (byte {exc.start})")
        return None
    return _document(text, None, index, uri, location, cfg, counters)


def _read_text_file(
    chunks: Iterable[bytes], uri: str, cfg: InputConfig, counters: Counters
) -> Iterator[Document]:
    """The whole file is one document (line ends are normalise's business)."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > cfg.max_record_bytes:
            counters.add("records")
            _too_large(size, f"{uri}#0", cfg, counters)
            return  # the file is the record: nothing more to read
        parts.append(chunk)
    doc = _text_record(b"".join(parts), 0, uri, cfg, counters)
    if doc is not None:
        yield doc


def _read_paragraphs(
    chunks: Iterable[bytes], uri: str, cfg: InputConfig, counters: Counters, first: int = 0
) -> Iterator[Document]:
    """One document per paragraph: lines up to a blank one (spaces and tabs only).

    A paragraph's index counts every paragraph before it, skipped ones included, so one bad
    paragraph never shifts the ids of the others.
    """
    segments = _paragraph_segments(chunks, cfg.max_record_bytes)
    for index, (lines, size, overlong) in enumerate(segments, start=first):
        yield from _paragraph(lines, size, overlong, index, uri, cfg, counters)


def _paragraph_segments(
    chunks: Iterable[bytes], limit: int
) -> Iterator[tuple[list[bytes], int, bool]]:
    """``(lines, size, overlong)`` per paragraph; an overlong one keeps no lines."""
    lines: list[bytes] = []
    size = 0
    overlong = False
    for raw, n in _lines(chunks, limit):
        if raw is not None and not raw.strip(b" \t"):
            if lines or overlong:
                yield lines, size, overlong
                lines, size, overlong = [], 0, False
            continue
        size += n + (1 if size else 0)
        if raw is None or size > limit:
            overlong, lines = True, []
        elif not overlong:
            lines.append(raw)
    if lines or overlong:
        yield lines, size, overlong


def _paragraph(
    lines: list[bytes],
    size: int,
    overlong: bool,
    index: int,
    uri: str,
    cfg: InputConfig,
    counters: Counters,
) -> Iterator[Document]:
    if overlong:
        counters.add("records")
        _too_large(size, f"{uri}#{index}", cfg, counters)
        return
    doc = _text_record(b"\n".join(lines), index, uri, cfg, counters)
    if doc is not None:
        yield doc


def _read_parquet(
    fs: Any, path: str, uri: str, cfg: InputConfig, counters: Counters, span: Span = WHOLE
) -> Iterator[Document]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            if span.is_first:
                counters.skip(
                    "missing_text_field", f"{uri}: no column {cfg.text_field!r} (has {names})"
                )
            return
        columns = [cfg.text_field]
        if cfg.id_field is not None and cfg.id_field in names and cfg.id_field != cfg.text_field:
            columns.append(cfg.id_field)
        groups = None
        if not span.is_whole:
            groups = list(range(span.start, pf.num_row_groups if span.end is None else span.end))
        index = span.first_record
        for batch in pf.iter_batches(columns=columns, batch_size=1024, row_groups=groups):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for text, ident in zip(texts, ids, strict=True):
                counters.add("records")
                location = f"{uri}#{index}"
                index += 1
                record = {cfg.id_field: ident} if cfg.id_field is not None else None
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        counters.skip("invalid_utf8", location)
                        continue
                if isinstance(text, str) and _utf8_len_over(text, cfg.max_record_bytes):
                    # (Parquet hands over whole row groups; this keeps the later stages bounded.)
                    _too_large(len(text.encode("utf-8")), location, cfg, counters)
                    continue
                doc = _document(text, record, index - 1, uri, location, cfg, counters)
                if doc is not None:
                    yield doc


def _utf8_len_over(text: str, limit: int) -> bool:
    if len(text) > limit:  # at least one byte per character
        return True
    return len(text) * 4 > limit and len(text.encode("utf-8")) > limit
