"""Work units: whole files, or the pieces of a large file that the cluster shares.

A work unit used to be a whole input file, so one 20 GB file kept one core busy however large
the cluster. A file larger than ``input.split_bytes`` is now cut where its format allows it:

- **Parquet** by row groups (consecutive groups of about ``split_bytes`` compressed bytes; the
  footer gives each group's row count, so every piece knows its first row's index);
- **uncompressed JSONL** by byte ranges that end right after a line end;
- **uncompressed text, one document per paragraph** by byte ranges that end before a blank
  line, so no paragraph is ever cut;
- compressed streams and text read as one document per file stay whole.

Cut points depend only on the file and ``split_bytes`` (never on the number of workers), so a
piece's shard names are as deterministic as a whole file's. Document ids and error locations
are the file-wide ones (``uri#record``): a piece starts counting where the pieces before it
stopped, which a parallel counting pass over the pieces gives (:func:`count_pieces`).
Blocks never span pieces, so a split file's blocks hold the same sentences of the same
documents as the file read whole; only where blocks and shards end differs (each piece's last
block of a split may hold fewer than S sentences, as a file's last block always could).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import InputConfig, StorageConfig
from pipeline.readers import WHOLE, Span, count_records, detect, open_span, sniff_compression
from pipeline.storage import InputFile, filesystem_for, storage_errors

ALIGN_READ = 1 << 16
"""Bytes read at a time while looking for a cut point."""
BLANK_LINE_MAX = 4096
"""A blank line longer than this (spaces and tabs) is not used as a cut point."""


_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def unit_key(f: InputFile) -> str:
    """Deterministic shard stem of a file: readable file name + hash of (uri, fingerprint)."""
    base = f.uri.rstrip("/").rsplit("/", 1)[-1]
    base = _SLUG.sub("_", base.split(".", 1)[0])[:40] or "input"
    digest = hashlib.sha256(f"{f.uri}|{f.fingerprint}".encode()).hexdigest()[:12]
    return f"{base}-{digest}"


@dataclass(frozen=True)
class WorkUnit:
    """One file, or one piece of one; the unit a task processes and names its shards after."""

    file: InputFile
    span: Span = WHOLE
    piece: int = 0
    pieces: int = 1

    @property
    def key(self) -> str:
        """Shard stem: the file's key, plus the piece number when the file is split."""
        base = unit_key(self.file)
        return base if self.pieces == 1 else f"{base}-{self.piece:05d}"

    @property
    def size(self) -> int:
        """Bytes of input (about, for Parquet pieces): what the scheduler balances."""
        if self.pieces == 1:
            return self.file.size
        if detect(self.file.uri) == "parquet":  # spans of row groups, not bytes
            return self.file.size // self.pieces
        end = self.file.size if self.span.end is None else self.span.end
        return end - self.span.start

    def to_dict(self) -> dict[str, Any]:
        f, s = self.file, self.span
        return {
            "uri": f.uri,
            "size": f.size,
            "fingerprint": f.fingerprint,
            "span": [s.start, s.end, s.first_record],
            "piece": self.piece,
            "pieces": self.pieces,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkUnit:
        start, end, first = d["span"]
        return cls(
            InputFile(d["uri"], d["size"], d["fingerprint"]),
            Span(start, end, first),
            d["piece"],
            d["pieces"],
        )


Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]
"""Runs a function over argument tuples and returns the results in order (Ray tasks, or a
plain loop)."""


def split_kind(f: InputFile, cfg: InputConfig) -> str | None:
    """How this file may be cut ("parquet", "jsonl", "paragraph"), or None: keep it whole."""
    if cfg.split_bytes <= 0 or f.size <= cfg.split_bytes:
        return None
    fmt = detect(f.uri, cfg.format)
    if fmt == "parquet":
        return "parquet"
    if fmt == "jsonl":
        return "jsonl"
    if fmt == "text" and cfg.text_document == "paragraph":
        return "paragraph"
    return None


def plan_units(
    files: list[InputFile], cfg: InputConfig, storage: StorageConfig, run: Mapper
) -> list[WorkUnit]:
    """Every file as one unit, or cut into pieces (see the module docstring), in file order.

    Cut points are found by short reads in this process (threads: they wait on storage); the
    records before each piece are counted by ``run`` (a CPU-bound pass over the text, which
    Ray spreads over the cluster).
    """
    kinds = {f.uri: split_kind(f, cfg) for f in files}
    to_split = [f for f in files if kinds[f.uri] is not None]
    plans: dict[str, list[WorkUnit]] = {}
    if to_split:
        with ThreadPoolExecutor(max_workers=min(16, len(to_split))) as pool:
            cuts = list(pool.map(lambda f: _cuts(f, kinds[f.uri], cfg, storage), to_split))
        plans = _number_records(to_split, cuts, kinds, cfg, storage, run)
    out: list[WorkUnit] = []
    for f in files:
        out.extend(plans.get(f.uri) or [WorkUnit(f)])
    return out


def _cuts(
    f: InputFile, kind: str | None, cfg: InputConfig, storage: StorageConfig
) -> list[Span] | None:
    """The spans of one file (their first_record still 0), or None to keep it whole."""
    fs, path = filesystem_for(f.uri, storage)
    with storage_errors(f.uri, "read"), fs.open(path, "rb") as fh:
        if kind == "parquet":
            return _row_group_spans(fh, cfg.split_bytes)
        if sniff_compression(fh.read(16)) is not None:
            return None
        pattern = _JSONL_CUT if kind == "jsonl" else _blank_line_cut(cfg.max_record_bytes)
        starts = [0]
        for k in range(1, -(-f.size // cfg.split_bytes)):
            cut = _cut_after(fh, pattern, k * cfg.split_bytes, (k + 1) * cfg.split_bytes)
            if cut is not None and cut < f.size:
                starts.append(cut)
    if len(starts) == 1:
        return None
    ends: list[int | None] = [*starts[1:], None]
    return [Span(s, e) for s, e in zip(starts, ends, strict=True)]


_JSONL_CUT = re.compile(rb"\n")


def _blank_line_cut(max_record_bytes: int) -> re.Pattern[bytes]:
    # A line end, then a line of spaces and tabs that the reader sees as blank (one no longer
    # than input.max_record_bytes: a longer one is an overlong line to it, not a separator).
    n = min(BLANK_LINE_MAX, max_record_bytes)
    return re.compile(rb"\n[ \t]{0,%d}[\r\n]" % n)


def _cut_after(fh: Any, pattern: re.Pattern[bytes], lo: int, hi: int) -> int | None:
    """The first cut point in ``[lo, hi)``: the byte after the newline that ``pattern``
    matches from; None when there is none (the piece merges into the one before it)."""
    pos = lo - 1  # the file offset of buf[0]
    fh.seek(pos)
    buf = b""
    while True:
        more = fh.read(ALIGN_READ)
        buf += more
        m = pattern.search(buf)
        if m is not None:
            cut = pos + m.start() + 1
            return cut if cut < hi else None
        if not more or pos + len(buf) >= hi + BLANK_LINE_MAX + 2:
            return None
        # Keep only the tail that a match could still start in: from the last newline on.
        last = buf.rfind(b"\n")
        keep = last if last >= 0 else len(buf)
        pos, buf = pos + keep, buf[keep:]


def _row_group_spans(fh: Any, target: int) -> list[Span] | None:
    meta = pq.ParquetFile(fh).metadata
    spans: list[Span] = []
    start, size, rows, first = 0, 0, 0, 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if size and size + _compressed(rg) > target:
            spans.append(Span(start, i, first))
            start, size, first = i, 0, rows
        size += _compressed(rg)
        rows += rg.num_rows
    if not spans:
        return None
    spans.append(Span(start, None, first))
    return spans


def _compressed(rg: Any) -> int:
    return sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))


def count_piece(uri: str, kind: str, span: Span, cfg: InputConfig, storage: StorageConfig) -> int:
    """Record indexes used by one byte span (a task of the counting pass)."""
    fs, path = filesystem_for(uri, storage)
    with storage_errors(uri, "read"), fs.open(path, "rb") as fh:
        return count_records(open_span(fh, span), kind, cfg)


def _number_records(
    files: list[InputFile],
    cuts: list[list[Span] | None],
    kinds: dict[str, str | None],
    cfg: InputConfig,
    storage: StorageConfig,
    run: Mapper,
) -> dict[str, list[WorkUnit]]:
    """Give every byte span the file-wide index of its first record."""
    jobs = [
        (f.uri, kinds[f.uri], span, cfg, storage)
        for f, spans in zip(files, cuts, strict=True)
        if spans is not None and kinds[f.uri] != "parquet"
        for span in spans[:-1]  # the last piece's count is never needed
    ]
    counts = iter(run(count_piece, jobs) if jobs else [])
    plans: dict[str, list[WorkUnit]] = {}
    for f, spans in zip(files, cuts, strict=True):
        if spans is None:
            continue
        if kinds[f.uri] != "parquet":
            numbered, first = [], 0
            for span in spans:
                numbered.append(Span(span.start, span.end, first))
                if span.end is not None:
                    first += next(counts)
            spans = numbered
        plans[f.uri] = [WorkUnit(f, s, i, len(spans)) for i, s in enumerate(spans)]
    return plans


def local_map(fn: Callable[..., Any], args: Iterable[tuple[Any, ...]]) -> list[Any]:
    """The :data:`Mapper` without a cluster."""
    return [fn(*a) for a in args]
