"""benchmarks/dedup.py measures cost on corpora with no copies in them: check that claim."""

from __future__ import annotations

import json
import random
from pathlib import Path

from benchmarks.dedup import Disguise, plant_copies, write_corpus
from pipeline.config import DedupConfig
from pipeline.fingerprints import Fingerprinter
from pipeline.text import normalise
from tests.conftest import make_document


def _texts(folder: Path) -> list[str]:
    return [json.loads(line)["text"] for p in sorted(folder.glob("*.jsonl")) for line in p.open()]


def test_the_cost_corpora_repeat_no_document_and_no_shingle(tmp_path: Path) -> None:
    rng = random.Random(4)
    records = [json.dumps({"text": make_document(rng)}) + "\n" for _ in range(30)]
    corpus = write_corpus(tmp_path / "c", records, Disguise(records), 0.1, 2)
    texts = _texts(tmp_path / "c")
    assert corpus["documents"] == len(texts) > 2 * len(records), "the records are repeated"
    fp = Fingerprinter.from_config(DedupConfig(mode="near"))
    exact = {fp.exact(normalise(t)) for t in texts}
    assert len(exact) == len(texts), "no exact copy"
    n = len(records)
    for i in range(n, len(texts)):  # each later repetition against the first
        a, b = set(fp.shingles([texts[i % n]])), set(fp.shingles([texts[i]]))
        assert len(a & b) / len(a | b) < 0.1
    keys = fp.band_keys(texts)
    seen: set[int] = set()
    for k in keys:
        assert not seen & set(k.tolist()), "no near copy either"
        seen |= set(k.tolist())
    # ... while the planted corpus holds what it says.
    planted = plant_copies(corpus, tmp_path / "p", 0.2)
    again = _texts(tmp_path / "p")
    assert len(again) - len(texts) == planted["planted_exact"] + planted["planted_near"]
    assert len({fp.exact(normalise(t)) for t in again}) == len(texts) + planted["planted_near"]
