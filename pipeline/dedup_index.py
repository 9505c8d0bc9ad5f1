"""The deduplication index: the fingerprints of every document in an output, by key range.

Layout: ``OUT/dedup/<run id>/b0017.parquet``, one file per run and key range ("bucket": the
top bits of the key), rows sorted by key in row groups of ``ROW_GROUP`` rows. The manifest
lists the files (``Manifest.dedup_index``), so the index is committed with the shards it
describes: a killed run's files are never listed, and a reader trusts only listed ones.

A night looks up only its own fingerprints: per listed file of a bucket it holds keys in, it
reads the footer and the row groups whose [min, max] key range holds one of them, never the
whole index, and never on one machine more than that night's keys. What it read is counted
(``LookupStats``), which is how ``benchmarks/dedup.py`` shows the reads follow the night's
documents, not the output's size.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.manifest import INDEX_DIR, IndexFileRef
from pipeline.storage import filesystem_for, join, storage_errors

EXACT, BAND = 0, 1
"""Kinds of key: a document's exact fingerprint (``check`` holds its other 64 bits), or one of
its LSH band keys."""
ROW_GROUP = 1024
SCHEMA = pa.schema(
    [("key", pa.uint64()), ("kind", pa.uint8()), ("check", pa.uint64()), ("unit", pa.string())]
)
LOOKUP_THREADS = 8


@dataclass
class Keys:
    """A set of fingerprint rows (parallel arrays)."""

    key: np.ndarray
    kind: np.ndarray
    check: np.ndarray
    unit: np.ndarray
    """The input (its unit key, ``pipeline.pieces.unit_key``) the document came from."""

    @classmethod
    def empty(cls) -> Keys:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint8),
            np.zeros(0, np.uint64),
            np.zeros(0, object),
        )

    def __len__(self) -> int:
        return len(self.key)

    def take(self, idx: np.ndarray) -> Keys:
        return Keys(self.key[idx], self.kind[idx], self.check[idx], self.unit[idx])


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """The key range of each key: its top log2(buckets) bits."""
    bits = buckets.bit_length() - 1
    if bits == 0:
        return np.zeros(len(keys), dtype=np.int64)
    return (keys >> np.uint64(64 - bits)).astype(np.int64)


def write_delta(
    staging: str,
    storage: StorageConfig | None,
    run_id: str,
    keys: Keys,
    buckets: int,
    bucket: int | None = None,
) -> list[tuple[str, int, int, str]]:
    """Write ``keys`` under ``staging`` as this run's index files, one per bucket holding any
    (all in ``bucket``, when given); returns (path relative to the output, bucket, rows,
    sha256) of each."""
    fs, root = filesystem_for(staging, storage)
    b = bucket_of(keys.key, buckets) if bucket is None else np.full(len(keys), bucket, np.int64)
    order = np.lexsort((keys.key, b))
    keys, b = keys.take(order), b[order]
    out = []
    edges = np.flatnonzero(np.diff(b)) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(b)], strict=True):
        if lo == hi:
            continue
        part = keys.take(np.arange(lo, hi))
        table = pa.table(
            [
                pa.array(part.key, pa.uint64()),
                pa.array(part.kind, pa.uint8()),
                pa.array(part.check, pa.uint64()),
                pa.array(part.unit.astype(str), pa.string()),
            ],
            schema=SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
        data = buf.getvalue()
        rel = f"{INDEX_DIR}/{run_id}/b{int(b[lo]):04d}.parquet"
        with storage_errors(staging, "write the deduplication index to"):
            fs.makedirs(join(root, f"{INDEX_DIR}/{run_id}"), exist_ok=True)
            fs.pipe_file(join(root, rel), data)
        out.append((rel, int(b[lo]), int(hi - lo), hashlib.sha256(data).hexdigest()))
    return out


def compact(
    output: str,
    staging: str,
    storage: StorageConfig | None,
    run_id: str,
    committed: Sequence[IndexFileRef],
    delta: list[tuple[str, int, int, str]],
    live_units: set[str],
    max_files: int,
) -> tuple[list[tuple[str, int, int, str]], set[str]]:
    """Merge each key range that would hold more than ``max_files`` files (the committed ones
    plus this run's ``delta``) into one file of this run: its live rows (those of inputs in
    ``live_units``; a replaced input's rows go), sorted by key. Returns this run's index files
    and the committed paths the merged files replace (they leave the next manifest; the files
    stay on disk for readers of the current one until ``sweep`` removes them a day later)."""
    fs_out, root = filesystem_for(output, storage)
    fs_st, st_root = filesystem_for(staging, storage)
    mine = {b: (rel, n, h) for rel, b, n, h in delta}
    by_bucket: dict[int, list[IndexFileRef]] = {}
    for ref in committed:
        by_bucket.setdefault(ref.bucket, []).append(ref)
    out = list(delta)
    replaced: set[str] = set()
    for bucket, refs in sorted(by_bucket.items()):
        if len(refs) + (bucket in mine) <= max_files:
            continue
        tables = []
        with storage_errors(output, "merge the deduplication index of"):
            for ref in refs:
                with fs_out.open(join(root, ref.path), "rb") as f:
                    tables.append(pq.read_table(f))
            if bucket in mine:
                with fs_st.open(join(st_root, mine[bucket][0]), "rb") as f:
                    tables.append(pq.read_table(f))
        merged = pa.concat_tables(tables)
        live = np.isin(merged.column("unit").to_numpy(zero_copy_only=False), list(live_units))
        merged = merged.filter(pa.array(live))
        keys = Keys(
            merged.column("key").to_numpy(),
            merged.column("kind").to_numpy(),
            merged.column("check").to_numpy(),
            merged.column("unit").to_numpy(zero_copy_only=False),
        )
        out = [f for f in out if f[1] != bucket]
        out += write_delta(staging, storage, run_id, keys, 1, bucket=bucket)
        replaced.update(ref.path for ref in refs)
    return out, replaced


@dataclass
class LookupStats:
    """What a lookup read: the proof that a night's reads follow its own keys."""

    keys_asked: int = 0
    files: int = 0
    row_groups_read: int = 0
    row_groups_total: int = 0
    rows_read: int = 0
    index_rows: int = 0
    seconds: float = 0.0
    matches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class Matches:
    """Committed fingerprints that a night's keys met: exact (hi, lo) and band keys, each with
    the input its document came from."""

    exact: dict[tuple[int, int], str] = field(default_factory=dict)
    band: dict[int, str] = field(default_factory=dict)
    stats: LookupStats = field(default_factory=LookupStats)


def lookup(
    output: str,
    storage: StorageConfig | None,
    refs: Sequence[IndexFileRef],
    asked: np.ndarray,
    buckets: int,
    live_units: set[str],
) -> Matches:
    """The committed index rows whose key is in ``asked`` (uint64), of inputs still in the
    output (``live_units``: rows of a replaced input are stale and ignored)."""
    t0 = time.perf_counter()
    matches = Matches()
    st = matches.stats
    asked = np.unique(asked.astype(np.uint64))
    st.keys_asked = len(asked)
    if not len(asked) or not refs:
        return matches
    ab = bucket_of(asked, buckets)
    per_bucket = {int(k): asked[ab == k] for k in np.unique(ab)}
    todo = [r for r in refs if r.bucket in per_bucket]
    st.files = len(todo)
    st.index_rows = sum(r.rows for r in refs)
    fs, root = filesystem_for(output, storage)

    def one(ref: IndexFileRef) -> tuple[pa.Table | None, int, int, int]:
        want = per_bucket[ref.bucket]
        with fs.open(join(root, ref.path), "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            groups = []
            for g in range(md.num_row_groups):
                stt = md.row_group(g).column(0).statistics
                lo, hi = np.uint64(stt.min), np.uint64(stt.max)
                i = np.searchsorted(want, lo)
                if i < len(want) and want[i] <= hi:
                    groups.append(g)
            table = pf.read_row_groups(groups) if groups else None
        rows = table.num_rows if table is not None else 0
        if table is not None:
            keys = table.column("key").to_numpy()
            table = table.filter(pa.array(np.isin(keys, want)))
        return table, len(groups), md.num_row_groups, rows

    with (
        storage_errors(output, "read the deduplication index of"),
        ThreadPoolExecutor(LOOKUP_THREADS) as pool,
    ):
        results = list(pool.map(one, todo))
    for table, read, total, rows in results:
        st.row_groups_read += read
        st.row_groups_total += total
        st.rows_read += rows
        if table is None:
            continue
        for key, kind, check, unit in zip(
            table.column("key").to_pylist(),
            table.column("kind").to_pylist(),
            table.column("check").to_pylist(),
            table.column("unit").to_pylist(),
            strict=True,
        ):
            if unit not in live_units:
                continue
            if kind == EXACT:
                matches.exact.setdefault((key, check), unit)
            else:
                matches.band.setdefault(key, unit)
    st.matches = len(matches.exact) + len(matches.band)
    st.seconds = time.perf_counter() - t0
    return matches


STALE_S = 24 * 3600
"""An index file no manifest lists is removed once its run is this old: a merge's inputs stay
a day for the runs that planned against the manifest before it (``compact``), and a killed
run's files are removed by the run itself (``pipeline.preprocess._commit``)."""


def sweep(output: str, storage: StorageConfig | None, listed: set[str], now: float) -> list[str]:
    """Remove the index files no manifest lists of runs older than ``STALE_S`` (their run
    id starts with its UTC start time); returns what was removed."""
    import datetime as dt

    fs, root = filesystem_for(output, storage)
    base = join(root, INDEX_DIR)
    removed = []
    with storage_errors(output, "sweep the deduplication index of"):
        runs = fs.ls(base, detail=False) if fs.exists(base) else []
        for run in runs:
            name = run.rstrip("/").rsplit("/", 1)[-1]
            try:
                started = dt.datetime.strptime(name.split("-", 1)[0], "%Y%m%dT%H%M%SZ")
            except ValueError:
                continue
            if now - started.replace(tzinfo=dt.UTC).timestamp() <= STALE_S:
                continue
            for path in fs.ls(run, detail=False):
                rel = f"{INDEX_DIR}/{name}/{path.rstrip('/').rsplit('/', 1)[-1]}"
                if rel not in listed:
                    fs.rm(path)
                    removed.append(rel)
    return removed
