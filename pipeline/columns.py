"""Column names of a block row, without pyarrow: the model side (``training.data.collate``)
needs only these, and runs where pyarrow is absent (the model benchmarks on a GPU machine).
The full schema, with types, is ``pipeline.blocks.BLOCK_SCHEMA``."""

from __future__ import annotations

LIST_COLUMNS = ("input_ids", "sentence_lengths", "document_index")
"""The integer list columns (what a model batch is built from)."""
MODEL_COLUMNS = LIST_COLUMNS
"""What collate needs to build a model batch."""
SCORING_COLUMNS = (*MODEL_COLUMNS, "num_bytes", "num_words")
"""What training and evaluation read from a shard: the model columns plus the byte and word
counts that bits-per-byte and word perplexity are normalised by."""

SPECIAL_TOKENS = {
    "end_of_sentence": "<|endofsentence|>",
    "pad": "<|pad|>",
    "end_of_document": "<|endofdoc|>",
}
"""Role -> token string. Roles are what the manifest and the model config refer to. Here, not in
``pipeline.tokenizer``, so that what only writes or reads blocks needs no text pipeline."""
