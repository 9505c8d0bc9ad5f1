"""Tokenize + pack stages: property tests that nothing is lost, duplicated or mis-sized."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.counters import Counters
from pipeline.packing import BlockPacker, rows_to_table, tokenize_documents
from pipeline.text import normalise, split_sentences
from pipeline.tokenizer import SPECIAL_TOKENS, LoadedTokenizer, load_tokenizer
from tests.conftest import WORDS, make_sentence


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> LoadedTokenizer:
    return load_tokenizer(str(tokenizer_path))


def _pack(
    tok: LoadedTokenizer, docs: list[tuple[str, str]], S: int, M: int
) -> tuple[list[dict], dict]:
    counters = Counters()
    split = [(doc_id, split_sentences(normalise(text))) for doc_id, text in docs]
    tokenized = tokenize_documents(
        split,
        tok.tokenizer,
        eos_id=tok.special_ids["end_of_sentence"],
        eod_id=tok.special_ids["end_of_document"],
        max_sentence_tokens=M,
        counters=counters,
    )
    packer = BlockPacker(S)
    rows: list[dict] = []
    for d in tokenized:
        rows.extend(packer.add(d))
    rows.extend(packer.flush())
    return rows, dict(split)


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
    table = rows_to_table(rows)
    assert table.num_rows == 2 and table.schema.field("input_ids").type.value_type.bit_width == 32


def _rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        lengths = [rng.randint(1, 5) for _ in range(rng.randint(0, 4))]
        rows.append(
            {
                "input_ids": np.array([rng.randrange(9000) for _ in range(sum(lengths))], np.int32),
                "sentence_lengths": np.array(lengths, np.int32),
                "document_index": np.array(sorted(rng.randrange(3) for _ in lengths), np.int32),
                "num_bytes": rng.randrange(2**40),
                "num_words": rng.randrange(1000),
                "document_ids": [
                    rng.choice(["a", "dé#1", "s3://b/k.jsonl#7", ""]) for _ in lengths
                ],
                "first_sentence_offset": rng.randrange(50),
            }
        )
    return rows


def test_rows_to_table_is_the_plain_arrow_conversion() -> None:
    # rows_to_table builds Arrow arrays from buffers (no pandas import); it must equal the
    # plain conversion of the same rows, empty lists and non-ASCII ids included.
    import pyarrow as pa

    from pipeline.blocks import BLOCK_SCHEMA

    rng = random.Random(5)
    for n in (0, 1, 7):
        rows = _rows(rng, n)
        plain = pa.Table.from_pylist(
            [
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
                for r in rows
            ],
            schema=BLOCK_SCHEMA,
        )
        assert rows_to_table(rows).equals(plain)


def test_writing_a_shard_never_imports_pandas() -> None:
    # pandas costs 0.4 s to import in every worker process that writes shards.
    code = (
        "import sys, random, tempfile, pyarrow.parquet as pq\n"
        "from tests.test_packing import _rows\n"
        "from pipeline.packing import rows_to_table\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    pq.write_table(rows_to_table(_rows(random.Random(1), 4)), d + '/x.parquet')\n"
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
