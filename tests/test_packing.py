"""Tokenize + pack stages: property tests that nothing is lost, duplicated or mis-sized, and that
the columnar implementation equals the plain per-sentence definition."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from pipeline.blocks import BLOCK_SCHEMA
from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder
from pipeline.packing import BlockPacker, Blocks, TokenizedBatch, sentence_pieces, tokenize_batch
from pipeline.text import normalise, split_sentences
from pipeline.tokenizer import SPECIAL_TOKENS, LoadedTokenizer, load_tokenizer
from tests.conftest import WORDS, make_sentence


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> LoadedTokenizer:
    return load_tokenizer(str(tokenizer_path))


def _tokenize(
    tok: LoadedTokenizer, docs: list[tuple[str, list[str]]], M: int, counters: Counters
) -> TokenizedBatch:
    return tokenize_batch(docs, _encoder(tok), max_sentence_tokens=M, counters=counters)


_ENCODERS: dict[str, SentenceEncoder] = {}


def _encoder(tok: LoadedTokenizer) -> SentenceEncoder:
    if tok.sha256 not in _ENCODERS:
        _ENCODERS[tok.sha256] = SentenceEncoder(
            tok.tokenizer,
            eos_id=tok.special_ids["end_of_sentence"],
            eod_id=tok.special_ids["end_of_document"],
        )
    return _ENCODERS[tok.sha256]


def _pack(
    tok: LoadedTokenizer, docs: list[tuple[str, str]], S: int, M: int, batch: int = 3
) -> tuple[list[dict], dict]:
    """Rows of ``docs`` packed in batches of ``batch`` documents (blocks span batches)."""
    split = [(doc_id, split_sentences(normalise(text))) for doc_id, text in docs]
    packer = BlockPacker(S)
    rows: list[dict] = []
    for i in range(0, len(split), batch):
        rows.extend(packer.add(_tokenize(tok, split[i : i + batch], M, Counters())).rows())
    rows.extend(packer.flush().rows())
    return rows, dict(split)


def _reference_rows(
    tok: LoadedTokenizer, docs: list[tuple[str, list[str]]], S: int, M: int, counters: Counters
) -> list[dict[str, Any]]:
    """The plain definition, one sentence and one document at a time: tokenize each sentence
    alone, EOD before the last EOS-S, cut long sentences by ``sentence_pieces``, share bytes and
    words among a sentence's pieces by their tokens (floor of the cumulative share), then fill
    blocks of S pieces back to back."""
    eos, eod = tok.special_ids["end_of_sentence"], tok.special_ids["end_of_document"]
    alone = Tokenizer.from_str(tok.json)
    alone.encode_special_tokens = True  # text that spells a special token is text
    pieces: list[tuple[str, int, list[int], int, int]] = []  # doc, offset, ids, bytes, words
    specials = [t.content for t in alone.get_added_tokens_decoder().values() if t.special]
    for doc_id, sentences in docs:
        if any(t in s for s in sentences for t in specials):
            counters.add("documents_with_special_token_text")
        offset = 0
        for k, sentence in enumerate(sentences):
            ids = alone.encode(sentence, add_special_tokens=False).ids
            if k == len(sentences) - 1:
                ids.append(eod)
            chunks = sentence_pieces(ids, M)
            if len(chunks) > 1:
                counters.add("sentences_split")
                counters.add("sentence_pieces_added", len(chunks) - 1)
            n_bytes, n_words = len(sentence.encode("utf-8")), len(sentence.split())
            cum = prev_b = prev_w = 0
            whole = sum(len(c) for c in chunks)
            for c in chunks:
                cum += len(c)
                b = cum * n_bytes // whole if whole else n_bytes
                w = cum * n_words // whole if whole else n_words
                pieces.append((doc_id, offset, [*c, eos], b - prev_b, w - prev_w))
                prev_b, prev_w, offset = b, w, offset + 1
    rows = []
    for i in range(0, len(pieces), S):
        block = pieces[i : i + S]
        names: list[str] = []
        index = []
        for j, (doc_id, *_) in enumerate(block):
            if j == 0 or doc_id != block[j - 1][0]:
                names.append(doc_id)
            index.append(len(names) - 1)
        rows.append(
            {
                "input_ids": [t for p in block for t in p[2]],
                "sentence_lengths": [len(p[2]) for p in block],
                "document_index": index,
                "num_bytes": sum(p[3] for p in block),
                "num_words": sum(p[4] for p in block),
                "document_ids": names,
                "first_sentence_offset": block[0][1],
            }
        )
    return rows


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in rows
    ]


sentence = st.builds(
    lambda words, end: " ".join(words).capitalize() + end,
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=40),
    st.sampled_from([".", "!", "?"]),
)
document = st.lists(sentence, min_size=1, max_size=25).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(document, min_size=1, max_size=8),
    S=st.integers(1, 9),
    M=st.integers(3, 24),
)
def test_blocks_preserve_every_sentence_in_order(
    tok: LoadedTokenizer, docs: list[str], S: int, M: int
) -> None:
    named = [(f"doc{i}", text) for i, text in enumerate(docs)]
    rows, sentences = _pack(tok, named, S, M)
    eos = tok.special_ids["end_of_sentence"]
    eod = tok.special_ids["end_of_document"]
    # Every block holds exactly S sentences, except the very last one.
    for r in rows[:-1]:
        assert len(r["sentence_lengths"]) == S
    assert 1 <= len(rows[-1]["sentence_lengths"]) <= S
    per_doc: dict[str, list[np.ndarray]] = {}
    for r in rows:
        ids, lengths = r["input_ids"], r["sentence_lengths"]
        assert int(lengths.sum()) == len(ids)
        assert len(r["document_index"]) == len(lengths)
        assert np.all(np.diff(r["document_index"]) >= 0)
        bounds = np.cumsum(lengths)
        for k, (start, end) in enumerate(zip(bounds - lengths, bounds, strict=True)):
            piece = ids[start:end]
            assert piece[-1] == eos, "every sentence ends with EOS-S"
            assert 2 <= len(piece) <= M, "at most M tokens, never empty"
            doc_id = r["document_ids"][r["document_index"][k]]
            per_doc.setdefault(doc_id, []).append(piece)
    assert list(per_doc) == [name for name, _ in named], "documents back to back, none lost"
    decode = tok.tokenizer.decode
    for doc_id, pieces in per_doc.items():
        flat = np.concatenate(pieces)
        # EOD only once, right before the final EOS-S.
        assert flat[-2] == eod and int((flat == eod).sum()) == 1
        text = decode([int(t) for t in flat if t not in (eos, eod)])
        want = " ".join(sentences[doc_id])
        assert "".join(text.split()) == "".join(want.split())


long_sentence = st.lists(st.sampled_from(WORDS), min_size=30, max_size=90).map(
    lambda words: " ".join(words) + "."
)
any_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=200
)
special_text = st.sampled_from(
    ["<|endofsentence|>", "Quote <|endofdoc|> here.", "a<|pad|>b", "<|endofsentence"]
)
mixed_document = st.lists(
    st.one_of(sentence, long_sentence, any_text, special_text), min_size=1, max_size=12
).map(" ".join)


@settings(max_examples=80, deadline=None)
@given(
    docs=st.lists(mixed_document, min_size=1, max_size=10),
    S=st.integers(1, 9),
    M=st.integers(3, 24),
    batch=st.integers(1, 4),
    heldout=st.lists(st.booleans(), min_size=10, max_size=10),
)
def test_columnar_packing_equals_the_plain_definition(
    tok: LoadedTokenizer, docs: list[str], S: int, M: int, batch: int, heldout: list[bool]
) -> None:
    # Documents of two splits, tokenized in batches, each split packed by its own packer (as
    # pipeline.unit does): every row, and the split counters, equal the plain definition.
    split = [(f"d{i}", split_sentences(normalise(text))) for i, text in enumerate(docs)]
    split = [(name, sentences) for name, sentences in split if sentences]
    counters, want_counters = Counters(), Counters()
    packers = {False: BlockPacker(S), True: BlockPacker(S)}
    got: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(0, len(split), batch):
        tokenized = _tokenize(tok, split[i : i + batch], M, counters)
        flags = np.array([heldout[int(name[1:])] for name in tokenized.doc_ids], dtype=bool)
        for h in (False, True):
            got[h] += packers[h].add(tokenized.select(flags == h)).rows()
    for h in (False, True):
        got[h] += packers[h].flush().rows()
        docs_h = [(name, ss) for name, ss in split if heldout[int(name[1:])] == h]
        want = _reference_rows(tok, docs_h, S, M, want_counters)
        assert _plain(got[h]) == want
    assert counters.counts == want_counters.counts


def test_long_sentence_is_split_into_pieces_never_truncated(tok: LoadedTokenizer) -> None:
    rng = random.Random(0)
    long = make_sentence(rng, n_words=120)
    rows, _ = _pack(tok, [("d", long)], S=100, M=8)
    (row,) = rows
    assert len(row["sentence_lengths"]) > 10
    assert max(row["sentence_lengths"]) <= 8
    text = tok.tokenizer.decode(row["input_ids"].tolist(), skip_special_tokens=True)
    assert "".join(text.split()) == "".join(long.split())


def test_bytes_and_words_add_up_exactly(tok: LoadedTokenizer) -> None:
    rng = random.Random(1)
    docs = [
        (f"d{i}", " ".join(make_sentence(rng) for _ in range(rng.randint(1, 30))))
        for i in range(20)
    ]
    rows, sentences = _pack(tok, docs, S=7, M=6)
    want_bytes = sum(len(s.encode()) for ss in sentences.values() for s in ss)
    want_words = sum(len(s.split()) for ss in sentences.values() for s in ss)
    assert sum(r["num_bytes"] for r in rows) == want_bytes
    assert sum(r["num_words"] for r in rows) == want_words


def test_document_continuing_into_next_block_is_marked(tok: LoadedTokenizer) -> None:
    rng = random.Random(2)
    docs = [("a", " ".join(make_sentence(rng, 4) for _ in range(5))), ("b", make_sentence(rng, 4))]
    rows, _ = _pack(tok, docs, S=3, M=64)
    assert [list(r["document_index"]) for r in rows] == [[0, 0, 0], [0, 0, 1]]
    assert [r["document_ids"] for r in rows] == [["a"], ["a", "b"]]
    assert [r["first_sentence_offset"] for r in rows] == [0, 3]


def _random_blocks(rng: random.Random, n_docs: int, S: int) -> Blocks:
    """Blocks packed from a batch of random token arrays (no tokenizer): any shape, any ids."""
    doc_pieces = np.array([rng.randint(1, 6) for _ in range(n_docs)], dtype=np.int64)
    lengths = np.array([rng.randint(1, 5) for _ in range(int(doc_pieces.sum()))], dtype=np.int64)
    batch = TokenizedBatch(
        doc_ids=[rng.choice(["a", "dé#1", "s3://b/k.jsonl#7", ""]) for _ in range(n_docs)],
        tokens=np.array([rng.randrange(9000) for _ in range(int(lengths.sum()))], np.int32),
        piece_lengths=lengths,
        piece_bytes=np.array([rng.randrange(2**40) for _ in lengths], dtype=np.int64),
        piece_words=np.array([rng.randrange(1000) for _ in lengths], dtype=np.int64),
        doc_pieces=doc_pieces,
    )
    packer = BlockPacker(S)
    full, last = packer.add(batch), packer.flush()
    return full if rng.random() < 0.5 or not len(last) else last


def test_blocks_table_is_the_plain_arrow_conversion() -> None:
    # Blocks.table() builds Arrow arrays from buffers (no pandas import); it must equal the
    # plain conversion of the same rows, non-ASCII and empty document ids included.
    rng = random.Random(5)
    for n_docs, S in ((0, 3), (1, 1), (7, 4), (20, 5)):
        blocks = _random_blocks(rng, n_docs, S)
        plain = pa.Table.from_pylist(_plain(blocks.rows()), schema=BLOCK_SCHEMA)
        assert blocks.table().equals(plain)


def test_writing_a_shard_never_imports_pandas() -> None:
    # pandas costs 0.4 s to import in every worker process that writes shards.
    code = (
        "import sys, random, tempfile, pyarrow.parquet as pq\n"
        "from tests.test_packing import _random_blocks\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    pq.write_table(_random_blocks(random.Random(1), 6, 3).table(), d + '/x.parquet')\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\n"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


def test_existing_tokenizer_gets_missing_special_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    p = tmp_path / "t.json"
    p.write_text(plain.to_str())
    loaded = load_tokenizer(str(p))
    assert set(loaded.special_ids) == set(SPECIAL_TOKENS)
    assert sorted(loaded.special_ids.values()) == [2, 3, 4]
    assert loaded.vocab_size == 5
    again = LoadedTokenizer.from_json(loaded.json)
    assert again.sha256 == loaded.sha256, "adding tokens is idempotent"


def test_tokenizer_that_is_not_json_fails_clearly(tmp_path: Path) -> None:
    from pipeline.tokenizer import TokenizerError

    p = tmp_path / "t.json"
    p.write_bytes(b"\x00\x01binary")
    with pytest.raises(TokenizerError, match=r"t\.json"):
        load_tokenizer(str(p))
