"""Loader of the gpthf_sample task: a local JSONL file as a ``datasets`` test split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(path: str | None = None, **_: Any) -> Any:
    """``{"test": Dataset}`` of the ``text`` field of each line of ``path`` (default: the
    sample beside this file)."""
    import datasets

    source = Path(path) if path else HERE / "gpthf_sample.jsonl"
    rows = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{source}:{n}: not a JSON object with a 'text' field") from exc
            rows.append({"text": str(text)})
    if not rows:
        raise ValueError(f"{source}: no documents")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's three perplexity metrics over the raw text, plus ``gpthf_bits_per_byte``: the
    same log-likelihood over the bytes ``gpthf eval`` counts (the normalised sentence texts,
    without the whitespace between sentences), so the two tools can be compared number to
    number."""
    from pipeline.text import normalise, split_sentences

    (ll,) = results
    text = doc["text"]
    raw = len(text.encode("utf-8"))
    words = len(re.split(r"\s+", text))
    gpthf_bytes = sum(len(s.encode("utf-8")) for s in split_sentences(normalise(text)))
    return {
        "word_perplexity": (ll, words),
        "byte_perplexity": (ll, raw),
        "bits_per_byte": (ll, raw),
        "gpthf_bits_per_byte": (ll, gpthf_bytes),
    }
