"""Scoring packed blocks with a model: per-block NLL sums, prepacking, micro-averaged metrics.

No Ray here (the Ray Data wiring is ``training.eval.job``): every function takes a batch of
block rows (a pyarrow Table/RecordBatch, a dict of columns or a list of row dicts, as
``collate_blocks`` does) and returns numpy arrays, so tests call them directly.

Two ways to lay blocks out for the forward pass, which give the same numbers:

* ``pad``: one block per row, right-padded to the longest block of the forward
  (``collate_blocks``).
* ``prepack``: first-fit decreasing of the blocks into rows of ``token_budget`` tokens. Each
  block keeps its own documents and sentences (its document and sentence ids are offset by
  those already in the row), so attention, RoPE positions (which restart per document and
  sentence) and labels (never across documents) are exactly those of the padded layout.

Metrics come from sums (micro-average): token perplexity = exp(NLL / targets), bits per byte =
NLL / ln 2 / bytes, word perplexity = exp(NLL / words).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.data.collate import IGNORE_INDEX, _flatten, collate_blocks

BATCHINGS = ("prepack", "pad")
SUM_FIELDS = (
    "nll",
    "targets",
    "eos_targets",
    "eos_correct",
    "prune_kept",
    "prune_live",
    "prune_pairs",
    "prune_queries",
)
"""What ``score_blocks`` returns per block; the counts (tokens, bytes, ...) come from columns."""
FLOAT_FIELDS = ("nll", "prune_kept")


@dataclass
class Sums:
    """Additive totals over blocks; every metric is derived from these, never averaged."""

    rows: int = 0
    tokens: int = 0
    """Input tokens (what the manifest counts)."""
    targets: int = 0
    """Scored positions: tokens with a next token in the same document and block."""
    sentences: int = 0
    bytes: int = 0
    words: int = 0
    nll: float = 0.0
    """Summed negative log-likelihood (nats) over the targets."""
    eos_targets: int = 0
    """Targets whose label is the end-of-sentence id."""
    eos_correct: int = 0
    """... of which the argmax of the logits was that id."""
    prune_kept: float = 0.0
    """Pruning models scored with their gates, over all pruned layers: keep summed over the
    gated (query, key) pairs ..."""
    prune_live: int = 0
    """... the pairs still live (keep > 0: what an evicting cache holds) ..."""
    prune_pairs: int = 0
    """... all gated pairs (what a cache holds without pruning) ..."""
    prune_queries: int = 0
    """... and query positions (each query's own key, always kept)."""

    def __add__(self, other: Sums) -> Sums:
        return Sums(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.targets) if self.targets else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words) if self.words else math.nan

    @property
    def eos_accuracy(self) -> float:
        return self.eos_correct / self.eos_targets if self.eos_targets else math.nan

    @property
    def kept_fraction(self) -> float:
        """Soft: the keep the gates gave, over the interactions they gate (nan: no pruning)."""
        return self.prune_kept / self.prune_pairs if self.prune_pairs else math.nan

    @property
    def cache_fraction(self) -> float:
        """Cache entries an evicting cache holds over those it holds without pruning, summed
        over the query positions of the pruned layers (own keys included; nan: no pruning)."""
        full = self.prune_pairs + self.prune_queries
        return (self.prune_live + self.prune_queries) / full if self.prune_queries else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "token_perplexity": self.token_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
            "eos_accuracy": self.eos_accuracy,
            "kept_fraction": self.kept_fraction,
            "cache_fraction": self.cache_fraction,
        }


# --------------------------------------------------------------------------------------------
# Prepacking


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= ``budget`` (an item longer than the budget
    gets a bin of its own). Deterministic: ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    return bins


def _rows_as_lists(rows: Any) -> dict[str, list[np.ndarray]]:
    """Per-block arrays of the three list columns (split from ``collate_blocks``' flattening)."""
    f = _flatten(rows)
    split = lambda a, n: np.split(a, np.cumsum(n)[:-1]) if len(n) else []  # noqa: E731
    return {
        "input_ids": split(f.ids, f.row_tokens),
        "sentence_lengths": split(f.sentence_lengths, f.row_sentences),
        "document_index": split(f.document_index, f.row_doc_entries),
    }


def prepack_blocks(
    rows: Any, *, pad_id: int, token_budget: int, pad_to_multiple: int = 8
) -> tuple[Any, np.ndarray]:
    """Pack blocks into rows of <= ``token_budget`` tokens (or of the longest block, if longer).

    Returns the ``PackedBatch`` and a (B, T) int64 array: the index of the block (in ``rows``)
    each position belongs to, -1 on padding.
    """
    cols = _rows_as_lists(rows)
    lengths = [len(x) for x in cols["input_ids"]]
    # A block longer than the budget sets the batch's width anyway: let the other rows fill
    # up to it instead of padding to it.
    bins = first_fit_decreasing(lengths, max(token_budget, *lengths) if lengths else token_budget)
    packed: dict[str, list[np.ndarray]] = {k: [] for k in cols}
    owners: list[np.ndarray] = []
    for members in bins:
        docs = 0
        ids, sl, di, own = [], [], [], []
        for i in members:
            ids.append(cols["input_ids"][i])
            sl.append(cols["sentence_lengths"][i])
            doc = cols["document_index"][i]
            base = int(doc.min()) if len(doc) else 0
            di.append(doc - base + docs)  # distinct documents per block: no label crosses
            docs += int(doc.max()) - base + 1 if len(doc) else 0
            own.append(np.full(len(cols["input_ids"][i]), i, dtype=np.int64))
        packed["input_ids"].append(np.concatenate(ids))
        packed["sentence_lengths"].append(np.concatenate(sl))
        packed["document_index"].append(np.concatenate(di))
        owners.append(np.concatenate(own))
    batch = collate_blocks(packed, pad_id=pad_id, pad_to_multiple=pad_to_multiple)
    owner = np.full(tuple(batch.input_ids.shape), -1, dtype=np.int64)
    for r, row_owner in enumerate(owners):
        owner[r, : len(row_owner)] = row_owner
    return batch, owner


def pad_blocks(rows: Any, *, pad_id: int, pad_to_multiple: int = 8) -> tuple[Any, np.ndarray]:
    """One block per row (``collate_blocks``); same return shape as ``prepack_blocks``."""
    batch = collate_blocks(rows, pad_id=pad_id, pad_to_multiple=pad_to_multiple)
    B = batch.input_ids.shape[0]
    owner = np.where(batch.sentence_ids.numpy() >= 0, np.arange(B)[:, None], -1)
    return batch, owner.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def _score_layout(
    model: nn.Module, batch: Any, owner: np.ndarray, n_blocks: int, eos_id: int, device: Any
) -> dict[str, np.ndarray]:
    batch = batch.to(device)
    logits = model(batch.input_ids, batch.sentence_ids, batch.document_ids).float()  # (B, T, V)
    pruning = getattr(model, "last_pruning", None)
    labels = batch.labels  # (B, T)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, safe[..., None])[..., 0]  # (B, T)
    is_eos = valid & (labels == eos_id)
    correct = is_eos & (logits.argmax(dim=-1) == labels)
    own = torch.from_numpy(owner).to(device).clamp(min=0).reshape(-1)  # (B*T,)

    def per_block(x: Tensor, dtype: torch.dtype) -> np.ndarray:
        out = torch.zeros(n_blocks, dtype=dtype, device=device)
        out.index_add_(0, own, (x * valid).reshape(-1).to(dtype))
        return out.cpu().numpy()

    out = {
        "nll": per_block(nll.double(), torch.float64),
        "targets": per_block(valid, torch.int64),
        "eos_targets": per_block(is_eos, torch.int64),
        "eos_correct": per_block(correct, torch.int64),
    }
    zeros = np.zeros(n_blocks)
    out.update(prune_kept=zeros, prune_live=zeros, prune_pairs=zeros, prune_queries=zeros)
    if pruning is not None and pruning.query_sums:
        real = batch.sentence_ids >= 0  # every real token is a query of each pruned layer
        per_query = torch.stack(list(pruning.query_sums.values())).sum(0)  # (B, T, 3)
        queries = real.double() * len(pruning.query_sums)
        for name, x in (
            ("prune_kept", per_query[..., 0].double()),
            ("prune_live", per_query[..., 1].double()),
            ("prune_pairs", per_query[..., 2].double()),
            ("prune_queries", queries),
        ):
            total = torch.zeros(n_blocks, dtype=torch.float64, device=device)
            total.index_add_(0, own, (x * real).reshape(-1))
            out[name] = total.cpu().numpy()
    for name in ("prune_live", "prune_pairs", "prune_queries"):
        out[name] = np.rint(out[name]).astype(np.int64)
    return out


def score_blocks(
    model: nn.Module,
    rows: Any,
    *,
    pad_id: int,
    eos_id: int,
    batching: str = "prepack",
    token_budget: int = 1024,
    device: Any = "cpu",
) -> dict[str, np.ndarray]:
    """Per-block sums (``SUM_FIELDS``) for a batch of blocks, scored in one forward.

    ``prepack``: the blocks are first-fit-decreasing packed into rows of ``token_budget``
    tokens; ``pad``: one block per row. Labels are those of ``collate_blocks`` (the next token
    of the same document), so both layouts score the same positions.
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if batching == "prepack":
        batch, owner = prepack_blocks(rows, pad_id=pad_id, token_budget=token_budget)
    else:
        batch, owner = pad_blocks(rows, pad_id=pad_id)
    n_blocks = int(owner.max()) + 1
    return _score_layout(model, batch, owner, n_blocks, eos_id, device)


def block_counts(rows: Any) -> dict[str, np.ndarray]:
    """Per-block counts straight from the columns: tokens, sentences, bytes, words."""
    f = _flatten(rows)
    words = _column(rows, "num_words", len(f.row_tokens))
    return {
        "tokens": f.row_tokens.astype(np.int64),
        "sentences": f.row_sentences.astype(np.int64),
        "bytes": np.asarray(f.num_bytes, dtype=np.int64),
        "words": words,
    }


def _column(rows: Any, name: str, n: int) -> np.ndarray:
    if hasattr(rows, "schema") and hasattr(rows, "column"):
        if name not in rows.schema.names:
            raise ValueError(f"the blocks lack the {name!r} column (re-run preprocessing)")
        return np.asarray(rows.column(name).to_numpy(zero_copy_only=False), dtype=np.int64)
    if isinstance(rows, dict):
        if name not in rows:
            raise ValueError(f"the blocks lack the {name!r} column (re-run preprocessing)")
        return np.asarray(rows[name], dtype=np.int64)
    return np.asarray([r[name] for r in rows], dtype=np.int64).reshape(n)


def sums_of(per_block: dict[str, np.ndarray]) -> Sums:
    """Totals of per-block arrays (``score_blocks`` + ``block_counts``)."""
    n = len(next(iter(per_block.values())))
    totals: dict[str, Any] = {
        k: float(np.sum(per_block[k], dtype=np.float64)) for k in FLOAT_FIELDS
    }
    for k in ("tokens", "sentences", "bytes", "words", *SUM_FIELDS):
        if k not in FLOAT_FIELDS:
            totals[k] = int(np.sum(per_block[k]))
    return Sums(rows=n, **totals)


def evaluate_rows(
    model: nn.Module,
    rows: Any,
    *,
    pad_id: int,
    eos_id: int,
    batching: str = "prepack",
    token_budget: int = 1024,
    device: Any = "cpu",
) -> Sums:
    """Score a batch of blocks and return its totals (tests, benchmarks; no Ray)."""
    scored = score_blocks(
        model,
        rows,
        pad_id=pad_id,
        eos_id=eos_id,
        batching=batching,
        token_budget=token_budget,
        device=device,
    )
    return sums_of({**scored, **block_counts(rows)})
