"""Tokenize and pack stages: sentences -> token pieces of at most M -> blocks of exactly S sentences."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.blocks import BLOCK_SCHEMA
from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder


@dataclass
class TokenizedBatch:
    """A batch of documents, tokenized, as flat arrays: every sentence piece ends with EOS-S, and
    each document's last piece with EOD, EOS-S.

    Columnar, not a Python list per sentence: the per-token path then touches each token once
    in Python (when ``tokenizers`` hands its ids over) and every later step is array arithmetic.
    """

    doc_ids: list[str]
    tokens: np.ndarray
    """int32, every piece's tokens back to back."""
    piece_lengths: np.ndarray
    """int64, tokens per piece (EOS-S included)."""
    piece_bytes: np.ndarray
    """int64, UTF-8 bytes of the text each piece covers (a split sentence's shared by tokens)."""
    piece_words: np.ndarray
    """int64, words each piece covers (shared as the bytes are)."""
    doc_pieces: np.ndarray
    """int64, pieces per document."""

    def select(self, keep: np.ndarray) -> TokenizedBatch:
        """The documents where ``keep`` (bool per document) holds, in order."""
        if keep.all():
            return self
        piece_keep = np.repeat(keep, self.doc_pieces)
        return TokenizedBatch(
            doc_ids=[d for d, k in zip(self.doc_ids, keep.tolist(), strict=True) if k],
            tokens=self.tokens[np.repeat(piece_keep, self.piece_lengths)],
            piece_lengths=self.piece_lengths[piece_keep],
            piece_bytes=self.piece_bytes[piece_keep],
            piece_words=self.piece_words[piece_keep],
            doc_pieces=self.doc_pieces[keep],
        )


def _spread(totals: np.ndarray, weights: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """Integer shares of each group's total proportional to its members' weights, summing
    exactly to the total (floor of the cumulative share; a group of zero weight is one member,
    which gets it all). Groups are consecutive runs of members starting at ``group_starts``."""
    sizes = np.diff(np.append(group_starts, len(weights)))
    cum = np.cumsum(weights)
    cum -= np.repeat(cum[group_starts] - weights[group_starts], sizes)
    whole = np.repeat(cum[np.append(group_starts[1:], len(weights)) - 1], sizes)
    total = np.repeat(totals, sizes)
    bound = np.where(whole > 0, cum * total // np.maximum(whole, 1), total)
    prev = np.empty_like(bound)
    prev[1:] = bound[:-1]
    prev[group_starts] = 0  # group_starts[0] is 0: every member gets its prev
    return bound - prev


def sentence_pieces(ids: list[int], max_sentence_tokens: int) -> list[list[int]]:
    """A sentence's token ids cut into pieces that, each with its EOS-S, hold at most M tokens.

    The one rule shared by the data pipeline and generation's prompt encoding (the pipeline
    applies it to whole batches at once: ``tokenize_batch``; a test holds the two equal).
    """
    budget = max_sentence_tokens - 1
    return [ids[j : j + budget] for j in range(0, len(ids), budget)] or [[]]


def tokenize_batch(
    docs: list[tuple[str, list[str]]],
    encoder: SentenceEncoder,
    *,
    max_sentence_tokens: int,
    counters: Counters,
) -> TokenizedBatch:
    """Tokenize each sentence alone; end every piece with EOS-S and each document with EOD, EOS-S.

    ``docs`` holds (id, sentences) with sentences as :func:`pipeline.text.split_sentences`
    returns them: at least one per document, non-empty, no whitespace at either end, words
    separated by exactly one space (tests/test_stages.py holds that property), so a sentence's
    words are its spaces plus one, counted without splitting it. A sentence longer than M tokens
    (EOS-S included) is cut by :func:`sentence_pieces`' rule, never truncated; its bytes and
    words are shared among its pieces by their tokens.
    """
    flat = [s for _, sentences in docs for s in sentences]
    n = len(flat)
    stream = encoder.encode([sentences for _, sentences in docs], counters)
    ends = np.flatnonzero(stream == encoder.eos_id)  # one EOS-S per sentence (the encoder's word)
    lengths = np.diff(ends, prepend=-1) - 1  # tokens before each EOS-S (EOD included)
    budget = max_sentence_tokens - 1
    n_pieces = np.maximum(1, -(-lengths // budget))
    # str.isascii() is O(1) (a flag of the string object); encoding is not.
    sentence_bytes = np.fromiter(
        (len(s) if s.isascii() else len(s.encode("utf-8")) for s in flat), dtype=np.int64, count=n
    )
    sentence_words = np.fromiter((s.count(" ") for s in flat), dtype=np.int64, count=n) + 1
    doc_sentences = np.fromiter((len(s) for _, s in docs), dtype=np.int64, count=len(docs))
    if int(n_pieces.sum()) == n:  # no sentence longer than M: the stream is the pieces
        tokens, content = stream, lengths
        piece_bytes, piece_words, doc_pieces = sentence_bytes, sentence_words, doc_sentences
    else:
        split = n_pieces > 1
        counters.add("sentences_split", int(split.sum()))
        counters.add("sentence_pieces_added", int((n_pieces[split] - 1).sum()))
        first = np.cumsum(n_pieces) - n_pieces
        rank = np.arange(int(n_pieces.sum())) - np.repeat(first, n_pieces)
        content = np.minimum(budget, np.repeat(lengths, n_pieces) - rank * budget)
        tokens = np.insert(np.delete(stream, ends), np.cumsum(content), encoder.eos_id)
        piece_bytes = _spread(sentence_bytes, content, first)
        piece_words = _spread(sentence_words, content, first)
        doc_pieces = np.add.reduceat(n_pieces, np.cumsum(doc_sentences) - doc_sentences)
    return TokenizedBatch(
        doc_ids=[doc_id for doc_id, _ in docs],
        tokens=tokens,
        piece_lengths=content + 1,
        piece_bytes=piece_bytes,
        piece_words=piece_words,
        doc_pieces=doc_pieces,
    )


@dataclass
class Blocks:
    """Packed blocks, columnar: the block schema's list columns as flat values plus offsets."""

    input_ids: np.ndarray
    token_offsets: np.ndarray
    sentence_lengths: np.ndarray
    document_index: np.ndarray
    sentence_offsets: np.ndarray
    """Offsets of both per-sentence columns."""
    num_bytes: np.ndarray
    num_words: np.ndarray
    document_ids: list[str]
    document_offsets: np.ndarray
    first_sentence_offset: np.ndarray

    def __len__(self) -> int:
        return len(self.num_bytes)

    def table(self) -> pa.Table:
        def lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(
                _numpy_array(offsets, pa.int32()), _numpy_array(values, pa.int32())
            )

        names = pa.ListArray.from_arrays(
            _numpy_array(self.document_offsets, pa.int32()), _string_array(self.document_ids)
        )
        columns = {
            "input_ids": lists(self.token_offsets, self.input_ids),
            "sentence_lengths": lists(self.sentence_offsets, self.sentence_lengths),
            "document_index": lists(self.sentence_offsets, self.document_index),
            "num_bytes": _numpy_array(self.num_bytes, pa.int64()),
            "num_words": _numpy_array(self.num_words, pa.int64()),
            "document_ids": names,
            "first_sentence_offset": _numpy_array(self.first_sentence_offset, pa.int32()),
        }
        return pa.Table.from_arrays([columns[f.name] for f in BLOCK_SCHEMA], schema=BLOCK_SCHEMA)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per block (the shard row as Python and NumPy values)."""
        t, s, d = self.token_offsets, self.sentence_offsets, self.document_offsets
        return [
            {
                "input_ids": self.input_ids[t[b] : t[b + 1]],
                "sentence_lengths": self.sentence_lengths[s[b] : s[b + 1]],
                "document_index": self.document_index[s[b] : s[b + 1]],
                "num_bytes": int(self.num_bytes[b]),
                "num_words": int(self.num_words[b]),
                "document_ids": self.document_ids[d[b] : d[b + 1]],
                "first_sentence_offset": int(self.first_sentence_offset[b]),
            }
            for b in range(len(self))
        ]


@dataclass
class _Run:
    """Sentence pieces in packing order, each with its document's packer-wide number and its
    index within that document."""

    tokens: np.ndarray
    lengths: np.ndarray
    bytes: np.ndarray
    words: np.ndarray
    doc: np.ndarray
    offset: np.ndarray

    @classmethod
    def empty(cls) -> _Run:
        i64 = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, dtype=np.int32), i64, i64, i64, i64, i64)

    def __len__(self) -> int:
        return len(self.lengths)

    def cut(self, n: int) -> tuple[_Run, _Run]:
        """The first ``n`` pieces and the rest."""
        t = int(self.lengths[:n].sum())
        rest = [getattr(self, f.name) for f in fields(_Run)[1:]]
        head = _Run(self.tokens[:t], *(a[:n] for a in rest))
        tail = _Run(self.tokens[t:], *(a[n:] for a in rest))
        return head, tail


@dataclass
class BlockPacker:
    """Packs documents back to back into blocks of exactly S sentences (a streaming fold)."""

    sentences_per_block: int
    _run: _Run = field(default_factory=_Run.empty)
    _names: dict[int, str] = field(default_factory=dict)
    _next_doc: int = 0

    def add(self, batch: TokenizedBatch) -> Blocks:
        """Add a batch's documents; return the blocks they complete."""
        n_docs = len(batch.doc_ids)
        serials = np.arange(self._next_doc, self._next_doc + n_docs, dtype=np.int64)
        self._names.update(zip(serials.tolist(), batch.doc_ids, strict=True))
        self._next_doc += n_docs
        firsts = np.cumsum(batch.doc_pieces) - batch.doc_pieces
        new = _Run(
            tokens=batch.tokens,
            lengths=batch.piece_lengths,
            bytes=batch.piece_bytes,
            words=batch.piece_words,
            doc=np.repeat(serials, batch.doc_pieces),
            offset=np.arange(len(batch.piece_lengths)) - np.repeat(firsts, batch.doc_pieces),
        )
        run = self._run
        if len(run):
            run = _Run(
                *(
                    np.concatenate([getattr(run, f.name), getattr(new, f.name)])
                    for f in fields(_Run)
                )
            )
        else:
            run = new
        full = len(run) // self.sentences_per_block * self.sentences_per_block
        head, self._run = run.cut(full)
        return self._blocks(head)

    def flush(self) -> Blocks:
        """The last, partial block (none if the documents filled their blocks exactly)."""
        run, self._run = self._run, _Run.empty()
        return self._blocks(run)

    def _blocks(self, run: _Run) -> Blocks:
        n = len(run)
        starts = np.arange(0, n, self.sentences_per_block)
        ends = np.append(starts[1:], n) if n else starts
        sizes = ends - starts
        # A block-local document number starts at 0 in every block and grows where the
        # document changes.
        new_doc = np.ones(n, dtype=bool)
        new_doc[1:] = run.doc[1:] != run.doc[:-1]
        new_doc[starts] = True
        rank = np.cumsum(new_doc) - 1
        local = rank - np.repeat(rank[starts], sizes)
        names = [self._names[d] for d in run.doc[new_doc].tolist()]
        if n:  # forget every document no later piece can belong to
            keep_from = int(run.doc[-1])
            self._names = {k: v for k, v in self._names.items() if k >= keep_from}
        return Blocks(
            input_ids=run.tokens,
            token_offsets=_offsets(_sums(run.lengths, starts)),
            sentence_lengths=run.lengths,
            document_index=local,
            sentence_offsets=np.append(starts, n),
            num_bytes=_sums(run.bytes, starts),
            num_words=_sums(run.words, starts),
            document_ids=names,
            document_offsets=_offsets(local[ends - 1] + 1),
            first_sentence_offset=run.offset[starts],
        )


def _sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over the runs that begin at ``starts`` (none: empty)."""
    return np.add.reduceat(values, starts) if len(starts) else np.zeros(0, dtype=values.dtype)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


# Arrow arrays are built from buffers, never from Python or NumPy objects through pa.array():
# that path imports pandas to sniff its input (a test holds shard writing free of it), which
# every worker process would pay once, a run of small files in full.


def _numpy_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=type_.to_pandas_dtype())
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _string_array(strings: list[str]) -> pa.Array:
    encoded = [x.encode("utf-8") for x in strings]
    offsets = _offsets(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    return pa.Array.from_buffers(
        pa.string(),
        len(encoded),
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
    )
