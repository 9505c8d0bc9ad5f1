"""Deduplication across an output and every night: which copy of a document survives.

Two passes over a run's work units, with one decision on the driver between them:

1. **Fingerprints** (``fingerprint_unit``, a Ray Data stage like processing): each unit reads
   and normalises its documents (the same ``pipeline.steps`` as processing, so the same
   ordinals) and stages each document's exact fingerprint and, for ``--dedup near``, its
   MinHash LSH band keys.
2. **Decision** (``Deduplicator.resolve``, on the driver): the night's keys are looked up in
   the output's committed index (``pipeline.dedup_index``: only the row groups they fall in),
   then the night's documents are taken in a fixed order, by input URI, piece and position: a
   document is a copy if its exact fingerprint, or (near) any band key, matches a document of
   the output or one kept earlier in that order. So the survivor never depends on the number
   of workers or on timing, and a copy of a copy that was itself dropped is judged against
   what was kept. The kept documents' keys are the run's index delta.
3. **Processing** (``pipeline.unit.process_unit``) skips each unit's copies, counted as
   ``duplicate_exact`` / ``duplicate_near`` with their location and their original's input.

Because every document of both splits is judged against every earlier one, a copy can never
sit in held-out while another copy is in train. Two overlapping runs: the run that loses the
commit race decides again against the winner's index (``pipeline.preprocess._commit``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DedupConfig, StorageConfig
from pipeline.counters import Counters
from pipeline.dedup_index import BAND, EXACT, Keys, LookupStats, lookup
from pipeline.manifest import Manifest
from pipeline.pieces import WorkUnit, unit_key
from pipeline.steps import Drop, normalised, read
from pipeline.storage import filesystem_for, join, storage_errors
from pipeline.unit import heldout_hash

BAND_BATCH = 256
"""Documents whose band keys are computed in one batch (NumPy and rensa calls per batch)."""
FP_DIR = "_fingerprints"
"""Where the fingerprint pass stages its tables, inside the run's staging folder."""

__all__ = ["Deduplicator", "Resolution", "fingerprint_unit"]


def fingerprint_unit(u: WorkUnit, ctx: Any, drop: Any = None) -> dict[str, Any]:
    """Pass 1 over a unit: stage its documents' fingerprints; returns where, and how many.

    ``ctx`` is the run's ``pipeline.unit.UnitContext``. Bad records are counted by pass 2,
    which reads the same documents (this pass's counters only feed the progress log)."""
    from pipeline.fingerprints import Fingerprinter

    fp = Fingerprinter.from_config(ctx.dedup)
    counters = Counters()
    ordinals, his, los, doc_ids, heldout = [], [], [], [], []
    seed, fraction = ctx.packing.seed, ctx.packing.heldout_fraction
    bands: list[np.ndarray] = []
    texts: list[str] = []
    for doc in normalised(read(u, ctx.input, ctx.storage, counters)):
        if not doc.paragraphs:
            continue  # empty: pass 2 skips it as empty_document; nothing to be a copy of
        hi, lo = fp.exact(doc.paragraphs)
        ordinals.append(doc.ordinal)
        his.append(hi)
        los.append(lo)
        doc_ids.append(doc.doc_id)
        heldout.append(heldout_hash(doc.doc_id, seed) < fraction)
        if fp.near:
            texts.append("\n".join(doc.paragraphs))
            if len(texts) == BAND_BATCH:
                bands += fp.band_keys(texts)
                texts = []
    if texts:
        bands += fp.band_keys(texts)
    counters.add("documents", len(ordinals))
    flat = np.concatenate(bands) if bands else np.zeros(0, np.uint64)
    offsets = np.cumsum([0] + [len(b) for b in bands], dtype=np.int32)
    table = pa.table(
        {
            "ordinal": pa.array(ordinals, pa.int32()),
            "hi": pa.array(his, pa.uint64()),
            "lo": pa.array(los, pa.uint64()),
            "doc_id": pa.array(doc_ids, pa.string()),
            "heldout": pa.array(heldout, pa.bool_()),
            "bands": pa.ListArray.from_arrays(
                pa.array(offsets if fp.near else np.zeros(len(ordinals) + 1, np.int32)),
                pa.array(flat, pa.uint64()),
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fs, staging = filesystem_for(ctx.staging_uri, ctx.storage)
    rel = f"{FP_DIR}/{u.key}.parquet"
    with storage_errors(ctx.staging_uri, "stage fingerprints in"):
        fs.makedirs(join(staging, FP_DIR), exist_ok=True)
        fs.pipe_file(join(staging, rel), buf.getvalue())
    return {
        "uri": u.file.uri,
        "piece": u.piece,
        "key": u.key,
        "unit": unit_key(u.file),
        "fingerprints": rel,
        "stats": counters.to_dict(),
    }


@dataclass
class _UnitKeys:
    """A unit's staged fingerprints, as arrays (the driver holds a night of them: about 40
    bytes a document for exact, 150 for near, plus its id)."""

    key: str
    """The work unit's key (what its drop list is for)."""
    unit: str
    """Its input file's unit key (what the index records)."""
    uri: str
    ordinal: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    band_offsets: np.ndarray
    band_values: np.ndarray
    doc_id: list[str]
    heldout: np.ndarray
    """Whether each document is in the held-out split (``pipeline.unit.heldout_hash``)."""

    def rows(self) -> Iterator[tuple[int, int, int, list[int], bool, str]]:
        """(ordinal, hi, lo, band keys, held out, id) per document, as Python values."""
        flat = self.band_values.tolist()
        off = self.band_offsets.tolist()
        for i, (ordinal, hi, lo, held) in enumerate(
            zip(
                self.ordinal.tolist(),
                self.hi.tolist(),
                self.lo.tolist(),
                self.heldout.tolist(),
                strict=True,
            )
        ):
            yield ordinal, hi, lo, flat[off[i] : off[i + 1]], held, self.doc_id[i]


@dataclass
class Resolution:
    """The decision: what each unit drops, and the index rows of what the run keeps."""

    drops: dict[str, dict[int, Drop]]
    delta: Keys
    exact: int = 0
    near: int = 0
    kept: int = 0
    lookup: LookupStats = field(default_factory=LookupStats)

    def summary(self) -> dict[str, Any]:
        return {
            "documents_kept": self.kept,
            "duplicate_exact": self.exact,
            "duplicate_near": self.near,
            "index_rows_added": len(self.delta),
            "lookup": self.lookup.to_dict(),
        }


class Deduplicator:
    """The driver's side: a run's staged fingerprints, decided against an output's index."""

    def __init__(
        self, cfg: DedupConfig, records: list[dict[str, Any]], staging: str, storage: StorageConfig
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        fs, root = filesystem_for(staging, storage)
        self.units: list[_UnitKeys] = []
        with storage_errors(staging, "read the staged fingerprints of"):
            for r in sorted(records, key=lambda r: (r["uri"], r["piece"])):
                with fs.open(join(root, r["fingerprints"]), "rb") as f:
                    t = pq.read_table(f)
                bands = t.column("bands").combine_chunks()
                self.units.append(
                    _UnitKeys(
                        key=r["key"],
                        unit=r["unit"],
                        uri=r["uri"],
                        ordinal=t.column("ordinal").to_numpy(),
                        hi=t.column("hi").to_numpy(),
                        lo=t.column("lo").to_numpy(),
                        band_offsets=bands.offsets.to_numpy(),
                        band_values=bands.values.to_numpy(),
                        doc_id=t.column("doc_id").to_pylist(),
                        heldout=t.column("heldout").to_numpy(zero_copy_only=False),
                    )
                )

    def asked(self, keep: set[str] | None = None) -> np.ndarray:
        """Every key of the night (of the units in ``keep``, if given)."""
        parts = [
            np.concatenate([u.hi, u.band_values]).astype(np.uint64)
            for u in self.units
            if keep is None or u.key in keep
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def resolve(
        self,
        output: str,
        manifest: Manifest | None,
        live_units: set[str],
        keep: set[str] | None = None,
    ) -> Resolution:
        """Decide every document of the units in ``keep`` (default: all) against ``manifest``'s
        index (rows of inputs in ``live_units`` only) and against each other."""
        refs = manifest.dedup_index if manifest is not None else ()
        uris = {e.unit: e.uri for e in manifest.inputs} if manifest is not None else {}
        m = lookup(output, self.storage, refs, self.asked(keep), self.cfg.index_buckets, live_units)
        kept_exact: dict[tuple[int, int], str] = {}
        kept_band: dict[int, str] = {}
        res = Resolution(drops={}, delta=Keys.empty(), lookup=m.stats)
        rows: list[tuple[int, int, int, str]] = []
        for u in self.units:
            if keep is not None and u.key not in keep:
                continue
            drops: dict[int, Drop] = {}
            for ordinal, hi, lo, bands, _, _ in u.rows():
                e = (hi, lo)
                if e in m.exact:
                    drops[ordinal] = Drop("duplicate_exact", uris.get(m.exact[e], m.exact[e]))
                elif e in kept_exact:
                    drops[ordinal] = Drop("duplicate_exact", kept_exact[e])
                else:
                    hit = next((b for b in bands if b in m.band or b in kept_band), None)
                    if hit is not None:
                        orig = kept_band.get(hit) or uris.get(m.band[hit], m.band[hit])
                        drops[ordinal] = Drop("duplicate_near", orig)
                        continue
                    kept_exact[e] = u.uri
                    rows.append((hi, EXACT, lo, u.unit))
                    for b in bands:
                        kept_band[b] = u.uri
                        rows.append((b, BAND, 0, u.unit))
                    res.kept += 1
            res.exact += sum(d.reason == "duplicate_exact" for d in drops.values())
            res.near += sum(d.reason == "duplicate_near" for d in drops.values())
            if drops:
                res.drops[u.key] = drops
        if rows:
            key, kind, check, unit = zip(*rows, strict=True)
            res.delta = Keys(
                np.asarray(key, np.uint64),
                np.asarray(kind, np.uint8),
                np.asarray(check, np.uint64),
                np.asarray(unit, object),
            )
        return res
