"""Attention patterns of GPTHF and the GPT baseline (imports only torch).

Every block computes its queries, keys and values the same way; what differs between the
architectures (and between training and cached generation) is *which keys a query sees* and
*which RoPE positions the tokens get*. An ``Attention`` object captures both for one forward
pass: it is built once from the batch's sentence and document ids and then called by every
block of a stage with that block's ``(B, T, H, hd)`` queries, keys and values.

Patterns for a full forward over packed rows:

* ``DocumentCausalAttention`` (GPT): causal within each document; positions restart at every
  document. Documents are gathered into short sequences grouped by length (``RunRouting``) and
  attended with ``is_causal`` SDPA; rows that each hold one document are attended as they are.
* ``SentenceAttention`` (GPTHF encoder): causal within each sentence; positions restart at
  every sentence. Sentences are gathered the same way: no T x T anything.
* ``SentenceEndAttention`` (GPTHF body): each token attends the keys at the ends of the earlier
  sentences of its document plus its own key, document by document (queries of a document
  against that document's ends). Positions are the sentence index within the document.

No pattern materialises a T x T mask or score matrix (tests/test_model_attention.py records
every tensor of a forward and backward). On CUDA the gathered causal sequences run on SDPA's
flash kernel.

The same three patterns with FlexAttention (``ModelConfig.attention == "flex"``;
``FlexAttention``): the rows stay as they are, and one ``BlockMask`` per stage, built from
per-token document, sentence and end ids, tells the fused kernel which (query, key) blocks to
compute. No routing plan, so no host sync; but the kernel is compiled (CUDA), its backward does
not run on CPU (torch 2.13), and on CPU the eager forward scores the full T x T (tests and CPU
generation only).

Patterns for generation (per-sequence state lives in the caches; see ``training.generation.decode``):

* ``CausalAttention``: plain causal SDPA over right-padded rows with given positions.
* ``KVCacheAttention``: one new token per row against a per-layer K/V cache. The GPT caches
  every token; the GPTHF encoder the current sentence; the GPTHF body the sentence ends, and
  the new token's own key sits in the slot after them, so "earlier ends + self" is again a
  prefix of the cache.

Padding is always at the end of a row (``sentence_ids == -1``); padded positions produce
finite garbage that no real position ever attends.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from training.model.pruning import NEG_INF, Gate, PruningRecord, running_keep

KV = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# RoPE


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> KV:
    """cos, sin of shape (B, T, 1, hd/2) for integer positions (B, T), computed in fp32."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (exponent / head_dim)  # (hd/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # (B, T, 1, hd/2)


# --------------------------------------------------------------------------------------------
# Small helpers over (B, T) id tensors


def run_starts(*keys: Tensor) -> Tensor:
    """(B, T) bool: position t starts a new run of equal keys (t == 0 or any key changed)."""
    start = torch.ones_like(keys[0], dtype=torch.bool)
    change = torch.zeros_like(start[:, 1:])
    for key in keys:
        change |= key[:, 1:] != key[:, :-1]
    start[:, 1:] = change
    return start


def position_in_run(start: Tensor) -> tuple[Tensor, Tensor]:
    """Offset of each position from the start of its run, and that start's index; (B, T) each."""
    t = torch.arange(start.shape[1], device=start.device).expand_as(start)
    first = torch.where(start, t, 0).cummax(dim=1).values
    return t - first, first


# Every SDPA call of the model and its caches goes through ``attend``. On CUDA it leaves out
# cuDNN's attention, which torch (2.11 at least) prefers for bf16 on Hopper but which builds an
# execution plan for every new shape: measured on an H200 by gpu-check's profile (2026-12-04),
# ~11 ms of host time per call, 0.97 s of a 1.25 s gpt-12 training step (device busy 18%),
# because the routed groups (and a decode step's KV length) change shape all the time. Flash
# takes causal and unmasked calls, memory-efficient the masked ones; math stays as the fallback.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """F.scaled_dot_product_attention on (B, H, T, hd) tensors, with the backends chosen above."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """SDPA on (B, T, H, hd) tensors, returning (B, T, H, hd)."""
    out = attend(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    )  # (B, H, T, hd)
    return out.transpose(1, 2)


ENDS_CHUNK_ELEMENTS = 1 << 24
"""Without autograd, the body attention scores at most this many (query, end) pairs x heads at
once (64 MiB in fp32): its scores are T x N per document, and N grows with T, so a long
prompt's prefill would otherwise need memory quadratic in its length (a 32k-token prompt of
25-token sentences: 1280 ends x 32k queries per head)."""


def attend_ends_and_self(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ends: Tensor,
    v_ends: Tensor,
    allowed: Tensor,
    keep: Tensor | None = None,
) -> Tensor:
    """``_attend_ends_and_self`` in chunks of queries where no gradient is needed (prefill,
    evaluation) and the scores would exceed ``ENDS_CHUNK_ELEMENTS``; each query's result does
    not depend on the others. Training keeps one call: autograd saves every chunk anyway."""
    B, H, T, _ = q.shape
    per_query = B * H * (k_ends.shape[-2] + 1)
    if torch.is_grad_enabled() or T * per_query <= ENDS_CHUNK_ELEMENTS:
        return _attend_ends_and_self(q, k, v, k_ends, v_ends, allowed, keep)
    step = max(1, ENDS_CHUNK_ELEMENTS // per_query)
    return torch.cat(
        [
            _attend_ends_and_self(
                q[:, :, i : i + step],
                k[:, :, i : i + step],
                v[:, :, i : i + step],
                k_ends,
                v_ends,
                allowed[:, :, i : i + step],
                None if keep is None else keep[:, :, i : i + step],
            )
            for i in range(0, T, step)
        ],
        dim=2,
    )  # (B, H, T, hd)


def _attend_ends_and_self(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ends: Tensor,
    v_ends: Tensor,
    allowed: Tensor,
    keep: Tensor | None = None,
) -> Tensor:
    """The body attention core over packed rows.

    q, k, v: (B, H, T, hd), the tokens' own projections; k_ends, v_ends: (B, H, N, hd), keys and
    values at sentence ends; allowed: (B, 1 or H, T, N) bool. Each query attends the allowed
    ends plus its own key, with one softmax over both: O(T * N), never T x T. (Each query has
    a different "self" key, so this is not one SDPA call; in generation, with one query per row,
    it is: see ``KVCacheAttention``.) ``keep``: (B, 1, T, N) log keep of a pruned layer, added
    to the ends' logits (the own key is always kept). Returns (B, H, T, hd).
    """
    scale = q.shape[-1] ** -0.5
    scores_ends = (q @ k_ends.transpose(-1, -2)) * scale  # (B, H, T, N)
    if keep is not None:
        scores_ends = scores_ends + keep.to(scores_ends.dtype)
    scores_ends = scores_ends.masked_fill(~allowed, float("-inf"))
    score_self = (q * k).sum(dim=-1, keepdim=True) * scale  # (B, H, T, 1)
    scores = torch.cat([scores_ends, score_self], dim=-1)  # (B, H, T, N+1)
    # Softmax in the activation dtype: the kernels accumulate in fp32 internally, and autograd
    # then saves bf16 probabilities, not an fp32 (B, H, T, N+1) tensor, in bf16 training.
    probs = scores.softmax(dim=-1)
    return probs[..., :-1] @ v_ends + probs[..., -1:] * v  # (B, H, T, hd)


# --------------------------------------------------------------------------------------------
# Patterns


class Attention:
    """RoPE tables plus an attention pattern for one forward; called by each block.

    ``capture``: when a dict, each call stores what a generation cache needs, per layer index.
    ``pruning``: where the pruned layers record what they kept (``Transformer.hidden_states``
    sets it when the model prunes). A block of a pruned layer passes its ``Gate``.
    """

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos, self.sin = cos, sin  # (B, T, 1, hd/2)
        self.capture: dict[int, KV] | None = None
        self.pruning: PruningRecord | None = None
        self._tables: dict[torch.dtype, KV] = {}

    def rotate(self, x: Tensor) -> Tensor:
        """RoPE on x (B, T, ..., hd), e.g. queries and keys stacked as (B, T, 2, H, hd)."""
        if x.dtype not in self._tables:  # once per forward, not per layer
            cos = torch.cat([self.cos, self.cos], dim=-1)  # (B, T, 1, hd)
            sin = torch.cat([-self.sin, self.sin], dim=-1)
            self._tables[x.dtype] = (cos.to(x.dtype), sin.to(x.dtype))
        cos, sin = self._tables[x.dtype]
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([x2, x1], dim=-1) * sin  # (x1 cos - x2 sin, x2 cos + x1 sin)

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        raise NotImplementedError

    def _record(
        self,
        layer: int,
        log_keeps: list[Tensor],
        gateds: list[Tensor],
        routing: RunRouting,
        k_int: Tensor,
    ) -> None:
        """Add a pruned layer's keep (per routing group: (n, L, keys) log keep and gated pairs)
        to ``pruning``; per query position too when it asks, and when capturing, the log keeps
        and the (B, keys, r) interaction keys at the ends of the row (for the caches of
        generation, whose rows are single runs: one group of (B, T, keys))."""
        record = self.pruning
        if record is None:
            raise ValueError("a pruned layer ran without a PruningRecord (attention.pruning)")
        for log_keep, gated in zip(log_keeps, gateds, strict=True):
            record.add(layer, log_keep, gated)
        if record.per_query:
            sums = [
                torch.stack(
                    [
                        torch.where(g, lk.exp(), 0.0).sum(-1),
                        (g & (lk > NEG_INF)).sum(-1).float(),
                        g.sum(-1).float(),
                    ],
                    dim=-1,
                )
                for lk, g in zip(log_keeps, gateds, strict=True)
            ]  # (n, L, 3) per group
            record.query_sums[layer] = routing.scatter(sums)  # (B, T, 3)
        if record.capture:
            record.keep[layer] = log_keeps
            record.k_int[layer] = k_int


def no_gate(pattern: Attention, gate: Gate | None) -> None:
    if gate is not None:
        raise ValueError(
            f"{type(pattern).__name__} does not prune: a pruned layer needs the document "
            "(GPT) or sentence-end (GPTHF body) pattern, or generation mode kv"
        )


class CausalAttention(Attention):
    """Causal SDPA over right-padded rows (pads come after every real token, so are never seen)."""

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        no_gate(self, gate)
        if self.capture is not None:
            self.capture[layer] = (k, v)
        return sdpa(q, k, v, causal=True)


@dataclass
class RunRouting:
    """Tokens of a packed batch regrouped into short sequences, one per *run* (a sentence for
    the GPTHF encoder, a document for the GPT and the GPTHF body), so that attention within a
    run is ordinary causal attention over short rows: no T x T mask, and fused SDPA kernels
    apply (flash on CUDA, the flash CPU kernel here).

    Runs are grouped by length (powers of two; every run of <= ``MIN_BUCKET`` tokens in one
    group), so padding costs at most 2x inside a group and a forward makes one SDPA call per
    group: about log2(T / 16) calls, not one per run. The grouping is planned on the host
    once per forward (two small syncs: the run starts and lengths) and shared by every layer.

    ``groups`` is None when each row is already a single run starting at position 0: the rows
    themselves are then the sequences (trailing padding is never seen by a causal query).
    """

    MIN_BUCKET = 16

    valid: Tensor  # (B, T) bool, real tokens
    groups: list[Tensor] | None  # per group (n, L) flat token index of each slot
    to_token: Tensor | None  # (B * T,) index into the groups' concatenated slots; 0 on pads
    run_first: Tensor  # (R,) flat index of each run's first token, in order
    run_length: list[int]  # host copy of each run's length
    group_runs: list[Tensor]  # per group (n,) run ids, on the host
    _real_slots: list[Tensor] | None = None  # real_slots(), made once per forward

    @classmethod
    def build(cls, start: Tensor, valid: Tensor) -> RunRouting:
        """start: (B, T) bool, a real token that begins a run; valid: (B, T) real tokens."""
        B, T = start.shape
        device = start.device
        flat_valid = valid.flatten()
        flat_start = (start & valid).flatten()
        run_of = (flat_start.cumsum(0) - 1).clamp(min=0)  # (B*T,) run of each real token
        first = flat_start.nonzero().squeeze(1)  # (R,)
        n_runs = first.shape[0]
        if n_runs == 0:
            raise ValueError("a batch with no real token: every sentence id is -1 (padding)")
        length = torch.zeros(n_runs, dtype=torch.long, device=device)
        length.scatter_add_(0, run_of, flat_valid.long())
        row_runs = (start & valid).sum(dim=1)
        single, prefix = torch.stack(
            [(row_runs == 1).all(), (valid[:, 1:] <= valid[:, :-1]).all()]
        ).tolist()
        host_length = length.cpu()
        if single and prefix:  # one run per row, from position 0: the rows are the runs
            return cls(valid, None, None, first, host_length.tolist(), [torch.arange(n_runs)])
        bucket = torch.ceil(torch.log2(host_length.clamp(min=cls.MIN_BUCKET).double())).long()
        order = torch.argsort(bucket, stable=True)
        _, counts = torch.unique_consecutive(bucket[order], return_counts=True)
        concat_start = torch.zeros(n_runs, dtype=torch.long)  # host
        groups, group_runs, base = [], [], 0
        for runs in order.split(counts.tolist()):
            group_runs.append(runs)
            L = int(host_length[runs].max())
            concat_start[runs] = base + torch.arange(runs.shape[0]) * L
            base += runs.shape[0] * L
            runs_dev = runs.to(device)
            slot = torch.arange(L, device=device)
            # Slots past a run's end repeat its first token: keys only of later (padded)
            # query slots under the causal mask, so never seen by a real query.
            offset = torch.where(slot < length[runs_dev, None], slot, 0)  # (n, L)
            groups.append(first[runs_dev, None] + offset)
        pos = torch.arange(B * T, device=device) - first[run_of]
        to_token = torch.where(flat_valid, concat_start.to(device)[run_of] + pos, 0)
        return cls(valid, groups, to_token, first, host_length.tolist(), group_runs)

    def gather(self, x: Tensor) -> list[Tensor]:
        """(B, T, ...) -> one (n, L, ...) tensor per group."""
        if self.groups is None:
            return [x]
        flat = x.reshape(-1, *x.shape[2:])
        return [flat[index] for index in self.groups]

    def scatter(self, outs: list[Tensor]) -> Tensor:
        """Inverse of ``gather`` for per-slot outputs; padded positions get zeros."""
        if self.groups is None:
            (out,) = outs
        else:
            assert self.to_token is not None
            cat = torch.cat([o.reshape(-1, *o.shape[2:]) for o in outs])
            out = cat[self.to_token].view(*self.valid.shape, *cat.shape[1:])
        mask = self.valid.view(*self.valid.shape, *[1] * (out.dim() - 2))
        return out.masked_fill(~mask, 0.0)

    def causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention within each run; (B, T, H, hd) in and out."""
        outs = [
            sdpa(qg, kg, vg, causal=True)
            for qg, kg, vg in zip(self.gather(q), self.gather(k), self.gather(v), strict=True)
        ]
        return self.scatter(outs)

    def real_slots(self) -> list[Tensor]:
        """Per group (n, L) bool: the slot holds a token of its run (not padding). Made on the
        first call and kept: every pruned layer asks, and making it copies host data to the
        device (which would stall the stream once per layer on CUDA)."""
        if self.groups is None:
            return [self.valid]
        if self._real_slots is None:
            device = self.valid.device
            length = torch.tensor(self.run_length, device=device)
            self._real_slots = [
                torch.arange(g.shape[1], device=device)[None, :] < length[runs.to(device), None]
                for g, runs in zip(self.groups, self.group_runs, strict=True)
            ]
        return self._real_slots

    def causal_pruned(
        self, q: Tensor, k: Tensor, v: Tensor, gate: Gate, record: Attention, layer: int
    ) -> Tensor:
        """``causal`` with the keep mask of a pruned layer added to the logits (per run: a
        (L, L) gate matrix, as large as the run's attention scores)."""
        outs, keeps, gateds = [], [], []
        for qg, kg, vg, qi, ki, real in zip(
            self.gather(q),
            self.gather(k),
            self.gather(v),
            self.gather(gate.q_int),
            self.gather(gate.k_int),
            self.real_slots(),
            strict=True,
        ):
            L = qg.shape[1]
            t = torch.arange(L, device=qg.device)
            earlier = t[None, :] < t[:, None]  # (L, L) key before query
            gated = earlier[None] & real[:, :, None]  # (n, L, L)
            log_keep = running_keep(gate.log_gates(qi, ki, gated), gated)  # (n, L, L)
            keeps.append(log_keep)
            gateds.append(gated)
            bias = torch.where(
                earlier, log_keep, torch.where(t[None, :] == t[:, None], 0.0, NEG_INF)
            )
            outs.append(sdpa(qg, kg, vg, mask=bias[:, None].to(qg.dtype)))
        record._record(layer, keeps, gateds, self, gate.k_int)
        return self.scatter(outs)


def _document_runs(
    sentence_ids: Tensor, document_ids: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """valid, document (-1 on pads) and document-start tensors, (B, T) each."""
    valid = sentence_ids >= 0
    doc = document_ids if document_ids is not None else torch.where(valid, 0, -1)
    doc = torch.where(valid, doc, -1)
    return valid, doc, run_starts(doc)


@dataclass
class SentenceRuns:
    """Per-token sentence and document structure of packed rows, from device ops alone (no host
    sync): what both attention backends derive their positions and masks from."""

    valid: Tensor  # (B, T) bool, real tokens
    new_doc: Tensor  # (B, T) bool, starts a document run (trailing pads: one run of their own)
    new_sent: Tensor  # (B, T) bool, starts a sentence run (a document start always does)
    token_pos: Tensor  # (B, T) position within the sentence (encoder RoPE)
    sentence_pos: Tensor  # (B, T) sentence index within the document (body RoPE)
    is_end: Tensor  # (B, T) bool, last real token of its sentence run

    @classmethod
    def build(cls, sentence_ids: Tensor, document_ids: Tensor | None) -> SentenceRuns:
        valid, doc, new_doc = _document_runs(sentence_ids, document_ids)
        new_sent = run_starts(sentence_ids, doc)  # pads form their own runs too
        token_pos, _ = position_in_run(new_sent)
        _, doc_first = position_in_run(new_doc)
        sent_run = new_sent.cumsum(dim=1)  # (B, T) sentence run number within the row
        sentence_pos = sent_run - sent_run.gather(1, doc_first)
        is_end = valid.clone()
        is_end[:, :-1] &= new_sent[:, 1:]  # last token of its run
        return cls(valid, new_doc, new_sent, token_pos, sentence_pos, is_end)


def row_end_positions(is_end: Tensor, n_row_ends: int) -> Tensor:
    """(B, N) position of each sentence end of a row, in order (0 where a row has fewer than
    N = ``n_row_ends`` >= 1 ends): the body's ends for the generation caches (``capture``)."""
    B, T = is_end.shape
    rank = is_end.cumsum(dim=1) - 1  # (B, T)
    t = torch.arange(T, device=is_end.device).expand(B, T)
    end_pos = torch.zeros(B, n_row_ends + 1, dtype=torch.long, device=is_end.device)
    end_pos.scatter_(1, torch.where(is_end, rank, n_row_ends), t)
    return end_pos[:, :n_row_ends]


class DocumentCausalAttention(Attention):
    """GPT: causal within each document, each document attended as its own short sequence."""

    def __init__(self, cos: Tensor, sin: Tensor, routing: RunRouting) -> None:
        super().__init__(cos, sin)
        self.routing = routing

    @classmethod
    def build(cls, sentence_ids: Tensor, document_ids: Tensor | None, head_dim: int, theta: float):
        valid, _, new_doc = _document_runs(sentence_ids, document_ids)
        doc_pos, _ = position_in_run(new_doc)  # (B, T) token index within its document
        routing = RunRouting.build(new_doc, valid)
        return cls(*rope_tables(doc_pos, head_dim, theta), routing)

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        if self.capture is not None:
            self.capture[layer] = (k, v)
        if gate is not None:
            return self.routing.causal_pruned(q, k, v, gate, self, layer)
        return self.routing.causal(q, k, v)


@dataclass
class SentenceLayout:
    """Routing of one GPTHF forward, built once (a few small host syncs) and shared by all its layers.

    The encoder attends within sentences (``sentences``); the body attends, per document
    (``documents``), from each token to the ends of its document's earlier sentences: its cost
    is sum over documents of tokens x sentences, linear in the keys each query may see.
    """

    valid: Tensor  # (B, T) bool, real tokens
    token_pos: Tensor  # (B, T) position within the sentence (encoder RoPE)
    sentence_pos: Tensor  # (B, T) sentence index within the document (body RoPE)
    sentences: RunRouting  # one run per sentence
    documents: RunRouting  # one run per document
    doc_ends: list[Tensor]  # per document group (n, N_g): flat token index of each end
    doc_allowed: list[Tensor]  # per document group (n, 1, L, N_g) bool: end j < own sentence
    end_pos: Tensor  # (B, N) position of each sentence end of a row, in order (0 where none)

    @classmethod
    def build(cls, sentence_ids: Tensor, document_ids: Tensor | None = None) -> SentenceLayout:
        B, T = sentence_ids.shape
        device = sentence_ids.device
        tokens = SentenceRuns.build(sentence_ids, document_ids)
        valid, new_doc, new_sent = tokens.valid, tokens.new_doc, tokens.new_sent
        is_end, token_pos, sentence_pos = tokens.is_end, tokens.token_pos, tokens.sentence_pos

        sentences = RunRouting.build(new_sent, valid)
        documents = RunRouting.build(new_doc, valid)

        # Body: the ends of each document in order. End j of a document closes its sentence j,
        # so a token of sentence i may see exactly the ends j < i.
        flat_end = is_end.flatten()
        end_count = flat_end.long().cumsum(0)  # (B*T,) ends up to and including each position
        first = documents.run_first  # (R,)
        doc_of = ((new_doc & valid).flatten().cumsum(0) - 1).clamp(min=0)  # (B*T,)
        ends_before = end_count[first] - flat_end[first].long()  # (R,) ends of earlier documents
        rank_in_doc = end_count - 1 - ends_before[doc_of]  # (B*T,) meaningful where flat_end
        ends_per_doc = torch.zeros(len(documents.run_length), dtype=torch.long, device=device)
        ends_per_doc.scatter_add_(0, doc_of, flat_end.long())
        host = torch.cat([ends_per_doc, is_end.sum(dim=1).max()[None]]).cpu()  # one sync
        host_ends, n_row_ends = host[:-1], max(int(host[-1]), 1)
        n_max = max(int(host_ends.max()) if len(host_ends) else 0, 1)
        end_table = torch.zeros(max(len(host_ends), 1), n_max + 1, dtype=torch.long, device=device)
        end_table[torch.where(flat_end, doc_of, 0), torch.where(flat_end, rank_in_doc, n_max)] = (
            torch.arange(B * T, device=device)
        )  # (R, N_max + 1): flat index of end j of doc r
        doc_ends, doc_allowed = [], []
        for runs, pos in zip(
            documents.group_runs,
            documents.gather(sentence_pos),  # per group (n, L)
            strict=True,
        ):
            width = max(int(host_ends[runs].max()), 1)
            doc_ends.append(end_table[runs.to(device), :width])  # (n, N_g)
            j = torch.arange(width, device=device)
            doc_allowed.append((j[None, None, :] < pos[:, :, None])[:, None])  # (n, 1, L, N_g)

        return cls(
            valid=valid,
            token_pos=token_pos,
            sentence_pos=sentence_pos,
            sentences=sentences,
            documents=documents,
            doc_ends=doc_ends,
            doc_allowed=doc_allowed,
            end_pos=row_end_positions(is_end, n_row_ends),
        )


class SentenceAttention(Attention):
    """GPTHF encoder: token i sees token j iff same sentence and j <= i."""

    def __init__(self, layout: SentenceLayout, head_dim: int, theta: float) -> None:
        super().__init__(*rope_tables(layout.token_pos, head_dim, theta))
        self.layout = layout

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        no_gate(self, gate)  # sentences are pruned in the body, never tokens of a sentence
        if self.capture is not None:
            self.capture[layer] = (k, v)
        return self.layout.sentences.causal(q, k, v)


class SentenceEndAttention(Attention):
    """GPTHF body: token i sees the ends of the earlier sentences of its document, and itself."""

    def __init__(self, layout: SentenceLayout, head_dim: int, theta: float) -> None:
        super().__init__(*rope_tables(layout.sentence_pos, head_dim, theta))
        self.layout = layout

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        lay = self.layout
        H, hd = q.shape[2:]
        if self.capture is not None:
            ends = lay.end_pos[:, :, None, None].expand(-1, -1, H, hd)  # (B, N, H, hd)
            self.capture[layer] = (
                k.gather(1, ends).transpose(1, 2),
                v.gather(1, ends).transpose(1, 2),
            )  # (B, H, N, hd)
        flat_k, flat_v = k.reshape(-1, H, hd), v.reshape(-1, H, hd)
        if gate is None:
            q_ints: list[Tensor | None] = [None] * len(lay.doc_ends)
        else:
            q_ints = list(lay.documents.gather(gate.q_int))
            flat_ki = gate.k_int.reshape(-1, gate.k_int.shape[-1])
        outs, keeps, gateds = [], [], []
        for qg, kg, vg, ends, allowed, qi in zip(
            lay.documents.gather(q),
            lay.documents.gather(k),
            lay.documents.gather(v),
            lay.doc_ends,
            lay.doc_allowed,
            q_ints,
            strict=True,
        ):
            keep = None
            if gate is not None:
                assert qi is not None
                gated = allowed[:, 0]  # (n, L, N_g): end j of an earlier sentence
                log_keep = running_keep(gate.log_gates(qi, flat_ki[ends], gated), gated)
                keeps.append(log_keep)
                gateds.append(gated)
                keep = log_keep[:, None]  # (n, 1, L, N_g)
            out = attend_ends_and_self(
                qg.transpose(1, 2),
                kg.transpose(1, 2),
                vg.transpose(1, 2),
                flat_k[ends].transpose(1, 2),  # (n, H, N_g, hd)
                flat_v[ends].transpose(1, 2),
                allowed,
                keep,
            )  # (n, H, L, hd)
            outs.append(out.transpose(1, 2))
        if gate is not None:
            at_ends = lay.end_pos[:, :, None].expand(-1, -1, gate.k_int.shape[-1])
            self._record(layer, keeps, gateds, lay.documents, gate.k_int.gather(1, at_ends))
        return lay.documents.scatter(outs)  # (B, T, H, hd)


# --------------------------------------------------------------------------------------------
# FlexAttention: the same patterns as block masks over the rows as they are

_COMPILED: dict[str, Callable[..., Any]] = {}


def _eager_flex_attention(*args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        # Eager flex warns that it is unfused (it scores the full T x T): known, and only
        # tests and CPU generation run it.
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_ops(device: torch.device) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """flex_attention and create_block_mask for ``device``. On CUDA compiled, once per process
    (lazily: importing the model compiles nothing): the fused kernel, and a block mask computed
    block by block, never as a (B, T, T) tensor. Elsewhere eager: unfused, forward only."""
    if device.type != "cuda":
        return _eager_flex_attention, create_block_mask
    if not _COMPILED:
        # Default dynamic=None: the first new T recompiles with T symbolic, then no more.
        _COMPILED["attention"] = torch.compile(flex_attention)
        _COMPILED["block_mask"] = torch.compile(create_block_mask)
    return _COMPILED["attention"], _COMPILED["block_mask"]


MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal_within(run: Tensor) -> MaskMod:
    """kv <= q in the same run; run: (B, T) run id per token. Trailing pads are one run of
    their own: a pad sees earlier pads (finite output), a real token never sees one."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (run[b, q] == run[b, kv]) & (kv <= q)

    return mask_mod


def ends_and_self(doc: Tensor, sent: Tensor, end_of: Tensor) -> MaskMod:
    """kv == q, or kv ends an earlier sentence of q's document. doc, sent: (B, T) document and
    sentence run ids, numbered along the row; end_of: (B, T) the sentence run id at sentence
    ends, larger than any elsewhere (pads too: a pad sees only itself)."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q == kv) | ((doc[b, q] == doc[b, kv]) & (end_of[b, kv] < sent[b, q]))

    return mask_mod


class FlexAttention(Attention):
    """One stage's pattern as a ``BlockMask`` (built once, shared by all its layers) for
    flex_attention over the rows as they are: no gathering, no host sync.

    ``is_end``: (B, T), set for the GPTHF body, whose generation caches keep only the K/V at
    sentence ends (as ``SentenceEndAttention`` captures them); the others capture every token.
    """

    def __init__(
        self, cos: Tensor, sin: Tensor, block_mask: BlockMask, is_end: Tensor | None = None
    ) -> None:
        super().__init__(cos, sin)
        self.block_mask, self.is_end = block_mask, is_end

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        no_gate(self, gate)  # ModelConfig refuses prune with flex: the gates need routing
        if self.capture is not None:
            self.capture[layer] = (k, v) if self.is_end is None else self._at_ends(k, v)
        if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError(
                "attention='flex' has no backward on CPU (torch's FlexAttention): train with "
                "attention='sdpa' here, or on a CUDA device"
            )
        attend, _ = _flex_ops(q.device)
        out = attend(
            q.transpose(1, 2),  # (B, H, T, hd)
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=self.block_mask,
        )  # (B, H, T, hd)
        return out.transpose(1, 2)  # (B, T, H, hd)

    def _at_ends(self, k: Tensor, v: Tensor) -> KV:
        """(B, H, N, hd) K/V at each row's sentence ends, in order (one host sync: N)."""
        assert self.is_end is not None
        H, hd = k.shape[2:]
        n_row_ends = max(int(self.is_end.sum(dim=1).max()), 1)
        ends = row_end_positions(self.is_end, n_row_ends)
        ends = ends[:, :, None, None].expand(-1, -1, H, hd)  # (B, N, H, hd)
        return k.gather(1, ends).transpose(1, 2), v.gather(1, ends).transpose(1, 2)


def flex_stages(
    sentence_ids: Tensor,
    document_ids: Tensor | None,
    arch: str,
    head_dim: int,
    theta: float,
) -> list[FlexAttention]:
    """The flex patterns of a full forward: [document causal] for the GPT, [sentence causal,
    ends and self] for GPTHF; same positions as the gathered patterns (``SentenceRuns``)."""
    B, T = sentence_ids.shape
    runs = SentenceRuns.build(sentence_ids, document_ids)
    # Run ids along the row (int32: what the mask_mods load per block).
    doc = runs.new_doc.cumsum(dim=1, dtype=torch.int32)  # (B, T)
    _, make_mask = _flex_ops(sentence_ids.device)

    def block_mask(mask_mod: MaskMod) -> BlockMask:
        # H=None: one mask for every head. T need not be a multiple of the 128 block size.
        mask: BlockMask = make_mask(mask_mod, B, None, T, T, device=sentence_ids.device)
        return mask

    if arch == "gpt":
        doc_pos, _ = position_in_run(runs.new_doc)  # (B, T) token index within its document
        cos, sin = rope_tables(doc_pos, head_dim, theta)
        return [FlexAttention(cos, sin, block_mask(causal_within(doc)))]
    sent = runs.new_sent.cumsum(dim=1, dtype=torch.int32)  # (B, T)
    end_of = torch.where(runs.is_end, sent, torch.iinfo(torch.int32).max)
    return [
        FlexAttention(
            *rope_tables(runs.token_pos, head_dim, theta), block_mask(causal_within(sent))
        ),
        FlexAttention(
            *rope_tables(runs.sentence_pos, head_dim, theta),
            block_mask(ends_and_self(doc, sent, end_of)),
            is_end=runs.is_end,
        ),
    ]


class KVCacheAttention(Attention):
    """One new token per row against per-layer caches (B, H, capacity, hd).

    The token's K/V are written at ``slot`` (B,) and it attends slots ``<= slot`` among the
    first ``n_keys``. Whether the write is kept (the slot advances) is the caller's business.
    """

    def __init__(
        self, cos: Tensor, sin: Tensor, caches: dict[int, KV], slot: Tensor, n_keys: int
    ) -> None:
        super().__init__(cos, sin)
        self.caches, self.slot, self.n_keys = caches, slot, n_keys
        self.rows = torch.arange(slot.shape[0], device=slot.device)
        keys = torch.arange(n_keys, device=slot.device)
        self.mask = (keys[None, :] <= slot[:, None])[:, None, None, :]  # (B, 1, 1, n_keys)

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        no_gate(self, gate)
        k_cache, v_cache = self.caches[layer]  # (B, H, capacity, hd)
        k_cache[self.rows, :, self.slot] = k[:, 0]  # (B, H, hd) at each row's slot
        v_cache[self.rows, :, self.slot] = v[:, 0]
        out = attend(
            q.transpose(1, 2),  # (B, H, 1, hd)
            k_cache[:, :, : self.n_keys],
            v_cache[:, :, : self.n_keys],
            attn_mask=self.mask,
        )  # (B, H, 1, hd)
        return out.transpose(1, 2)  # (B, 1, H, hd)
