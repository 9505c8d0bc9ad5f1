"""The sentence encoder: whole documents per tokenizer call, and exactly the ids of each sentence
tokenized alone; the per-sentence path wherever joining would not be exact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder
from pipeline.text import normalise, split_sentences
from pipeline.tokenizer import load_tokenizer
from tests.conftest import make_sentence

EOS, PAD, EOD = "<|endofsentence|>", "<|pad|>", "<|endofdoc|>"


def _docs(seed: int, n: int = 30) -> list[list[str]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        text = " ".join(make_sentence(rng) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.3:
            text += " Naïve café — “quoted” text, 42 items; it's 3:15 p.m.!"
        docs.append(split_sentences(normalise(text)))
    return docs


def _definition(tokenizer: Tokenizer, docs: list[list[str]], eos: int, eod: int) -> list[int]:
    """Each sentence tokenized alone (special-token text as text), EOS-S after each, EOD before
    the document's last EOS-S."""
    alone = Tokenizer.from_str(tokenizer.to_str())
    alone.encode_special_tokens = True
    out: list[int] = []
    for sentences in docs:
        for k, s in enumerate(sentences):
            out += alone.encode(s, add_special_tokens=False).ids
            out += [eod, eos] if k == len(sentences) - 1 else [eos]
    return out


def _trained(pre_tokenizer: pre_tokenizers.PreTokenizer, eos: AddedToken | str = EOS) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", eos, PAD, EOD])
    text = [" ".join(s) for s in _docs(0, 200)]
    tok.train_from_iterator(text, trainer)
    return tok


def _check(tok: Tokenizer, docs: list[list[str]]) -> SentenceEncoder:
    eos, eod = tok.token_to_id(EOS), tok.token_to_id(EOD)
    encoder = SentenceEncoder(tok, eos_id=eos, eod_id=eod)
    stream = encoder.encode(docs, Counters())
    assert stream.dtype == np.int32
    assert stream.tolist() == _definition(tok, docs, eos, eod)
    return encoder


def test_gpthf_tokenizer_encodes_whole_documents(tokenizer_path: Path) -> None:
    # The byte-level BPE gpthf trains takes the fast path, and it is exact.
    loaded = load_tokenizer(str(tokenizer_path))
    assert _check(loaded.tokenizer, _docs(1)).joins_exactly


def test_metaspace_always_joins_and_first_does_not() -> None:
    # prepend_scheme="first" marks only the start of the whole input: joining sentences would
    # change every sentence's first token but the first, so the probe sends it sentence by
    # sentence; "always" treats each piece alike and joins.
    always = _trained(pre_tokenizers.Metaspace(prepend_scheme="always"))
    first = _trained(pre_tokenizers.Metaspace(prepend_scheme="first"))
    assert _check(always, _docs(2)).joins_exactly
    assert not _check(first, _docs(2)).joins_exactly


def test_an_eos_token_that_does_not_match_between_sentences_falls_back() -> None:
    # single_word=True: the EOS-S text between "word." and "Next" is not matched as the token,
    # so the stream would lack EOS-S; the probe sees the count and goes sentence by sentence.
    tok = _trained(pre_tokenizers.Whitespace(), AddedToken(EOS, single_word=True, special=True))
    assert not _check(tok, _docs(3)).joins_exactly


@pytest.mark.parametrize("text", [EOS, f"Say {EOD} now.", f"a{PAD}b. Then {EOS[:-2]}. Done."])
def test_text_that_spells_a_special_token_is_text(tokenizer_path: Path, text: str) -> None:
    loaded = load_tokenizer(str(tokenizer_path))
    ids = loaded.special_ids
    docs = [["Before it."], split_sentences(normalise(text)), ["After it."]]
    counters = Counters()
    encoder = SentenceEncoder(
        loaded.tokenizer, eos_id=ids["end_of_sentence"], eod_id=ids["end_of_document"]
    )
    stream = encoder.encode(docs, counters).tolist()
    assert stream == _definition(
        loaded.tokenizer, docs, ids["end_of_sentence"], ids["end_of_document"]
    )
    assert stream.count(ids["end_of_document"]) == 3, "one EOD per document, none from text"
    assert stream.count(ids["pad"]) == 0
    spelled = any(t in text for t in (EOS, PAD, EOD))
    assert counters.counts.get("documents_with_special_token_text", 0) == int(spelled)
