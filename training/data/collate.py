"""Packed Parquet blocks -> model tensors (numpy, vectorised; no Python loop over tokens).

A block row holds ``input_ids`` (its tokens), ``sentence_lengths`` (per sentence, summing to
len(input_ids)), ``document_index`` (per sentence, block-local, non-decreasing) and
``num_bytes``. ``collate_blocks`` turns a batch of rows into ``PackedBatch`` tensors:

* input_ids (B, T), right-padded with pad_id, T a multiple of ``pad_to_multiple``;
* sentence_ids (B, T): block-local sentence index, -1 on padding;
* document_ids (B, T): block-local document index per token, -1 on padding;
* labels (B, T): the next token, or -100 where the next token is padding or another document
  (so the last token of every row is -100: its successor lives in the next block).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.columns import MODEL_COLUMNS

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: Tensor  # (B, T) int64
    sentence_ids: Tensor  # (B, T) int64, -1 on padding
    document_ids: Tensor  # (B, T) int64, -1 on padding
    labels: Tensor  # (B, T) int64, IGNORE_INDEX where there is no next token
    num_bytes: Tensor  # (B,) int64, UTF-8 bytes of text behind each row (0 if absent)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int((self.sentence_ids >= 0).sum())

    @property
    def num_targets(self) -> int:
        """Positions with a label (what the loss averages over)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )


@dataclass
class _Flat:
    """The list columns of B rows as flat arrays plus per-row lengths."""

    ids: np.ndarray  # (sum of tokens,)
    row_tokens: np.ndarray  # (B,)
    sentence_lengths: np.ndarray  # (sum of sentences,)
    row_sentences: np.ndarray  # (B,)
    document_index: np.ndarray  # (sum of sentences,)
    row_doc_entries: np.ndarray  # (B,)
    num_bytes: np.ndarray  # (B,)


def _flatten_arrow(batch: Any) -> _Flat:
    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = batch.column(name)
        if hasattr(col, "combine_chunks"):  # ChunkedArray (Table)
            col = col.combine_chunks()
        return (
            col.flatten().to_numpy(zero_copy_only=False),
            col.value_lengths().to_numpy(zero_copy_only=False),
        )

    ids, row_tokens = column("input_ids")
    lengths, row_sentences = column("sentence_lengths")
    doc, row_doc = column("document_index")
    names = batch.schema.names
    nb = (
        batch.column("num_bytes").to_numpy(zero_copy_only=False)
        if "num_bytes" in names
        else np.zeros(len(row_tokens))
    )
    return _Flat(ids, row_tokens, lengths, row_sentences, doc, row_doc, nb)


def _flatten_lists(columns: Mapping[str, Sequence[Any]]) -> _Flat:
    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        values = columns[name]
        counts = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        if not len(values):
            return np.zeros(0, dtype=np.int64), counts
        return np.concatenate([np.asarray(v, dtype=np.int64) for v in values]), counts

    ids, row_tokens = column("input_ids")
    lengths, row_sentences = column("sentence_lengths")
    doc, row_doc = column("document_index")
    nb = np.asarray(columns.get("num_bytes", np.zeros(len(row_tokens))), dtype=np.int64)
    return _Flat(ids, row_tokens, lengths, row_sentences, doc, row_doc, nb)


def _flatten(rows: Any) -> _Flat:
    if hasattr(rows, "schema") and hasattr(rows, "column"):  # pyarrow Table / RecordBatch
        return _flatten_arrow(rows)
    if isinstance(rows, Mapping):  # columnar dict (e.g. Ray's numpy batch format)
        missing = [c for c in MODEL_COLUMNS if c not in rows]
        if missing:
            raise ValueError(f"collate_blocks: batch lacks columns {missing}; got {sorted(rows)}")
        return _flatten_lists(rows)
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [c for c in MODEL_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"collate_blocks: row {i} lacks columns {missing}")
    cols: dict[str, list[Any]] = {c: [r[c] for r in rows] for c in MODEL_COLUMNS}
    cols["num_bytes"] = [r.get("num_bytes", 0) for r in rows]
    return _flatten_lists(cols)


def collate_blocks(rows: Any, *, pad_id: int, pad_to_multiple: int = 8) -> PackedBatch:
    """Rows of packed blocks -> ``PackedBatch``.

    ``rows``: a list of row dicts, a dict of columns, or a pyarrow Table / RecordBatch.
    """
    f = _flatten(rows)
    B = len(f.row_tokens)
    if B == 0:
        raise ValueError("collate_blocks: empty batch")
    if not np.array_equal(f.row_sentences, f.row_doc_entries):
        bad = int(np.flatnonzero(f.row_sentences != f.row_doc_entries)[0])
        raise ValueError(
            f"collate_blocks: row {bad} has {f.row_sentences[bad]} sentence_lengths but "
            f"{f.row_doc_entries[bad]} document_index entries (one per sentence expected)"
        )
    sent_row = np.repeat(np.arange(B), f.row_sentences)  # (S,) row of each sentence
    per_row = np.bincount(sent_row, weights=f.sentence_lengths, minlength=B).astype(np.int64)
    if not np.array_equal(per_row, f.row_tokens):
        bad = int(np.flatnonzero(per_row != f.row_tokens)[0])
        raise ValueError(
            f"collate_blocks: row {bad} has {f.row_tokens[bad]} input_ids but its "
            f"sentence_lengths sum to {per_row[bad]}; the shard is corrupt or from another format"
        )
    if (f.sentence_lengths < 1).any():
        raise ValueError("collate_blocks: a sentence has length < 1 (every sentence has EOS-S)")

    longest = int(f.row_tokens.max())
    T = max(pad_to_multiple, -(-longest // pad_to_multiple) * pad_to_multiple)
    row_start = np.cumsum(f.row_tokens) - f.row_tokens  # (B,)
    tok_row = np.repeat(np.arange(B), f.row_tokens)  # (N,)
    tok_col = np.arange(len(f.ids)) - np.repeat(row_start, f.row_tokens)  # (N,)

    sent_start = np.cumsum(f.row_sentences) - f.row_sentences  # (B,) first sentence of each row
    local_sentence = np.arange(len(f.sentence_lengths)) - np.repeat(sent_start, f.row_sentences)

    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    sentence_ids = np.full((B, T), -1, dtype=np.int64)
    document_ids = np.full((B, T), -1, dtype=np.int64)
    input_ids[tok_row, tok_col] = f.ids
    sentence_ids[tok_row, tok_col] = np.repeat(local_sentence, f.sentence_lengths)
    document_ids[tok_row, tok_col] = np.repeat(f.document_index, f.sentence_lengths)

    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    same_doc = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
    labels[:, :-1] = np.where(same_doc, input_ids[:, 1:], IGNORE_INDEX)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        sentence_ids=torch.from_numpy(sentence_ids),
        document_ids=torch.from_numpy(document_ids),
        labels=torch.from_numpy(labels),
        num_bytes=torch.from_numpy(
            np.array(f.num_bytes, dtype=np.int64)
        ),  # a copy: arrow is read-only
    )
