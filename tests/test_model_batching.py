"""collate_blocks: packed Parquet rows -> (B, T) tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests._model_helpers import PAD, one_torch_thread, row_from_documents
from training.data.collate import IGNORE_INDEX, collate_blocks

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def _rows() -> list[dict]:
    return [
        row_from_documents([[3, 2], [4]]),  # two documents
        row_from_documents([[5]]),  # one short document
    ]


def test_tensors_of_two_rows() -> None:
    rows = _rows()
    b = collate_blocks(rows, pad_id=PAD)
    assert b.input_ids.shape == (2, 16)  # 9 tokens, padded to a multiple of 8
    assert b.input_ids.dtype == torch.int64
    assert b.input_ids[0, :9].tolist() == rows[0]["input_ids"]
    assert (b.input_ids[0, 9:] == PAD).all() and (b.input_ids[1, 5:] == PAD).all()
    assert b.sentence_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2] + [-1] * 7
    assert b.document_ids[0].tolist() == [0] * 5 + [1] * 4 + [-1] * 7
    assert b.sentence_ids[1].tolist() == [0] * 5 + [-1] * 11
    ids = rows[0]["input_ids"]
    # Next token within the document; -100 at a document's last token, on padding, at row end.
    assert (
        b.labels[0].tolist()
        == [*ids[1:5], IGNORE_INDEX, *ids[6:9], IGNORE_INDEX] + [IGNORE_INDEX] * 7
    )
    assert b.labels[1, :5].tolist() == [*rows[1]["input_ids"][1:], IGNORE_INDEX]
    assert b.num_bytes.tolist() == [36, 20]
    assert b.num_tokens == 14 and b.num_targets == 4 + 3 + 4


def test_input_formats_agree() -> None:
    rows = _rows()
    ref = collate_blocks(rows, pad_id=PAD)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    table = pa.Table.from_pylist(rows)
    numpy_cols: dict[str, np.ndarray] = {"num_bytes": np.asarray(columns["num_bytes"])}
    for k in ("input_ids", "sentence_lengths", "document_index"):  # Ray's numpy batch format
        numpy_cols[k] = np.empty(len(rows), dtype=object)
        for i, v in enumerate(columns[k]):
            numpy_cols[k][i] = np.asarray(v, dtype=np.int32)
    for batch in (columns, table, table.to_batches()[0], numpy_cols):
        got = collate_blocks(batch, pad_id=PAD)
        for name in ("input_ids", "sentence_ids", "document_ids", "labels", "num_bytes"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_long_batch_is_vectorised_and_exact() -> None:
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for _ in range(64):
        lengths = rng.integers(1, 40, size=32)
        n = int(lengths.sum())
        rows.append(
            {
                "input_ids": rng.integers(0, 1000, size=n),
                "sentence_lengths": lengths,
                "document_index": np.sort(rng.integers(0, 4, size=32)),
                "num_bytes": n,
            }
        )
    b = collate_blocks(
        pa.Table.from_pylist(
            [{k: list(v) if k != "num_bytes" else v for k, v in r.items()} for r in rows]
        ),
        pad_id=PAD,
    )
    assert b.input_ids.shape[1] % 8 == 0
    r = rows[7]
    n = int(r["sentence_lengths"].sum())
    assert b.input_ids[7, :n].tolist() == r["input_ids"].tolist()
    docs = np.repeat(r["document_index"], r["sentence_lengths"])
    assert b.document_ids[7, :n].tolist() == docs.tolist()
    same = docs[1:] == docs[:-1]
    expected = np.where(same, r["input_ids"][1:], IGNORE_INDEX)
    assert b.labels[7, : n - 1].tolist() == expected.tolist()


def test_bad_rows_raise_clear_errors() -> None:
    row = row_from_documents([[3, 2]])
    with pytest.raises(ValueError, match="sum to"):
        collate_blocks([{**row, "sentence_lengths": [3, 3]}], pad_id=PAD)
    with pytest.raises(ValueError, match="document_index entries"):
        collate_blocks([{**row, "document_index": [0]}], pad_id=PAD)
    with pytest.raises(ValueError, match="lacks columns"):
        collate_blocks([{"input_ids": [1]}], pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        collate_blocks([], pad_id=PAD)
