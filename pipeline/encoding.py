"""Sentences -> one token stream: each sentence tokenized alone and ended with EOS-S, each
document's last sentence with EOD, EOS-S.

The tokenizer's own cost per call (an ``Encoding`` with half a dozen vectors, a Python object)
is paid per sentence if sentences are encoded one by one. A whole document is encoded in one
call instead, its sentences joined by the EOS-S token's text: ``tokenizers`` cuts its input at
added tokens first and normalises and pre-tokenizes each piece on its own, so every sentence is
still tokenized alone, and the tokenizer emits the EOS-S (and EOD) itself. That holds for the
byte-level BPE gpthf trains and for every pre-tokenizer that treats each piece alike; one that
does not (Metaspace with ``prepend_scheme="first"`` marks only the start of the whole input) is
caught by a probe when the encoder is built, and then sentences are encoded one by one. The
stream is checked either way: one EOS-S per sentence, or the batch is encoded again sentence by
sentence (tests/test_encoding.py holds every way equal to a call per sentence).

Text that spells a special token (a page quoting ``<|endofsentence|>``) is text: it is encoded
as the characters it is, never as the special token, which would break the sentence structure.
"""

from __future__ import annotations

import itertools

import numpy as np
from tokenizers import Tokenizer

from pipeline.counters import Counters

_PROBE = [
    ["Hello there, world.", "It's 3:15 p.m. now!", "(Quoted) \"text\" and 'more'."],
    ["Ünïcödé sëntence — with dashes.", "日本語の文です。", "42 is a number; so is 7."],
    ["a", "'s", "-", "."],
]


class SentenceEncoder:
    """Encodes documents' sentences into one token stream (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, eos_id: int, eod_id: int) -> None:
        eos, eod = tokenizer.id_to_token(eos_id), tokenizer.id_to_token(eod_id)
        if eos is None or eod is None:
            raise ValueError(f"the tokenizer has no tokens {eos_id} (EOS-S) and {eod_id} (EOD)")
        self.eos_id, self.eod_id = eos_id, eod_id
        self._eos, self._end = eos, eod + eos
        self._joined = tokenizer
        # Sentence by sentence, special-token text is plain text.
        self._alone = Tokenizer.from_str(tokenizer.to_str())
        self._alone.encode_special_tokens = True
        self._others = [
            t.content
            for t in tokenizer.get_added_tokens_decoder().values()
            if t.special and t.content != eos
        ]
        texts = [self._eos.join(sentences) for sentences in _PROBE]
        joined = self._encode_joined(_PROBE, texts, [False] * len(_PROBE))
        self.joins_exactly = joined is not None and np.array_equal(
            joined, self._encode_alone(_PROBE)
        )

    def encode(self, docs: list[list[str]], counters: Counters) -> np.ndarray:
        """The token stream (int32) of ``docs``, each a list of non-empty sentences."""
        texts = [self._eos.join(sentences) for sentences in docs]
        spelled = [
            text.count(self._eos) != len(sentences) - 1 or any(t in text for t in self._others)
            for text, sentences in zip(texts, docs, strict=True)
        ]
        if any(spelled):
            counters.add("documents_with_special_token_text", sum(spelled))
        if self.joins_exactly:
            stream = self._encode_joined(docs, texts, spelled)
            if stream is not None:
                return stream
        # Added tokens that match otherwise than the probe showed: sentence by sentence.
        return self._encode_alone(docs)

    def _encode_joined(
        self, docs: list[list[str]], texts: list[str], spelled: list[bool]
    ) -> np.ndarray | None:
        """The stream of ``docs`` (``texts``: their sentences joined by the EOS-S text), or
        None where the tokenizer did not emit one EOS-S per sentence. A document that spells
        a special token (the separators are the only EOS-S text it may hold) is encoded
        sentence by sentence."""
        plain = {i: self._encode_alone([docs[i]]) for i, s in enumerate(spelled) if s}
        calls = ["" if s else text + self._end for text, s in zip(texts, spelled, strict=True)]
        encodings = self._joined.encode_batch_fast(calls, add_special_tokens=False) if calls else []
        n = sum(map(len, encodings)) + sum(map(len, plain.values()))
        parts = (
            (plain.get(i, e.ids) for i, e in enumerate(encodings))
            if plain
            else (e.ids for e in encodings)
        )
        stream = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=n)
        if int(np.count_nonzero(stream == self.eos_id)) != sum(map(len, docs)):
            return None  # say, an EOS-S token with single_word=True
        return stream

    def _encode_alone(self, docs: list[list[str]]) -> np.ndarray:
        flat = [s for sentences in docs for s in sentences]
        encodings = self._alone.encode_batch_fast(flat, add_special_tokens=False) if flat else []
        ids = [e.ids for e in encodings]
        k = 0
        for sentences in docs:
            k += len(sentences)
            ids[k - 1].append(self.eod_id)
        for piece in ids:
            piece.append(self.eos_id)
        n = sum(map(len, ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=n)
