"""Counters that every stage adds to; they merge across work units into the stats report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserError

MAX_EXAMPLES_PER_REASON = 5
SKIP_HINTS = {
    "invalid_utf8": "the input is not UTF-8 (Latin-1 or Windows-1252 text, say): re-encode it, "
    "e.g. `iconv -f latin1 -t utf-8 IN > OUT`, and preprocess the new file",
}
"""What to do about a skip reason, where there is something to do: shown with ``--strict`` and
in the run's summary."""
# Sentences per document are binned by powers of two: bin b holds counts in [2**(b-1), 2**b).
DOC_SENTENCE_BINS = 24


class StrictModeError(UserError):
    """A record would have been skipped, but --strict makes that fatal."""

    exit_code = 1


@dataclass
class Counters:
    counts: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    sentence_tokens_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Index n: number of sentence pieces of n tokens (EOS-S included)."""
    doc_sentences_hist: np.ndarray = field(
        default_factory=lambda: np.zeros(DOC_SENTENCE_BINS, dtype=np.int64)
    )
    strict: bool = False

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def skip(self, reason: str, location: str, n: int = 1, fault: bool = True) -> None:
        """Count a skipped record; in strict mode, fail naming it if it is a ``fault`` of the
        input (a duplicate document is skipped by design, not a fault)."""
        if self.strict and fault:
            hint = f"; {SKIP_HINTS[reason]}" if reason in SKIP_HINTS else ""
            raise StrictModeError(
                f"{location}: {reason.replace('_', ' ')}{hint} (run without --strict to skip and "
                "count it)"
            )
        self.skipped[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(location)

    def add_sentence_lengths(self, lengths: np.ndarray) -> None:
        if lengths.size == 0:
            return
        self._add_length_counts(np.bincount(lengths))

    def _add_length_counts(self, counts: np.ndarray) -> None:
        if counts.size > self.sentence_tokens_hist.size:
            grown = np.zeros(counts.size, dtype=np.int64)
            grown[: self.sentence_tokens_hist.size] = self.sentence_tokens_hist
            self.sentence_tokens_hist = grown
        self.sentence_tokens_hist[: counts.size] += counts

    def add_document_sentences(self, n: int) -> None:
        b = min(int(n).bit_length(), DOC_SENTENCE_BINS - 1)
        self.doc_sentences_hist[b] += 1

    def merge(self, other: Counters) -> Counters:
        self.counts.update(other.counts)
        self.skipped.update(other.skipped)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: MAX_EXAMPLES_PER_REASON - len(mine)])
        self._add_length_counts(other.sentence_tokens_hist)
        self.doc_sentences_hist += other.doc_sentences_hist
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": {k: v for k, v in sorted(self.examples.items())},
            "sentence_tokens_hist": self.sentence_tokens_hist.tolist(),
            "doc_sentences_hist_log2": self.doc_sentences_hist.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        return cls(
            counts=Counter(d.get("counts", {})),
            skipped=Counter(d.get("skipped", {})),
            examples={k: list(v) for k, v in d.get("skipped_examples", {}).items()},
            sentence_tokens_hist=np.asarray(d.get("sentence_tokens_hist", []), dtype=np.int64),
            doc_sentences_hist=np.asarray(
                d.get("doc_sentences_hist_log2", [0] * DOC_SENTENCE_BINS), dtype=np.int64
            ),
        )
