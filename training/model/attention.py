"""Attention patterns of GPTHF and the GPT baseline (imports only torch).

Every block computes its queries, keys and values the same way; what differs between the
architectures (and between training and cached generation) is *which keys a query sees* and
*which RoPE positions the tokens get*. An ``Attention`` object captures both for one forward
pass: it is built once from the batch's sentence and document ids and then called by every
block of a stage with that block's ``(B, T, H, hd)`` queries, keys and values.

Patterns for a full forward over packed rows:

* ``DocumentCausalAttention`` (GPT): causal within each document; positions restart at every
  document. Rows holding a single document use ``is_causal`` SDPA (fused kernels, no mask).
* ``SentenceAttention`` (GPTHF encoder): causal within each sentence; positions restart at
  every sentence. Tokens are gathered into one short padded sequence per sentence,
  ``(n_sentences, s_max)``, and attended with ``is_causal`` SDPA: no T x T anything.
* ``SentenceEndAttention`` (GPTHF body): each token attends the keys at the ends of the earlier
  sentences of its document, gathered into ``(B, N_max)``, plus its own key. Positions are the
  sentence index within the document.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """SDPA on (B, T, H, hd) tensors, returning (B, T, H, hd)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    )  # (B, H, T, hd)
    return out.transpose(1, 2)


def attend_ends_and_self(
    q: Tensor, k: Tensor, v: Tensor, k_ends: Tensor, v_ends: Tensor, allowed: Tensor
) -> Tensor:
    """The body attention core over packed rows.

    q, k, v: (B, H, T, hd), the tokens' own projections; k_ends, v_ends: (B, H, N, hd), keys and
    values at sentence ends; allowed: (B, 1 or H, T, N) bool. Each query attends the allowed
    ends plus its own key, with one softmax over both: O(T * N), never T x T. (Each query has
    a different "self" key, so this is not one SDPA call; in generation, with one query per row,
    it is: see ``KVCacheAttention``.) Returns (B, H, T, hd).
    """
    scale = q.shape[-1] ** -0.5
    scores_ends = (q @ k_ends.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # (B,H,T,N)
    score_self = (q * k).sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    scores = torch.cat([scores_ends, score_self], dim=-1) * scale  # (B, H, T, N+1)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs[..., :-1] @ v_ends + probs[..., -1:] * v  # (B, H, T, hd)


# --------------------------------------------------------------------------------------------
# Patterns


class Attention:
    """RoPE tables plus an attention pattern for one forward; called by each block.

    ``capture``: when a dict, each call stores what a generation cache needs, per layer index.
    """

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos, self.sin = cos, sin  # (B, T, 1, hd/2)
        self.capture: dict[int, KV] | None = None
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

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError


class CausalAttention(Attention):
    """Causal SDPA over right-padded rows (pads come after every real token, so are never seen)."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.capture is not None:
            self.capture[layer] = (k, v)
        return sdpa(q, k, v, causal=True)


class DocumentCausalAttention(Attention):
    """GPT: causal within each document. ``mask`` is None when every row is one document."""

    def __init__(self, cos: Tensor, sin: Tensor, mask: Tensor | None) -> None:
        super().__init__(cos, sin)
        self.mask = mask  # (B, 1, T, T) bool or None

    @classmethod
    def build(cls, sentence_ids: Tensor, document_ids: Tensor | None, head_dim: int, theta: float):
        valid = sentence_ids >= 0
        doc = document_ids if document_ids is not None else torch.where(valid, 0, -1)
        doc = torch.where(valid, doc, -1)
        new_doc = run_starts(doc)
        doc_pos, _ = position_in_run(new_doc)  # (B, T) token index within its document
        multi_doc, pad_before_token = torch.stack(
            [
                ((new_doc & valid).sum(dim=1) > 1).any(),
                (valid[:, 1:] & ~valid[:, :-1]).any(),
            ]
        ).tolist()
        mask = None
        if multi_doc or pad_before_token:
            run = new_doc.cumsum(dim=1)  # (B, T) document run number; pads form their own runs
            T = sentence_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
            mask = (run[:, :, None] == run[:, None, :]) & causal  # (B, T, T)
            mask = mask[:, None]  # (B, 1, T, T)
        return cls(*rope_tables(doc_pos, head_dim, theta), mask)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.capture is not None:
            self.capture[layer] = (k, v)
        if self.mask is None:
            return sdpa(q, k, v, causal=True)
        return sdpa(q, k, v, mask=self.mask)


@dataclass
class SentenceLayout:
    """Index tensors that route tokens to per-sentence sequences and to sentence ends.

    Built once per GPTHF forward (one host sync, for the sizes) and shared by all its layers.
    """

    valid: Tensor  # (B, T) bool, real tokens
    token_pos: Tensor  # (B, T) position within the sentence (encoder RoPE)
    sentence_pos: Tensor  # (B, T) sentence index within the document (body RoPE)
    n_sentences: int  # S: real sentences in the batch
    s_max: int  # longest sentence
    to_sentence: Tensor  # (S * s_max,) flat token index for each (sentence, slot)
    to_token: Tensor  # (B * T,) flat (sentence, slot) index for each token; 0 on pads
    end_pos: Tensor  # (B, N) position of each sentence end of a row (0 where none)
    end_allowed: Tensor  # (B, 1, T, N) bool: end j is an earlier sentence of i's document

    @classmethod
    def build(cls, sentence_ids: Tensor, document_ids: Tensor | None = None) -> SentenceLayout:
        B, T = sentence_ids.shape
        device = sentence_ids.device
        valid = sentence_ids >= 0
        doc = document_ids if document_ids is not None else torch.where(valid, 0, -1)
        doc = torch.where(valid, doc, -1)
        new_sent = run_starts(sentence_ids, doc)  # pads form their own runs too
        new_doc = run_starts(doc)
        token_pos, _ = position_in_run(new_sent)
        _, doc_first = position_in_run(new_doc)
        sent_run = new_sent.cumsum(dim=1)  # (B, T) sentence run number within the row
        doc_run = new_doc.cumsum(dim=1)  # (B, T) document run number within the row
        sentence_pos = sent_run - sent_run.gather(1, doc_first)
        is_end = valid.clone()
        is_end[:, :-1] &= new_sent[:, 1:]  # last token of its run

        n_sent, s_max, n_ends = torch.stack(
            [
                (new_sent & valid).sum(),
                torch.where(valid, token_pos + 1, 0).max(),
                is_end.sum(dim=1).max(),
            ]
        ).tolist()
        n_sent, s_max, n_ends = max(n_sent, 1), max(s_max, 1), max(n_ends, 1)

        # Encoder routing. Slots past a sentence's length point at its first token: they are
        # keys only of later (padded) query slots under the causal mask, so never seen.
        flat_start = (new_sent & valid).flatten()
        flat_valid = valid.flatten()
        g = flat_start.cumsum(0) - 1  # (B*T,) global sentence index of each token
        flat_idx = torch.arange(B * T, device=device)
        dump = torch.full_like(g, n_sent)
        sent_first = torch.zeros(n_sent + 1, dtype=torch.long, device=device)
        sent_first.scatter_(0, torch.where(flat_start, g, dump), flat_idx)  # (S+1,)
        sent_len = torch.zeros(n_sent + 1, dtype=torch.long, device=device)
        sent_len.scatter_add_(0, torch.where(flat_valid, g, dump), torch.ones_like(g))
        slot = torch.arange(s_max, device=device)
        offset = torch.where(slot < sent_len[:n_sent, None], slot, 0)  # (S, s_max)
        to_sentence = (sent_first[:n_sent, None] + offset).flatten()  # (S * s_max,)
        to_token = torch.where(flat_valid, g * s_max + token_pos.flatten(), 0)  # (B*T,)

        # Body routing: the ends of each row, in order, and which of them each token may see.
        rank = is_end.cumsum(dim=1) - 1  # (B, T)
        t = torch.arange(T, device=device).expand(B, T)
        end_pos = torch.zeros(B, n_ends + 1, dtype=torch.long, device=device)
        end_pos.scatter_(1, torch.where(is_end, rank, n_ends), t)
        end_pos = end_pos[:, :n_ends]  # (B, N)
        end_valid = torch.arange(n_ends, device=device) < is_end.sum(dim=1, keepdim=True)  # (B, N)
        end_sent, end_doc = sent_run.gather(1, end_pos), doc_run.gather(1, end_pos)  # (B, N)
        end_allowed = (
            end_valid[:, None, :]
            & (end_doc[:, None, :] == doc_run[:, :, None])
            & (end_sent[:, None, :] < sent_run[:, :, None])
        )  # (B, T, N)
        return cls(
            valid=valid,
            token_pos=token_pos,
            sentence_pos=sentence_pos,
            n_sentences=n_sent,
            s_max=s_max,
            to_sentence=to_sentence,
            to_token=to_token,
            end_pos=end_pos,
            end_allowed=end_allowed[:, None],  # (B, 1, T, N)
        )


class SentenceAttention(Attention):
    """GPTHF encoder: token i sees token j iff same sentence and j <= i."""

    def __init__(self, layout: SentenceLayout, head_dim: int, theta: float) -> None:
        super().__init__(*rope_tables(layout.token_pos, head_dim, theta))
        self.layout = layout

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.capture is not None:
            self.capture[layer] = (k, v)
        B, T, H, hd = q.shape
        lay = self.layout
        S, s = lay.n_sentences, lay.s_max

        def per_sentence(x: Tensor) -> Tensor:
            x = x.reshape(B * T, H, hd)[lay.to_sentence]  # (S * s, H, hd)
            return x.view(S, s, H, hd)  # (S, s, H, hd)

        out = sdpa(per_sentence(q), per_sentence(k), per_sentence(v), causal=True)  # (S,s,H,hd)
        out = out.reshape(S * s, H, hd)[lay.to_token].view(B, T, H, hd)  # back to tokens
        return out.masked_fill(~lay.valid[:, :, None, None], 0.0)


class SentenceEndAttention(Attention):
    """GPTHF body: token i sees the ends of the earlier sentences of its document, and itself."""

    def __init__(self, layout: SentenceLayout, head_dim: int, theta: float) -> None:
        super().__init__(*rope_tables(layout.sentence_pos, head_dim, theta))
        self.layout = layout

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        H, hd = q.shape[2:]
        ends = self.layout.end_pos[:, :, None, None].expand(-1, -1, H, hd)  # (B, N, H, hd)
        k_ends = k.gather(1, ends).transpose(1, 2)  # (B, H, N, hd)
        v_ends = v.gather(1, ends).transpose(1, 2)
        if self.capture is not None:
            self.capture[layer] = (k_ends, v_ends)
        out = attend_ends_and_self(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            k_ends,
            v_ends,
            self.layout.end_allowed,
        )  # (B, H, T, hd)
        return out.transpose(1, 2)  # (B, T, H, hd)


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

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.caches[layer]  # (B, H, capacity, hd)
        k_cache[self.rows, :, self.slot] = k[:, 0]  # (B, H, hd) at each row's slot
        v_cache[self.rows, :, self.slot] = v[:, 0]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, 1, hd)
            k_cache[:, :, : self.n_keys],
            v_cache[:, :, : self.n_keys],
            attn_mask=self.mask,
        )  # (B, H, 1, hd)
        return out.transpose(1, 2)  # (B, 1, H, hd)
