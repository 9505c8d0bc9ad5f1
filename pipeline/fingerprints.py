"""Fingerprints of a document's normalised text: exact (128 bits) and MinHash LSH band keys.

The MinHash is rensa's (Rust), chosen over datasketch by ``benchmarks/dedup.py`` (same
shingles, same number of permutations, side by side). Its values are part of an output's
index, which outlives the process that made it: the rensa version is pinned, and an output
records the settings its index was built with (``DedupConfig.identity``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from rensa import RMinHash

from pipeline.config import DedupConfig

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Fingerprinter:
    """What deduplication computes per document (see ``DedupConfig`` for the choices)."""

    near: bool
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> Fingerprinter:
        return cls(cfg.mode == "near", cfg.ngram, cfg.bands, cfg.rows, cfg.seed)

    @staticmethod
    def exact(paragraphs: list[str]) -> tuple[int, int]:
        """128 bits of BLAKE2b over the normalised paragraphs: a collision among 10^12
        documents has odds of about 10^-15, so a match is a copy."""
        h = hashlib.blake2b("\n".join(paragraphs).encode("utf-8"), digest_size=16).digest()
        return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")

    def shingles(self, paragraphs: list[str]) -> list[str]:
        """Word n-grams of the lower-cased text (punctuation and spacing ignored); a document
        shorter than n words is one shingle of all its words."""
        words = _WORD.findall(" ".join(paragraphs).lower())
        n = self.ngram
        if len(words) <= n:
            return [" ".join(words)] if words else []
        return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]

    def signature(self, shingles: list[str]) -> np.ndarray:
        """The MinHash signature (bands x rows uint32 values)."""
        m = RMinHash(num_perm=self.bands * self.rows, seed=self.seed)
        m.update(shingles)
        return np.asarray(m.digest(), dtype=np.uint32)

    def band_keys(self, paragraphs: list[str]) -> np.ndarray:
        """One 64-bit key per LSH band (the band's number is hashed in, so bands never meet);
        empty when the document has no words."""
        shingles = self.shingles(paragraphs)
        if not shingles:
            return np.zeros(0, dtype=np.uint64)
        sig = self.signature(shingles).reshape(self.bands, self.rows)
        keys = np.empty(self.bands, dtype=np.uint64)
        for j in range(self.bands):
            h = hashlib.blake2b(j.to_bytes(2, "big") + sig[j].tobytes(), digest_size=8)
            keys[j] = int.from_bytes(h.digest(), "big")
        return keys
