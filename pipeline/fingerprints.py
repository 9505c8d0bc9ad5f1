"""Fingerprints of a document's normalised text: exact (128 bits) and MinHash LSH band keys.

The MinHash is rensa's (Rust), chosen over datasketch by ``benchmarks/dedup.py`` (same
shingles, same number of permutations, side by side). Its values are part of an output's
index, which outlives the process that made it: the rensa version is pinned, and an output
records the settings its index was built with (``DedupConfig.identity``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

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
        """The MinHash signature of a set of string shingles (bands x rows uint32 values):
        rensa's own hashing, for tests and benchmarks; the pipeline hashes shingles itself
        (``band_keys``), which gives the same estimate of Jaccard similarity, faster."""
        m = RMinHash(num_perm=self.bands * self.rows, seed=self.seed)
        m.update(shingles)
        return np.asarray(m.digest(), dtype=np.uint32)

    def band_keys(self, texts: list[str]) -> list[np.ndarray]:
        """Per document, one 64-bit key per LSH band (the band's number is mixed in, so bands
        never meet); empty for a document with no words.

        Batched, because per-document NumPy calls would cost more than the work: each word
        gets a stable 64-bit id (BLAKE2b, cached), a shingle's hash is a polynomial of its
        n word ids (word order matters) finished by splitmix64, and rensa turns every
        document's shingle hashes into its signature in one call
        (``digest_matrix_from_flat_token_hashes``)."""
        words = [_WORD.findall(t.lower()) for t in texts]
        lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = np.fromiter(self._word_ids(chain.from_iterable(words)), dtype=np.uint64)
        n = self.ngram
        ends = np.repeat(np.cumsum(lens), lens)
        pos = np.arange(len(flat))
        padded = np.concatenate([flat, np.zeros(n, dtype=np.uint64)])
        h = np.zeros(len(flat), dtype=np.uint64)
        for k in range(n):
            term = np.where(pos + k < ends, padded[k : k + len(flat)], np.uint64(0))
            h += term * _MULT[k]
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        # A shingle per position whose n words lie in its document; a document shorter than
        # n words is one shingle of all its words.
        keep = (pos + n <= ends) | ((ends - starts < n) & (pos == starts))
        counts = np.bincount(np.repeat(np.arange(len(texts)), lens)[keep], minlength=len(texts))
        shingles = _splitmix64(h[keep])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
        out = [np.zeros(0, dtype=np.uint64)] * len(texts)
        if not len(shingles):
            return out
        perm = self.bands * self.rows
        sig = np.asarray(
            RMinHash.digest_matrix_from_flat_token_hashes(
                shingles, offsets, perm, self.seed
            ).to_rows(),
            dtype=np.uint64,
        ).reshape(len(texts), self.bands, self.rows)
        folded = (sig * _MULT[: self.rows]).sum(axis=2, dtype=np.uint64)
        folded += np.arange(self.bands, dtype=np.uint64) * np.uint64(_BAND_SALT)
        keys = _splitmix64(folded.reshape(-1)).reshape(len(texts), self.bands)
        return [keys[i] if counts[i] else out[i] for i in range(len(texts))]

    @staticmethod
    def _word_ids(words: Iterable[str]) -> list[int]:
        """Stable 64-bit ids of ``words`` (BLAKE2b of the word), through a per-process cache
        (a pure function of the word: every unit a worker runs shares it)."""
        words = list(words)
        cache = _WORD_IDS
        new = set(words).difference(cache.keys())
        if new:
            if len(cache) + len(new) > WORD_CACHE:
                cache.clear()  # (a crawl's vocabulary is unbounded: numbers, URLs, typos)
                new = set(words)
            for w in new:
                cache[w] = int.from_bytes(
                    hashlib.blake2b(w.encode(), digest_size=8).digest(), "big"
                )
        return list(map(cache.__getitem__, words))


WORD_CACHE = 1 << 21
_WORD_IDS: dict[str, int] = {}
_BAND_SALT = 0x9E3779B97F4A7C15
# Odd multipliers of the shingle polynomial and the band fold (fixed: they are part of the
# index's meaning, recorded by the rensa pin and DedupConfig.identity).
_MULT = np.array(
    [
        0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53, 0x9FB21C651E98DF25, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
        0x2545F4914F6CDD1D, 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x27BB2EE687B0B0FD,
        0x9E3779B97F4A7C15, 0x61C8864680B583EB, 0x8CB92BA72F3D8DD7, 0xDB4F0B9175AE2165,
    ],
    dtype=np.uint64,
)  # fmt: skip


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (the index buckets
    keys by their top bits)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
