"""Shared helpers for the model, generation and FLOPs tests (tiny CPU configs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from training.model import ModelConfig, Transformer, build_model

EOS, PAD, EOD = 0, 1, 2
VOCAB = 48


def tiny_config(arch: str = "gpthf", **overrides: Any) -> ModelConfig:
    """d=32, 2 heads, 4 layers (GPTHF 2+2); init_std=0.2 so logits are O(1), not ~0."""
    base: dict[str, Any] = dict(
        arch=arch,
        vocab_size=VOCAB,
        d_model=32,
        n_heads=2,
        n_layers=4,
        n_encoder_layers=2 if arch == "gpthf" else 0,
        ffn_dim=64,
        eos_id=EOS,
        pad_id=PAD,
        eod_id=EOD,
        max_sentence_tokens=6,
        init_std=0.2,
    )
    return ModelConfig(**{**base, **overrides})


def tiny_model(arch: str = "gpthf", seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides)).eval()


def row_from_documents(docs: list[list[int]], tokens: list[int] | None = None) -> dict[str, Any]:
    """A packed-block row from documents given as sentence lengths (EOS-S at each end)."""
    lengths = [n for d in docs for n in d]
    n_tokens = sum(lengths)
    if tokens is None:
        g = torch.Generator().manual_seed(n_tokens)
        tokens = torch.randint(3, VOCAB, (n_tokens,), generator=g).tolist()
    ids = list(tokens)
    pos = 0
    for n in lengths:
        pos += n
        ids[pos - 1] = EOS
    return {
        "input_ids": ids,
        "sentence_lengths": lengths,
        "document_index": [i for i, d in enumerate(docs) for _ in d],
        "num_bytes": 4 * n_tokens,
    }


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP spin-waits
    make them 10x slower under load: run the module on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
