"""One work unit (a file, or a piece of one) through every stage: read -> normalise -> split ->
tokenize -> pack.

This is the function Ray runs; it knows nothing of Ray. Its shards are written to a staging
prefix under deterministic names; the driver commits them with the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipeline.blocks import BLOCK_SCHEMA
from pipeline.config import InputConfig, PackingConfig, PreprocessConfig, StorageConfig
from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder
from pipeline.manifest import SPLITS
from pipeline.packing import BlockPacker, Blocks, tokenize_batch
from pipeline.pieces import WorkUnit, unit_key
from pipeline.readers import read_documents
from pipeline.scratch import sweep_once, unit_scratch
from pipeline.storage import filesystem_for, join, protocol_of, storage_errors
from pipeline.text import normalise, split_sentences
from pipeline.tokenizer import LoadedTokenizer

DOC_BATCH = 256
DOC_BATCH_BYTES = 4 << 20
"""A batch is tokenized once it holds DOC_BATCH documents or this many bytes of text, so that
its memory (tokenizer encodings cost tens of bytes per input byte) does not grow with the
documents' size: at most this plus one document of up to input.max_record_bytes."""
__all__ = ["DOC_BATCH", "UnitContext", "heldout_hash", "process_unit", "unit_key"]


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


def process_unit(u: WorkUnit, ctx: UnitContext) -> dict[str, Any]:
    """Run all stages over one work unit; upload its shards to staging; return its record."""
    f = u.file
    key = u.key
    counters = Counters(strict=ctx.strict)
    encoder = _encoder(
        ctx.tokenizer_json,
        ctx.special_ids["end_of_sentence"],
        ctx.special_ids["end_of_document"],
    )
    S = ctx.packing.sentences_per_block
    packers = {s: BlockPacker(S) for s in SPLITS}
    in_fs, in_path = filesystem_for(f.uri, ctx.storage)
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

        with storage_errors(f.uri, "read"):
            for doc in read_documents(in_fs, in_path, f.uri, ctx.input, counters, u.span):
                paragraphs = normalise(doc.text)
                sentences = split_sentences(paragraphs)
                if not sentences:
                    counters.skip("empty_document", doc.location)
                    continue
                counters.add("documents")
                counters.add("sentences", len(sentences))
                n_bytes = len(doc.text.encode("utf-8"))
                counters.add("source_bytes", n_bytes)
                batch.append((doc.doc_id, sentences))
                batch_bytes += n_bytes
                if len(batch) >= DOC_BATCH or batch_bytes >= DOC_BATCH_BYTES:
                    run_batch()
            if batch:
                run_batch()
        for s in SPLITS:
            writers[s].write(packers[s].flush())
            info = writers[s].close()
            if info is None:
                continue
            rel = f"{s}/{key}.parquet"
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
        "shards": shards,
        "stats": counters.to_dict(),
    }
