"""Decoders of pruning models (Dynamic Context Pruning): they evict what the gates dropped.

``kv`` (GPT and GPTHF's body) through the evicting caches of ``training.generation.eviction``;
GPTHF ``sentence-cache`` by dropping the sentence embeddings no remaining query can see and
compacting the rest. Each extends the unpruned decoder of its mode
(``training.generation.decoders``) and computes the same function as the full forward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.generation.decoders import (
    _GPTHFKV,
    PruningStats,
    _Decoder,
    _dev,
    _GPTHFSentenceCache,
)
from training.generation.eviction import EvictingCache, EvictingKVAttention, ensure_free_slot
from training.model.attention import (
    KV,
    Attention,
    KVCacheAttention,
    attend,
)
from training.model.pruning import NEG_INF, Gate


class _EvictingMixin(_Decoder):
    """Shared by the pruned ``kv`` decoders: evicting caches of the pruned layers."""

    evicting: dict[int, EvictingCache]

    def _evicting_from_prefill(
        self, layer_kv: dict[int, KV], last_query: Tensor, self_key: Tensor, n_keys: Tensor
    ) -> None:
        """Caches of the pruned layers after the prompt. layer_kv: (B, H, N, hd) per layer, in
        key order; last_query: (B,) position of each row's last prompt token; self_key: (B,)
        the key index that token is itself (-1: none); n_keys: (B,) keys of each row."""
        assert self.pruning is not None
        self.evicted: dict[int, Tensor] = {}
        self.evicting = {}
        for layer, (k, v) in layer_kv.items():
            (keep,) = self.pruning.keep[layer]  # one group: each prompt row is one run
            keep = keep[self.rows, last_query]  # (B, N)
            j = torch.arange(keep.shape[1], device=self.device)[None, :]
            keep = torch.where(j == self_key[:, None], 0.0, keep)
            live = (j < n_keys[:, None]) & (keep > NEG_INF)
            self.evicted[layer] = (j < n_keys[:, None]).sum() - live.sum()
            # Room for every key the generation can add (none grows while nothing is pruned),
            # cut at once to what the kept prompt needs (``EvictingCache.from_prefill``).
            cap = keep.shape[1] + self.max_new + 1
            self.evicting[layer] = EvictingCache.from_prefill(
                k, v, self.pruning.k_int[layer], keep, live, cap
            )

    def _evicting_attention(self, positions: np.ndarray, keep_self: Tensor) -> EvictingKVAttention:
        ensure_free_slot(self.evicting)
        return EvictingKVAttention(*self._rope(positions), self.evicting, keep_self)

    def _evicting_bytes(self) -> tuple[float, list[Tensor]]:
        """(live bytes per sequence, the tensors) of the evicting caches."""
        live = sum(float(c.live.sum()) * c.slot_bytes() for c in self.evicting.values()) / self.B
        return live, [t for c in self.evicting.values() for t in c.tensors()]

    def _record_evictions(self, attention: EvictingKVAttention, active: np.ndarray) -> None:
        rows = _dev(active, self.device)[:, None]
        for layer, dropped in attention.evicted.items():  # rows that stopped do not count
            self.evicted[layer] = self.evicted[layer] + (dropped & rows).sum()

    def pruning_stats(self, keys_written: int) -> PruningStats:
        return PruningStats(
            kept={
                layer: float(c.live.float().sum(dim=1).mean()) for layer, c in self.evicting.items()
            },
            evicted_per_layer={layer: int(n) for layer, n in self.evicted.items()},
            keys_written=keys_written,
            capacity={layer: c.capacity for layer, c in self.evicting.items()},
        )


class _GPTPrunedKV(_EvictingMixin):
    """GPT with pruning: every layer's token cache evicts what the layer dropped."""

    def prefill(self) -> Tensor:
        xs, stages = self._prefill_stages()
        ((attention, _),) = stages
        assert attention.capture is not None
        last = self.lengths - 1
        self._evicting_from_prefill(
            {layer: (k.transpose(1, 2), v.transpose(1, 2)) for layer, (k, v) in attention.capture.items()},
            last, last, self.lengths,
        )  # fmt: skip
        return self._last_logits(xs[-1])

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        pos = self.state.length  # position of the fed token within the document
        attention = self._evicting_attention(pos, _dev(active, self.device))
        x = self.model.run_layers(
            self.model.embed(tokens[:, None]), attention, range(self.config.n_layers)
        )
        self._record_evictions(attention, active)
        return self.model.head(x[:, 0])

    def cache_bytes(self) -> dict[str, float]:
        live, tensors = self._evicting_bytes()
        return {"live": live, "allocated": self._bytes(*tensors)}


class _GPTHFPrunedKV(_EvictingMixin, _GPTHFKV):
    """GPTHF with pruning: the body's sentence-end caches evict the sentences each layer
    dropped; the encoder keeps the current sentence as without pruning."""

    def prefill(self) -> Tensor:
        logits = super().prefill()  # encoder caches as unpruned; body caches replaced below
        s = self.state
        n_done = _dev(s.n_done, self.device)
        ends_with_eos = _dev(s.open_len == 0, self.device)
        self_key = torch.where(ends_with_eos, n_done - 1, -1)
        self._evicting_from_prefill(self.body_caches, self.lengths - 1, self_key, n_done)
        self.body_caches = {}
        return logits

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        c, s = self.config, self.state
        enc = KVCacheAttention(  # position and slot = index within the current sentence
            *self._rope(s.open_len), self.enc_caches, _dev(s.open_len, self.device), int(s.open_len.max()) + 1
        )  # fmt: skip
        keep_self = _dev(active, self.device) & (tokens == c.eos_id)  # a new sentence end
        body = self._evicting_attention(s.n_done, keep_self)  # position: sentence index
        x = self.model.embed(tokens[:, None])  # (B, 1, C)
        x = self.model.run_layers(x, enc, range(c.n_encoder_layers))
        x = self.model.run_layers(x, body, range(c.n_encoder_layers, c.n_layers))
        self._record_evictions(body, active)
        return self.model.head(x[:, 0])

    def cache_bytes(self) -> dict[str, float]:
        c, s = self.config, self.state
        live, tensors = self._evicting_bytes()
        live += (
            float((c.n_encoder_layers * s.open_len).mean()) * 2 * c.d_model * self.dtype.itemsize
        )
        tensors += [t for kv in self.enc_caches.values() for t in kv]
        return {"live": live, "allocated": self._bytes(*tensors)}


class _PrunedSentenceBody(Attention):
    """The body of a pruning GPTHF in ``sentence-cache`` mode, over each row's kept sentence
    embeddings (slots 0..n_live-1, in sentence order) plus the fed token (slot n_live).

    A kept end's own output depends on what it saw when it was written, so each layer keeps
    ``hist``: row j is the log keep end j's query had over the earlier ends (fixed once j is
    finished), and ``cur``: the running log keep of the current query. The fed token's gates
    are added to ``cur`` first (``new_cur``), as in the full forward.
    """

    def __init__(self, cos: Tensor, sin: Tensor, owner: _GPTHFPrunedSentenceCache, N: int) -> None:
        super().__init__(cos, sin)
        self.owner, self.N = owner, N
        self.new_cur: dict[int, Tensor] = {}

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        assert gate is not None, "every body layer of a pruning GPTHF has a gate"
        o, N = self.owner, self.N
        rows, n_live = o.rows, o.n_live
        slot = torch.arange(N, device=q.device)
        is_end = slot[None, :] < n_live[:, None]  # (B, N)
        q_fed = gate.q_int[rows, n_live][:, None]  # (B, 1, r)
        log_gates = gate.log_gates(q_fed, gate.k_int)[:, 0]  # (B, N)
        new_cur = torch.where(is_end, o.cur[layer][:, :N] + log_gates, 0.0)
        self.new_cur[layer] = new_cur
        keep = o.hist[layer][:, :N, :N].clone()  # (B, N, N): [query slot, key slot]
        keep[rows, n_live] = new_cur
        earlier = slot[None, :] < slot[:, None]  # key before query
        allowed = earlier[None] & is_end[:, None, :]
        bias = torch.where(allowed, keep, NEG_INF)
        bias = torch.where((slot[None, :] == slot[:, None])[None], 0.0, bias)
        out = attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=bias[:, None].to(q.dtype),
        )
        return out.transpose(1, 2)


class _GPTHFPrunedSentenceCache(_GPTHFSentenceCache):
    """``sentence-cache`` for a pruning GPTHF: the body re-runs over the kept sentence
    embeddings only. An embedding is evicted once no remaining query of any body layer can
    see it: dropped for the current query and for every kept end written after it (their
    outputs are recomputed each step with the keep they had)."""

    def prefill(self) -> Tensor:
        c, s = self.config, self.state
        xs, _ = self._prefill_stages(capture=True)  # the keep masks of the prompt too
        logits = self._fill_caches(xs)
        assert self.pruning is not None
        n = int(s.n_done.max())
        self.cap = 2 * n + 16
        self.n_live = _dev(s.n_done.copy(), self.device)
        self.pos = torch.arange(self.cap, device=self.device).expand(self.B, -1).clone()
        t = torch.arange(self.prompt_width, device=self.device)
        eos = (self.ids == c.eos_id) & (t[None, :] < self.lengths[:, None])
        end_pos = torch.zeros(self.B, max(n, 1), dtype=torch.long, device=self.device)
        rank = eos.long().cumsum(dim=1) - 1
        end_pos.scatter_(
            1, torch.where(eos, rank, max(n, 1) - 1).clamp(max=max(n, 1) - 1), t.expand(self.B, -1)
        )
        end_pos = torch.where(
            torch.arange(max(n, 1), device=self.device)[None, :] < self.n_live[:, None], end_pos, 0
        )  # fmt: skip
        self.hist: dict[int, Tensor] = {}
        self.cur: dict[int, Tensor] = {}
        for layer in c.pruned_layers:
            (keep,) = self.pruning.keep[layer]  # (B, T, N): one group, one run per row
            keep = keep[:, :, :n]
            hist = keep.new_zeros(self.B, self.cap, self.cap)
            hist[:, :n, :n] = keep.gather(1, end_pos[:, :n, None].expand(-1, -1, n))
            cur = keep.new_zeros(self.B, self.cap)
            cur[:, :n] = keep[self.rows, self.lengths - 1]
            self.hist[layer], self.cur[layer] = hist, cur
        self.evicted_total = 0
        self._evict()
        return logits

    def _grow(self) -> None:
        if int(self.n_live.max()) + 1 <= self.cap:
            return
        pad = self.cap
        self.cap *= 2
        self.emb = F.pad(self.emb, (0, 0, 0, self.cap - self.emb.shape[1]))
        self.pos = F.pad(self.pos, (0, pad))
        for layer in self.hist:
            self.hist[layer] = F.pad(self.hist[layer], (0, pad, 0, pad))
            self.cur[layer] = F.pad(self.cur[layer], (0, pad))

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        c, s, m = self.config, self.state, self.model
        self._grow()
        if self.emb.shape[1] < self.cap:
            self.emb = F.pad(self.emb, (0, 0, 0, self.cap - self.emb.shape[1]))
        h = self._encode_fed(tokens)
        n_live = self.n_live
        N = int(n_live.max()) + 1
        self.emb[self.rows, n_live] = h
        self.pos[self.rows, n_live] = _dev(s.n_done, self.device)  # sentence index in the document
        body = _PrunedSentenceBody(*self._rope(self.pos[:, :N]), self, N)
        y = m.run_layers(self.emb[:, :N], body, range(c.n_encoder_layers, c.n_layers))
        logits = m.head(y[self.rows, n_live])
        # The fed token's gates count for every later query; an EOS-S becomes a kept end.
        ends = _dev(active, self.device) & (tokens == c.eos_id)
        for layer, new_cur in body.new_cur.items():
            cur = self.cur[layer]
            cur[:, :N] = new_cur
            hist = self.hist[layer]
            hist[self.rows, n_live, :N] = torch.where(
                ends[:, None], new_cur, hist[self.rows, n_live, :N]
            )
            cur[self.rows, n_live] = 0.0
        self.n_live = n_live + ends.long()
        self._evict()
        return logits

    def _evict(self) -> None:
        """Compact each row's slots, dropping embeddings no remaining query can see."""
        cap = self.cap
        slot = torch.arange(cap, device=self.device)
        live = slot[None, :] < self.n_live[:, None]  # (B, cap)
        dead = live.clone()
        for layer in self.hist:
            gone_now = self.cur[layer] == NEG_INF  # (B, cap) for the next query
            later_end = live[:, :, None] & (slot[None, :, None] > slot[None, None, :])  # (B, j, i)
            seen_later = (later_end & (self.hist[layer] > NEG_INF)).any(dim=1)  # (B, i)
            dead &= gone_now & ~seen_later
        if not bool(dead.any()):
            return
        self.evicted_total += int(dead.sum())
        order = torch.argsort(dead.long() * cap + slot[None, :] + (~live).long() * 2 * cap, dim=1)
        gather2 = order[:, :, None]
        self.emb = self.emb.gather(1, gather2.expand(-1, -1, self.emb.shape[2]))
        self.pos = self.pos.gather(1, order)
        for layer in self.hist:
            hist = self.hist[layer].gather(1, gather2.expand(-1, -1, cap))
            self.hist[layer] = hist.gather(2, order[:, None, :].expand(-1, cap, -1))
            self.cur[layer] = self.cur[layer].gather(1, order)
        self.n_live = self.n_live - dead.sum(dim=1)

    def pruning_stats(self, keys_written: int) -> PruningStats:
        kept = float(self.n_live.float().mean())
        return PruningStats(
            kept={layer: kept for layer in self.hist},
            evicted_per_layer={layer: self.evicted_total for layer in self.hist},
            keys_written=keys_written,
            capacity={layer: self.cap for layer in self.hist},
        )

    def cache_bytes(self) -> dict[str, float]:
        c = self.config
        n = float(self.n_live.float().mean())
        live = n * c.d_model * self.dtype.itemsize + len(self.hist) * (n * n + n) * 4
        live += float(self.state.open_len.mean()) * 8
        tensors = [self.emb, self.sentence, self.pos, *self.hist.values(), *self.cur.values()]
        return {"live": live, "allocated": self._bytes(*tensors)}


_PRUNED_DECODERS: dict[tuple[str, str], type[_Decoder]] = {
    ("gpthf", "kv"): _GPTHFPrunedKV,
    ("gpthf", "sentence-cache"): _GPTHFPrunedSentenceCache,
    ("gpt", "kv"): _GPTPrunedKV,
}
