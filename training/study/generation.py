"""Generation from trained models, measured fairly: prompts cut from held-out documents,
every mode on the same prompts and the same number of new tokens, one untimed warm-up per
mode, modes interleaved over the repeats (drift lands on all of them), median and range.

Also the text a model writes: seeded sampling from the same prompts, its natural sentence-end
rate and mean sentence length against the data's, and a few continuations to read. Torch only
(no Ray): the same code runs on a GPU machine without Ray, and in the demo.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from training.generation.decode import MODES, generate
from training.model import Transformer
from training.model.flops import decode_flops


@dataclass(frozen=True)
class SpeedRow:
    """One mode at one context: decode tokens/s over the repeats."""

    mode: str
    context: int
    """Prompt length asked for; the prompts are whole sentences up to it."""
    prompt_tokens: float
    """Mean tokens of the prompts used."""
    batch: int
    new_tokens: int
    """New tokens per prompt in each timed run."""
    tokens_per_s: list[float]
    """Decode tokens/s of each repeat (after the prefill; all prompts of the batch)."""
    prefill_s: list[float]
    """Seconds until the first new tokens, each repeat."""
    decode_flops_per_token: float
    """Analytic FLOPs of one decode step per sequence (mean over the batch's steps)."""
    cache_bytes: float | None
    """Cache held per sequence at the end (None: the mode keeps none)."""

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_tokens_per_s"] = self.median
        out["min_tokens_per_s"] = min(self.tokens_per_s)
        out["max_tokens_per_s"] = max(self.tokens_per_s)
        return out


@dataclass(frozen=True)
class TextStats:
    """What a model writes from held-out prompts (seeded sampling, kv mode)."""

    context: int
    new_tokens: int
    natural_end_rate: float
    """Sentences the model ended itself over all that ended (the rest hit M and were forced)."""
    sentences: int
    """Sentences completed over all prompts."""
    mean_sentence_tokens: float
    """Mean tokens of a completed sentence (EOS-S included); NaN if none completed."""
    stopped_at_eod: int
    """Prompts whose continuation ended the document."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """A few prompts' ends and their continuations, decoded."""


def document_tokens(rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """The token stream of every document of a split, sentences in order (a document may span
    several blocks; blocks are read in shard order, which is document order)."""
    docs: dict[str, list[int]] = {}
    for row in rows:
        ids = list(row["input_ids"])
        start = 0
        for length, k in zip(row["sentence_lengths"], row["document_index"], strict=True):
            doc = row["document_ids"][k]
            docs.setdefault(doc, []).extend(ids[start : start + length])
            start += length
    return list(docs.values())


def read_split_rows(
    data_uri: str, split: str, manifest: Any, storage: Any = None
) -> list[dict[str, Any]]:
    """Every row of a split with the columns prompts are cut from (held-out: small)."""
    import pyarrow.parquet as pq

    from pipeline.storage import filesystem_for

    cols = ["input_ids", "sentence_lengths", "document_index", "document_ids"]
    rows: list[dict[str, Any]] = []
    for uri in manifest.shard_uris(data_uri, split):
        fs, path = filesystem_for(uri, storage)
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=cols).to_pylist()
    return rows


def cut_prompts(
    documents: Sequence[Sequence[int]],
    context: int,
    n: int,
    *,
    eos_id: int,
    eod_id: int,
    seed: int,
) -> list[list[int]]:
    """``n`` prompts of whole sentences, each up to ``context`` tokens and at least 90% of it,
    ending at a sentence end (the model starts a new sentence), from different documents where
    there are enough, at seeded places. Fewer (possibly none) when the documents are short."""
    rng = random.Random(f"{seed}:{context}")
    candidates: list[list[tuple[int, int]]] = []
    for doc in documents:
        ends = [i + 1 for i, t in enumerate(doc) if t == eos_id]
        starts = [0, *ends[:-1]]
        spans = []
        for s in starts:
            # The last sentence end at or before s + context.
            j = int(np.searchsorted(ends, s + context, side="right")) - 1
            if j >= 0 and ends[j] > s and ends[j] - s >= 0.9 * context:
                span = (s, ends[j])
                if eod_id not in doc[span[0] : span[1]]:
                    spans.append(span)
        candidates.append(spans)
    usable = [(d, spans) for d, spans in enumerate(candidates) if spans]
    prompts: list[list[int]] = []
    rng.shuffle(usable)
    round_ = 0
    while len(prompts) < n and usable and round_ < n:
        for d, spans in usable:
            if len(prompts) == n:
                break
            s, e = spans[rng.randrange(len(spans))]
            prompts.append(list(documents[d][s:e]))
        round_ += 1
    return prompts


def sampling_kwargs(temperature: float, top_k: int, seed: int) -> dict[str, Any]:
    return {"temperature": temperature, "top_k": top_k, "seed": seed}


def measure_speed(
    model: Transformer,
    prompts: list[list[int]],
    *,
    context: int,
    new_tokens: int,
    repeats: int,
    sampling: dict[str, Any],
    modes: Sequence[str] | None = None,
) -> list[SpeedRow]:
    """Every mode of the model's architecture on the same prompts and token count: one untimed
    warm-up each, then ``repeats`` rounds with the mode order rotated each round."""
    c = model.config
    modes = list(modes or MODES[c.arch])
    # Every run generates exactly new_tokens per prompt: end-of-document is not sampled.
    kw = dict(sampling, stop_at_eod=False, suppress_tokens=(c.eod_id,))
    with torch.no_grad():
        for mode in modes:
            generate(model, prompts, max_new_tokens=min(4, new_tokens), mode=mode, **kw)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        prefill: dict[str, list[float]] = {m: [] for m in modes}
        last: dict[str, Any] = {}
        for r in range(repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                res = generate(model, prompts, max_new_tokens=new_tokens, mode=mode, **kw)
                steps = sum(len(t) - 1 for t in res.tokens)  # tokens after the first
                rates[mode].append(steps / max(res.seconds["decode"], 1e-9))
                prefill[mode].append(res.seconds["prefill"])
                last[mode] = res
    rows = []
    for mode in modes:
        res = last[mode]
        flops = [
            decode_flops(c, mode, p, t).total / max(1, len(t) - 1)
            for p, t in zip(res.prompts, res.tokens, strict=True)
        ]
        live = res.cache_bytes.get("live") if mode != "full" else None
        rows.append(
            SpeedRow(
                mode=mode,
                context=context,
                prompt_tokens=float(np.mean([len(p) for p in prompts])),
                batch=len(prompts),
                new_tokens=new_tokens,
                tokens_per_s=rates[mode],
                prefill_s=prefill[mode],
                decode_flops_per_token=float(np.mean(flops)),
                cache_bytes=float(live) if live is not None else None,
            )
        )
    return rows


def measure_text(
    model: Transformer,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    context: int,
    new_tokens: int,
    sampling: dict[str, Any],
    samples: int,
) -> TextStats:
    """Seeded sampling in kv mode from the prompts: sentence statistics and a few samples."""
    c = model.config
    with torch.no_grad():
        res = generate(model, prompts, max_new_tokens=new_tokens, mode="kv", **sampling)
    lengths: list[int] = []
    for row in res.tokens:
        n = 0
        for t in row:
            n += 1
            if t in (c.eos_id, c.eod_id):
                lengths.append(n)
                n = 0
    shown = []
    for prompt, new in list(zip(res.prompts, res.tokens, strict=True))[:samples]:
        shown.append(
            {
                "prompt_end": _decode_sentences(tokenizer, prompt, c.eos_id, last=2),
                "continuation": _decode_sentences(tokenizer, new, c.eos_id),
            }
        )
    return TextStats(
        context=context,
        new_tokens=new_tokens,
        natural_end_rate=res.natural_end_rate,
        sentences=len(lengths),
        mean_sentence_tokens=float(np.mean(lengths)) if lengths else float("nan"),
        stopped_at_eod=int(sum(res.stopped_at_eod)),
        samples=shown,
    )


def _decode_sentences(tokenizer: Any, ids: Sequence[int], eos_id: int, last: int = 0) -> str:
    """Decoded text, one sentence after another (``last``: only the last few sentences)."""
    sentences: list[list[int]] = [[]]
    for t in ids:
        if t == eos_id:
            sentences.append([])
        else:
            sentences[-1].append(int(t))
    sentences = [s for s in sentences if s]
    if last:
        sentences = sentences[-last:]
    return " ".join(tokenizer.decode(s, skip_special_tokens=True).strip() for s in sentences)
