"""One work unit (a file, or a piece of one) through every step: the chain of
``pipeline.steps`` (read -> normalise -> drop duplicates -> split), then tokenize -> pack.

This is the function Ray runs; it knows nothing of Ray. Its shards are written to a staging
prefix under deterministic names; the driver commits them with the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipeline.blocks import BLOCK_SCHEMA
from pipeline.config import (
    DedupConfig,
    InputConfig,
    PackingConfig,
    PreprocessConfig,
    StorageConfig,
)
from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder
from pipeline.manifest import SPLITS
from pipeline.packing import BlockPacker, Blocks, tokenize_batch
from pipeline.pieces import WorkUnit, unit_key
from pipeline.scratch import sweep_once, unit_scratch
from pipeline.steps import Drop, normalised, read, sentences, without_duplicates
from pipeline.storage import filesystem_for, join, protocol_of, storage_errors
from pipeline.tokenizer import LoadedTokenizer

DOC_BATCH = 256
DOC_BATCH_BYTES = 4 << 20
"""A batch is tokenized once it holds DOC_BATCH documents or this many bytes of text, so that
its memory (tokenizer encodings cost tens of bytes per input byte) does not grow with the
documents' size: at most this plus one document of up to input.max_record_bytes."""
__all__ = ["DOC_BATCH", "UnitContext", "heldout_hash", "process_unit", "shard_stem", "unit_key"]


def heldout_hash(doc_id: str, seed: int) -> float:
    """Seeded hash of a document id in [0, 1): the split never depends on order or workers."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


@dataclass
class UnitContext:
    """Everything a worker needs, passed explicitly (never via module globals)."""

    input: InputConfig
    packing: PackingConfig
    storage: StorageConfig
    tokenizer_json: str
    special_ids: dict[str, int]
    staging_uri: str
    strict: bool = False
    dedup: DedupConfig = field(default_factory=DedupConfig)

    @classmethod
    def for_run(cls, cfg: PreprocessConfig, tok: LoadedTokenizer, staging_uri: str) -> UnitContext:
        """The context of a run of ``cfg`` with tokenizer ``tok``, staging into ``staging_uri``."""
        return cls(
            input=cfg.input,
            packing=cfg.packing,
            storage=cfg.storage,
            tokenizer_json=tok.json,
            special_ids=tok.special_ids,
            staging_uri=staging_uri,
            strict=cfg.strict,
            dedup=cfg.dedup,
        )


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_json: str, eos_id: int, eod_id: int) -> SentenceEncoder:
    return SentenceEncoder(Tokenizer.from_str(tokenizer_json), eos_id=eos_id, eod_id=eod_id)


@dataclass
class _ShardWriter:
    """One split's shard: blocks as they are packed, in row groups of ``row_group_blocks``."""

    split: str
    path: str
    row_group_blocks: int
    counters: Counters
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    doc_ids: set[str] = field(default_factory=set)
    stats: dict[str, int] = field(
        default_factory=lambda: dict(rows=0, sentences=0, tokens=0, bytes=0, words=0)
    )

    def write(self, blocks: Blocks) -> None:
        if not len(blocks):
            return
        self.stats["rows"] += len(blocks)
        self.stats["sentences"] += len(blocks.sentence_lengths)
        self.stats["tokens"] += len(blocks.input_ids)
        self.stats["bytes"] += int(blocks.num_bytes.sum())
        self.stats["words"] += int(blocks.num_words.sum())
        self.doc_ids.update(blocks.document_ids)
        self.counters.add_sentence_lengths(blocks.sentence_lengths)
        self.pending.append(blocks.table())
        self.pending_rows += len(blocks)
        if self.pending_rows >= self.row_group_blocks:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write the pending blocks' whole row groups (and, when ``final``, the rest)."""
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        n = (
            table.num_rows
            if final
            else table.num_rows // self.row_group_blocks * self.row_group_blocks
        )
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, BLOCK_SCHEMA, compression="zstd")
        self.writer.write_table(table.slice(0, n), row_group_size=self.row_group_blocks)
        rest = table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> dict[str, Any] | None:
        self._flush(final=True)
        if self.writer is None:
            return None
        self.writer.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {**self.stats, "documents": len(self.doc_ids), "sha256": digest.hexdigest()}


def shard_stem(key: str, drop: Mapping[int, Drop]) -> str:
    """A unit's shard name: its key, plus a digest of the documents it drops as copies.

    Which copies a unit drops depends on what else its run and the output hold, so two runs
    can make different shards of one file; the digest keeps "same name, same bytes", which
    the commit of two overlapping runs relies on (``pipeline.preprocess._commit``)."""
    if not drop:
        return key
    digest = hashlib.sha256(",".join(map(str, sorted(drop))).encode()).hexdigest()[:10]
    return f"{key}-x{digest}"


def process_unit(
    u: WorkUnit, ctx: UnitContext, drop: Mapping[int, Drop] | None = None
) -> dict[str, Any]:
    """Run all steps over one work unit, skipping the documents of ``drop`` (ordinal -> why,
    decided by deduplication); upload its shards to staging; return its record."""
    f = u.file
    key = u.key
    drop = drop or {}
    counters = Counters(strict=ctx.strict)
    encoder = _encoder(
        ctx.tokenizer_json,
        ctx.special_ids["end_of_sentence"],
        ctx.special_ids["end_of_document"],
    )
    S = ctx.packing.sentences_per_block
    packers = {s: BlockPacker(S) for s in SPLITS}
    out_fs, staging = filesystem_for(ctx.staging_uri, ctx.storage)
    shards: list[dict[str, Any]] = []
    sweep_once()  # scratch left by killed processes on this host
    with unit_scratch() as tmp:
        writers = {
            s: _ShardWriter(
                s, os.path.join(tmp, f"{s}.parquet"), ctx.packing.row_group_blocks, counters
            )
            for s in SPLITS
        }
        batch: list[tuple[str, list[str]]] = []
        batch_bytes = 0

        def run_batch() -> None:
            nonlocal batch_bytes
            tokenized = tokenize_batch(
                batch,
                encoder,
                max_sentence_tokens=ctx.packing.max_sentence_tokens,
                counters=counters,
            )
            heldout = np.array(
                [
                    heldout_hash(doc_id, ctx.packing.seed) < ctx.packing.heldout_fraction
                    for doc_id in tokenized.doc_ids
                ],
                dtype=bool,
            )
            for n_pieces in tokenized.doc_pieces.tolist():
                counters.add_document_sentences(n_pieces)
            for split, keep in (("train", ~heldout), ("heldout", heldout)):
                n_docs = int(keep.sum())
                if n_docs:
                    counters.add(f"documents_{split}", n_docs)
                    writers[split].write(packers[split].add(tokenized.select(keep)))
            batch.clear()
            batch_bytes = 0

        docs = read(u, ctx.input, ctx.storage, counters)
        docs = sentences(without_duplicates(normalised(docs), drop, counters), counters)
        for doc in docs:  # (storage faults of the input are named by ``steps.read``)
            batch.append((doc.doc_id, doc.sentences))
            batch_bytes += doc.n_bytes
            if len(batch) >= DOC_BATCH or batch_bytes >= DOC_BATCH_BYTES:
                run_batch()
        if batch:
            run_batch()
        for s in SPLITS:
            writers[s].write(packers[s].flush())
            info = writers[s].close()
            if info is None:
                continue
            rel = f"{s}/{shard_stem(key, drop)}.parquet"
            counters.add("blocks", info["rows"])
            counters.add("sentence_pieces", info["sentences"])
            counters.add("tokens", info["tokens"])
            counters.add("bytes", info["bytes"])
            counters.add("words", info["words"])
            target = join(staging, rel)
            with storage_errors(ctx.staging_uri, "write shards to"):
                if protocol_of(ctx.staging_uri) == "file":
                    # (Object stores have no directories; there it would only probe the bucket.)
                    out_fs.makedirs(join(staging, s), exist_ok=True)
                out_fs.put_file(writers[s].path, target)
            shards.append({"split": s, "path": rel, **info})
    return {
        "uri": f.uri,
        "size": f.size,
        "fingerprint": f.fingerprint,
        "unit": unit_key(f),
        "key": key,
        "piece": u.piece,
        "pieces": u.pieces,
        "dropped": len(drop),
        "shards": shards,
        "stats": counters.to_dict(),
    }
