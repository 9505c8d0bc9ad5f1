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


def generation_model(arch: str = "gpthf", seed: int = 1) -> Transformer:
    """``tiny_model`` edited so that greedy decoding writes multi-token sentences that also end
    naturally (with EOS-S before the cap), so the generation tests exercise the caches of a
    sentence begun during generation and the sentence-end appends that follow it.

    A random model with tied embeddings mostly predicts its input token again (the residual
    stream is dominated by the input's embedding): once it emits EOS-S it emits EOS-S at every
    step, i.e. one-token sentences forever. Two deterministic edits, which change no maths:

    * the final norm's gain is -1, so "repeat the input token" becomes "avoid it": right after
      EOS-S, EOS-S is among the least likely tokens;
    * EOS-S's embedding row is doubled so it still wins now and then, and end-of-document's is
      zeroed (its logit is 0 at every step) so rows rarely stop before ``max_new_tokens``.

    tests/test_generate.py asserts that the sentences it generates really are long.
    """
    model = tiny_model(arch, seed=seed)
    with torch.no_grad():
        model.norm.weight.fill_(-1.0)
        model.embed.weight[EOS] *= 2.0  # tied: the output row and the input embedding
        model.embed.weight[EOD] = 0.0
    return model


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
