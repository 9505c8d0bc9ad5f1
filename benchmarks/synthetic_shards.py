"""A preprocess output made of synthetic blocks: manifest, tokenizer and Parquet shards.

    python benchmarks/synthetic_shards.py OUT [--rows 512] [--sentences 40] [--vocab-size 8192]

What `gpthf train` and `gpthf eval` read, without the text pipeline (blingfire, Ray): a machine
that has only torch, pyarrow and tokenizers (the GPU machine of ``benchmarks/gpu_check.py``)
can make it in a second. The blocks follow the block schema exactly (``pipeline.blocks``):
S sentences per row, sentence lengths ~ Poisson(25) capped at M, documents of
~Geometric(``doc_sentences``) sentences running across rows, each sentence ending with EOS-S and
each document's last one with end-of-document, EOS-S. Tokens come from a seeded order-1 Markov
chain over a Zipf vocabulary, so a model's loss falls quickly and measurably (the check asks
for that) without any text. The tokenizer is a word-level one whose words are the token ids'
names: it is real (its sha256 is what training checks), not meant for reading.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.blocks import BLOCK_SCHEMA
from pipeline.columns import SPECIAL_TOKENS
from pipeline.manifest import FORMAT, MANIFEST, Manifest


@dataclass(frozen=True)
class SyntheticSpec:
    rows: int = 512
    """Training blocks (the held-out split gets a quarter as many)."""
    sentences: int = 40
    """S, sentences per block (~25 tokens each: S=40 gives blocks of ~1k tokens)."""
    max_sentence_tokens: int = 64
    vocab_size: int = 8192
    doc_sentences: int = 20
    """Mean sentences per document."""
    shards: int = 4
    """Training shards (held-out: 1)."""
    seed: int = 0
    word_prefix: str = "t"
    """The words' names (another prefix: another tokenizer of the same size)."""


def tokenizer_json(vocab_size: int, word_prefix: str = "t") -> str:
    """A word-level tokenizer: the three special tokens first (ids 0-2), then words t3, t4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = [SPECIAL_TOKENS[r] for r in ("end_of_sentence", "pad", "end_of_document")]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"{word_prefix}{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{word_prefix}3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return str(tok.to_str())


class _Chain:
    """Order-1 Markov chain: each token's successor is one of 8 fixed tokens with p = 0.7,
    otherwise a Zipf(1.1) draw over the ordinary tokens."""

    def __init__(self, vocab_size: int, rng: np.random.Generator) -> None:
        self.rng, self.low, self.high = rng, 3, vocab_size
        self.next = rng.integers(self.low, self.high, (vocab_size, 8))

    def sentence(self, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        zipf = (self.rng.zipf(1.1, length) - 1) % (self.high - self.low) + self.low
        follow = self.rng.random(length) < 0.7
        pick = self.rng.integers(0, 8, length)
        prev = int(zipf[0])
        for i in range(length):
            prev = int(self.next[prev, pick[i]]) if follow[i] and i else int(zipf[i])
            out[i] = prev
        return out


def _blocks(spec: SyntheticSpec, n_rows: int, rng: np.random.Generator, ids: dict[str, int]):
    chain = _Chain(spec.vocab_size, rng)
    eos, eod = ids["end_of_sentence"], ids["end_of_document"]
    doc_no, left, offset = 0, int(rng.geometric(1 / spec.doc_sentences)), 0
    rows = []
    for _ in range(n_rows):
        tokens, lengths, doc_index, doc_ids = [], [], [], []
        first_offset = offset
        local = -1
        for _ in range(spec.sentences):
            if not doc_ids or doc_ids[-1] != f"synthetic#{doc_no}":
                doc_ids.append(f"synthetic#{doc_no}")
                local += 1
            n = int(np.clip(rng.poisson(25), 2, spec.max_sentence_tokens))
            sent = chain.sentence(n)
            left -= 1
            last = left == 0
            if last and n >= 3:
                sent[-2] = eod
            sent[-1] = eos
            tokens.append(sent)
            lengths.append(n)
            doc_index.append(local)
            offset += 1
            if last:
                doc_no, left, offset = doc_no + 1, int(rng.geometric(1 / spec.doc_sentences)), 0
        flat = np.concatenate(tokens).astype(np.int32)
        rows.append(
            {
                "input_ids": flat,
                "sentence_lengths": np.array(lengths, dtype=np.int32),
                "document_index": np.array(doc_index, dtype=np.int32),
                "num_bytes": int(len(flat) * 4),  # made up: ~4 bytes a token, as English BPE
                "num_words": int(len(flat) * 3 // 4),
                "document_ids": doc_ids,
                "first_sentence_offset": first_offset,
            }
        )
    return rows


def write_synthetic(output: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Manifest:
    """Write ``output`` (a local folder, created; refused if it holds a manifest already)."""
    root = Path(output)
    if (root / MANIFEST).exists():
        raise FileExistsError(f"{root} already holds a {MANIFEST}: choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_json(spec.vocab_size, spec.word_prefix)
    (root / "tokenizer.json").write_text(tok)
    ids = {"end_of_sentence": 0, "pad": 1, "end_of_document": 2}
    rng = np.random.default_rng(spec.seed)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    plan = [("train", i, spec.rows // spec.shards) for i in range(spec.shards)]
    plan.append(("heldout", 0, max(1, spec.rows // 4)))
    for split, i, n in plan:
        rows = _blocks(spec, n, rng, ids)
        table = pa.Table.from_pylist(rows, schema=BLOCK_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        rel = f"{split}/synthetic-{i:03d}.parquet"
        (root / split).mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
        splits[split].append(
            {
                "path": rel,
                "rows": len(rows),
                "sentences": sum(len(r["sentence_lengths"]) for r in rows),
                "tokens": sum(len(r["input_ids"]) for r in rows),
                "bytes": sum(r["num_bytes"] for r in rows),
                "words": sum(r["num_words"] for r in rows),
                "documents": sum(len(r["document_ids"]) for r in rows),
                "sha256": hashlib.sha256(data).hexdigest(),
                "added_in_version": 1,
            }
        )
    manifest = Manifest.from_dict(
        {
            "format": FORMAT,
            "version": 1,
            "created": "synthetic",
            "run_id": "synthetic",
            "config": {"synthetic": spec.__dict__},
            "tokenizer": {
                "source": "benchmarks/synthetic_shards.py",
                "path": "tokenizer.json",
                "sha256": hashlib.sha256(tok.encode()).hexdigest(),
                "vocab_size": spec.vocab_size,
            },
            "special_tokens": {
                role: {"token": SPECIAL_TOKENS[role], "id": i} for role, i in ids.items()
            },
            "packing": {
                "sentences_per_block": spec.sentences,
                "max_sentence_tokens": spec.max_sentence_tokens,
                "heldout_fraction": 0.2,
                "seed": spec.seed,
            },
            "splits": {name: {"shards": refs} for name, refs in splits.items()},
        }
    )
    manifest.commit(str(root))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output")
    for name, default in SyntheticSpec().__dict__.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args()
    spec = SyntheticSpec(**{k: getattr(args, k) for k in SyntheticSpec().__dict__})
    m = write_synthetic(args.output, spec)
    print(json.dumps({s: m.totals(s) for s in ("train", "heldout")}))


if __name__ == "__main__":
    main()
