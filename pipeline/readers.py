"""Read stage: one input file -> a stream of (doc_id, text) documents, bad records counted."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.counters import Counters, StrictModeError

_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
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
_SNIFF_BYTES = 8192
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r]*\n")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    location: str
    """``uri#record`` (or ``uri:line``) for error reports."""


def detect(uri: str, configured: str = "auto") -> tuple[str, str | None]:
    """Return (format, compression) from the name; unknown extensions are read as text."""
    name = uri.lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression = comp
            name = name[: -len(ext)]
            break
    if configured != "auto":
        return configured, compression
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt, compression
    return "text", compression


def _open(fs: Any, path: str, compression: str | None) -> Any:
    f = fs.open(path, "rb")
    if compression is not None:
        from fsspec.compression import compr

        stream = compr[compression](f, mode="rb")
        if compression == "zstd":
            # zstandard's reader has no line iteration; buffering adds it.
            return io.BufferedReader(stream)
        return stream
    return f


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_documents(
    fs: Any, path: str, uri: str, cfg: InputConfig, counters: Counters
) -> Iterator[Document]:
    """Stream the documents of one file. Never raises on bad data (unless strict): counts it."""
    fmt, compression = detect(uri, cfg.format)
    counters.add("files")
    try:
        if fmt == "parquet":
            yield from _read_parquet(fs, path, uri, cfg, counters)
            return
        with _open(fs, path, compression) as f:
            if fmt == "jsonl":
                yield from _read_jsonl(f, uri, cfg, counters)
            else:
                yield from _read_text(f, uri, cfg, counters)
    except StrictModeError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        # Corrupt compression, truncated Parquet, ...: documents read so far are kept.
        counters.skip("unreadable_file", f"{uri}: {type(exc).__name__}: {exc}")


def _read_jsonl(f: IO[bytes], uri: str, cfg: InputConfig, counters: Counters) -> Iterator[Document]:
    first = True
    for index, raw in enumerate(f):
        if first:
            first = False
            if _looks_binary(raw[:_SNIFF_BYTES]):
                counters.skip("binary_file", uri)
                return
        location = f"{uri}:{index + 1}"
        if not raw.strip():
            continue
        counters.add("records")
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


def _read_text(f: IO[bytes], uri: str, cfg: InputConfig, counters: Counters) -> Iterator[Document]:
    data = f.read()
    if _looks_binary(data[:_SNIFF_BYTES]):
        counters.skip("binary_file", uri)
        return
    chunks = [data] if cfg.text_document == "file" else _PARAGRAPH_BREAK.split(data)
    for index, chunk in enumerate(chunks):
        location = f"{uri}#{index}"
        if cfg.text_document == "paragraph" and not chunk.strip():
            continue
        counters.add("records")
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            counters.skip("invalid_utf8", f"{location} (byte {exc.start})")
            continue
        doc = _document(text, None, index, uri, location, cfg, counters)
        if doc is not None:
            yield doc


def _read_parquet(
    fs: Any, path: str, uri: str, cfg: InputConfig, counters: Counters
) -> Iterator[Document]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            counters.skip(
                "missing_text_field", f"{uri}: no column {cfg.text_field!r} (has {names})"
            )
            return
        columns = [cfg.text_field]
        if cfg.id_field is not None and cfg.id_field in names and cfg.id_field != cfg.text_field:
            columns.append(cfg.id_field)
        index = 0
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for text, ident in zip(texts, ids, strict=True):
                counters.add("records")
                location = f"{uri}#{index}"
                record = {cfg.id_field: ident} if cfg.id_field is not None else None
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        counters.skip("invalid_utf8", location)
                        index += 1
                        continue
                doc = _document(text, record, index, uri, location, cfg, counters)
                if doc is not None:
                    yield doc
                index += 1
