"""Tokenize and pack stages: sentences -> token pieces of at most M -> blocks of exactly S sentences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from pipeline.counters import Counters

BLOCK_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("sentence_lengths", pa.list_(pa.int32())),
        pa.field("document_index", pa.list_(pa.int32())),
        pa.field("num_bytes", pa.int64()),
        pa.field("num_words", pa.int64()),
        pa.field("document_ids", pa.list_(pa.string())),
        pa.field("first_sentence_offset", pa.int32()),
    ],
    metadata={
        b"description": (
            b"One row = one block of S sentences. document_index is per sentence and block-local; "
            b"document_ids[k] names block-local document k; first_sentence_offset is the index, "
            b"within its document, of the block's first sentence (> 0: the document continues "
            b"from the previous block)."
        )
    },
)


@dataclass
class TokenizedDocument:
    doc_id: str
    pieces: list[np.ndarray]
    """Token ids of each sentence piece (int32), each ending with EOS-S."""
    piece_bytes: list[int]
    piece_words: list[int]


def _spread(total: int, weights: list[int]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` that sum exactly to ``total``."""
    cum = np.cumsum(weights)
    bounds = (cum * total) // cum[-1]
    return np.diff(bounds, prepend=0).astype(int).tolist()


def tokenize_documents(
    docs: list[tuple[str, list[str]]],
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    eod_id: int,
    max_sentence_tokens: int,
    counters: Counters,
) -> list[TokenizedDocument]:
    """Tokenize each sentence alone; end every piece with EOS-S and each document with EOD, EOS-S.

    A sentence longer than M tokens (EOS-S included) is split into pieces of at most M tokens,
    never truncated.
    """
    flat = [s for _, sentences in docs for s in sentences]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
    out: list[TokenizedDocument] = []
    budget = max_sentence_tokens - 1
    eos = np.array([eos_id], dtype=np.int32)
    i = 0
    for doc_id, sentences in docs:
        doc = TokenizedDocument(doc_id, [], [], [])
        for k, sentence in enumerate(sentences):
            ids = np.asarray(encodings[i].ids, dtype=np.int32)
            i += 1
            if k == len(sentences) - 1:
                ids = np.append(ids, np.int32(eod_id))
            chunks = [ids[j : j + budget] for j in range(0, len(ids), budget)] or [ids]
            if len(chunks) > 1:
                counters.add("sentences_split", 1)
                counters.add("sentence_pieces_added", len(chunks) - 1)
            weights = [max(len(c), 1) for c in chunks]
            doc.pieces.extend(np.concatenate([c, eos]) for c in chunks)
            doc.piece_bytes.extend(_spread(len(sentence.encode("utf-8")), weights))
            doc.piece_words.extend(_spread(len(sentence.split()), weights))
        out.append(doc)
    return out


@dataclass
class BlockPacker:
    """Packs documents back to back into blocks of exactly S sentences (streaming fold)."""

    sentences_per_block: int
    _pieces: list[np.ndarray] = field(default_factory=list)
    _doc_index: list[int] = field(default_factory=list)
    _doc_ids: list[str] = field(default_factory=list)
    _bytes: int = 0
    _words: int = 0
    _first_offset: int = 0

    def add(self, doc: TokenizedDocument) -> list[dict[str, Any]]:
        blocks = []
        offset = 0
        n = len(doc.pieces)
        while offset < n:
            if not self._pieces:
                self._first_offset = offset
            take = min(n - offset, self.sentences_per_block - len(self._pieces))
            local = len(self._doc_ids)
            self._doc_ids.append(doc.doc_id)
            self._pieces.extend(doc.pieces[offset : offset + take])
            self._doc_index.extend([local] * take)
            self._bytes += sum(doc.piece_bytes[offset : offset + take])
            self._words += sum(doc.piece_words[offset : offset + take])
            offset += take
            if len(self._pieces) == self.sentences_per_block:
                blocks.append(self._emit())
        return blocks

    def flush(self) -> list[dict[str, Any]]:
        return [self._emit()] if self._pieces else []

    def _emit(self) -> dict[str, Any]:
        row = {
            "input_ids": np.concatenate(self._pieces),
            "sentence_lengths": np.array([len(p) for p in self._pieces], dtype=np.int32),
            "document_index": np.array(self._doc_index, dtype=np.int32),
            "num_bytes": self._bytes,
            "num_words": self._words,
            "document_ids": self._doc_ids,
            "first_sentence_offset": self._first_offset,
        }
        self._pieces, self._doc_index, self._doc_ids = [], [], []
        self._bytes = self._words = 0
        return row


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {name: [r[name] for r in rows] for name in BLOCK_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=BLOCK_SCHEMA)
