"""The block schema: the one definition of a shard row, used by the writer, the readers and the
collate. One row = one block of S sentences (only a shard's last block may hold fewer)."""

from __future__ import annotations

import pyarrow as pa

COLUMN_DOCS: dict[str, str] = {
    "input_ids": "list<int32>: the block's tokens",
    "sentence_lengths": "list<int32>: tokens per sentence (EOS-S included)",
    "document_index": "list<int32>: per sentence, block-local document number",
    "num_bytes": "int64: UTF-8 bytes of the normalised sentence texts covered",
    "num_words": "int64: whitespace-separated words covered",
    "document_ids": "list<string>: stable id of each block-local document",
    "first_sentence_offset": "int32: index in its document of the block's first sentence",
}
"""Column -> type and meaning; written into every manifest."""

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

from pipeline.columns import LIST_COLUMNS, MODEL_COLUMNS, SCORING_COLUMNS  # noqa: E402

__all__ = ["BLOCK_SCHEMA", "COLUMN_DOCS", "LIST_COLUMNS", "MODEL_COLUMNS", "SCORING_COLUMNS"]

assert set(COLUMN_DOCS) == set(BLOCK_SCHEMA.names)
