"""Tokenize and pack stages: sentences -> token pieces of at most M -> blocks of exactly S sentences."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from pipeline.blocks import BLOCK_SCHEMA, LIST_COLUMNS
from pipeline.counters import Counters


@dataclass
class TokenizedDocument:
    doc_id: str
    pieces: list[list[int]]
    """Token ids of each sentence piece, each ending with EOS-S."""
    piece_bytes: list[int]
    piece_words: list[int]


def _spread(total: int, weights: list[int]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` that sum exactly to ``total``."""
    out, cum, prev, whole = [], 0, 0, sum(weights)
    for w in weights:
        cum += w
        bound = cum * total // whole
        out.append(bound - prev)
        prev = bound
    return out


def sentence_pieces(ids: list[int], max_sentence_tokens: int) -> list[list[int]]:
    """A sentence's token ids cut into pieces that, each with its EOS-S, hold at most M tokens.

    The one rule shared by the data pipeline and generation's prompt encoding.
    """
    budget = max_sentence_tokens - 1
    return [ids[j : j + budget] for j in range(0, len(ids), budget)] or [[]]


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
    never truncated. Plain lists, not arrays: sentences are ~20 tokens, where numpy's per-call
    overhead costs more than the work.
    """
    flat = [s for _, sentences in docs for s in sentences]
    # encode_batch_fast: the same ids without the character offsets, which nothing here uses
    # (benchmarks/preprocess.py times the floor with both calls).
    encodings = tokenizer.encode_batch_fast(flat, add_special_tokens=False) if flat else []
    out: list[TokenizedDocument] = []
    budget = max_sentence_tokens - 1
    i = 0
    for doc_id, sentences in docs:
        doc = TokenizedDocument(doc_id, [], [], [])
        last = len(sentences) - 1
        for k, sentence in enumerate(sentences):
            ids = encodings[i].ids
            i += 1
            if k == last:
                ids.append(eod_id)
            n_bytes, n_words = len(sentence.encode("utf-8")), len(sentence.split())
            if len(ids) <= budget:
                ids.append(eos_id)
                doc.pieces.append(ids)
                doc.piece_bytes.append(n_bytes)
                doc.piece_words.append(n_words)
                continue
            chunks = sentence_pieces(ids, max_sentence_tokens)
            counters.add("sentences_split", 1)
            counters.add("sentence_pieces_added", len(chunks) - 1)
            weights = [len(c) for c in chunks]
            for c in chunks:
                c.append(eos_id)
            doc.pieces.extend(chunks)
            doc.piece_bytes.extend(_spread(n_bytes, weights))
            doc.piece_words.extend(_spread(n_words, weights))
        out.append(doc)
    return out


@dataclass
class BlockPacker:
    """Packs documents back to back into blocks of exactly S sentences (streaming fold)."""

    sentences_per_block: int
    _pieces: list[list[int]] = field(default_factory=list)
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
            "input_ids": np.fromiter(
                itertools.chain.from_iterable(self._pieces),
                dtype=np.int32,
                count=sum(len(p) for p in self._pieces),
            ),
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


# Arrow arrays are built from buffers, never from Python or NumPy objects through pa.array():
# that path imports pandas to sniff its input (a test holds shard writing free of it), which
# every worker process would pay once, a run of small files in full.


def _numpy_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=type_.to_pandas_dtype())
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(
        _numpy_array(_offsets([len(a) for a in arrays]), pa.int32()),
        _numpy_array(values, pa.int32()),
    )


def _string_list_array(lists: list[list[str]]) -> pa.ListArray:
    encoded = [s.encode("utf-8") for strings in lists for s in strings]
    offsets = pa.py_buffer(_offsets([len(b) for b in encoded]))
    strings = pa.Array.from_buffers(
        pa.string(), len(encoded), [None, offsets, pa.py_buffer(b"".join(encoded))]
    )
    return pa.ListArray.from_arrays(
        _numpy_array(_offsets([len(x) for x in lists]), pa.int32()), strings
    )


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = []
    for f in BLOCK_SCHEMA:
        values = [r[f.name] for r in rows]
        if f.name in LIST_COLUMNS:
            columns.append(_list_array(values))
        elif f.type == pa.list_(pa.string()):
            columns.append(_string_list_array(values))
        else:
            columns.append(_numpy_array(np.asarray(values), f.type))
    return pa.Table.from_arrays(columns, schema=BLOCK_SCHEMA)
