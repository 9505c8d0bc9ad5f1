"""Batched text generation for GPTHF and the GPT, with exact caches.

Modes (``MODES``):

* ``full`` (both): re-run the whole forward over the context at every step; the reference.
* ``sentence-cache`` (GPTHF; the paper's algorithm): keep the embedding (encoder output) of
  every finished sentence; each step re-runs the encoder over the current sentence and the
  body over [sentence embeddings..., current token].
* ``kv``: GPT: the usual K/V cache. GPTHF (ours, beyond the paper): encoder K/V of the current
  sentence only (dropped at each EOS-S) and body K/V at sentence ends; one token per step
  through all layers.

Every mode computes the same function as ``Transformer.forward`` (tests check each step's
logits against it). A pruning model (``ModelConfig.prune``) evicts what its gates dropped:
``kv`` through ``training.generation.eviction``, ``sentence-cache`` by dropping sentence
embeddings no remaining query can see (``_GPTHFPrunedSentenceCache``). Prompts are ragged; rows are right-padded and each carries its own
state. A sentence that reaches ``max_sentence_tokens`` (EOS-S included, as in the data
pipeline) gets EOS-S forced; ``GenerationResult`` counts natural and forced sentence ends.
Generation of a row stops after ``max_new_tokens`` or when it produces end-of-document.
Text prompts and exports: ``training.generation.text``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.generation.eviction import EvictingCache, EvictingKVAttention, ensure_free_slot
from training.model import ModelConfig, Transformer
from training.model.attention import (
    KV,
    Attention,
    CausalAttention,
    KVCacheAttention,
    attend,
    rope_tables,
)
from training.model.pruning import NEG_INF, Gate, PruningRecord

MODES = {"gpthf": ("full", "sentence-cache", "kv"), "gpt": ("full", "kv")}


@dataclass
class GenerationResult:
    prompts: list[list[int]]
    tokens: list[list[int]]
    """New tokens of each row (forced EOS-S included; the end-of-document token is the last)."""
    stopped_at_eod: list[bool]
    natural_ends: list[int]
    """Sentences the model ended itself (EOS-S or end-of-document), per row."""
    forced_ends: list[int]
    """Sentences that hit max_sentence_tokens and got EOS-S forced, per row."""
    logits: Tensor | None = None
    """(B, steps, V) fp32 logits each new token was chosen from; NaN once a row stopped."""
    cache_bytes: dict[str, float] = field(default_factory=dict)
    """Cache held per sequence at the end: "live" (used slots) and "allocated"."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time: "prefill" (until the first new tokens reach the host) and "decode" (the rest)."""
    pruning: PruningStats | None = None
    """What the evicting caches did (``kv`` mode of a pruning model)."""

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]

    @property
    def natural_end_rate(self) -> float:
        """Natural sentence ends over all sentence ends (nan if none ended)."""
        natural, forced = sum(self.natural_ends), sum(self.forced_ends)
        return natural / (natural + forced) if natural + forced else float("nan")


@dataclass
class PruningStats:
    """Cache entries of a pruning model's ``kv`` generation, per pruned layer."""

    kept: dict[int, float]
    """Live entries per row at the end (mean over rows)."""
    evicted_per_layer: dict[int, int]
    """Entries evicted, all rows, from the prompt and during generation."""
    keys_written: int
    """The most keys one row ever had: tokens (GPT) or sentence ends (GPTHF body)."""
    capacity: dict[int, int]
    """Slots allocated per row at the end (freed slots are reused)."""

    @property
    def evicted_total(self) -> int:
        return sum(self.evicted_per_layer.values())


# --------------------------------------------------------------------------------------------
# Per-row state (host side, numpy: the loop syncs once per step to read the new tokens)


@dataclass
class _State:
    length: np.ndarray  # (B,) tokens in the context
    open_len: np.ndarray  # (B,) tokens of the unfinished sentence (0 right after EOS-S)
    n_done: np.ndarray  # (B,) finished sentences in the context

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], eos_id: int) -> _State:
        length, open_len, n_done = [], [], []
        for p in prompts:
            ends = [i for i, t in enumerate(p) if t == eos_id]
            length.append(len(p))
            n_done.append(len(ends))
            open_len.append(len(p) - (ends[-1] + 1 if ends else 0))
        return cls(*(np.array(a, dtype=np.int64) for a in (length, open_len, n_done)))

    def feed(self, tokens: np.ndarray, active: np.ndarray, eos_id: int) -> None:
        eos = active & (tokens == eos_id)
        self.length += active
        self.n_done += eos
        self.open_len = np.where(eos, 0, self.open_len + active)


def _right_pad(prompts: list[list[int]], pad_id: int, width: int, device: torch.device) -> Tensor:
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    return ids.to(device)


def sentence_ids_for(ids: Tensor, lengths: Tensor, eos_id: int) -> Tensor:
    """(B, T) sentence index of each token of right-padded rows (-1 past ``lengths``)."""
    is_eos = (ids == eos_id).long()
    sid = is_eos.cumsum(dim=1) - is_eos  # EOS-S belongs to the sentence it ends
    t = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(t[None, :] < lengths[:, None], sid, -1)


def sentence_ended(
    tokens: np.ndarray, active: np.ndarray, eod: np.ndarray, open_len: np.ndarray, eos_id: int
) -> np.ndarray:
    """(B,) bool: the new token ends a sentence. EOS-S always does; end-of-document does only
    when a sentence is open, so an end-of-document right after EOS-S is not a second end."""
    return (active & (tokens == eos_id)) | (eod & (open_len > 0))


def _dev(a: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(a).to(device)


# --------------------------------------------------------------------------------------------
# Decoders: prefill() -> logits (B, V) for the last prompt token; step(tokens) feeds one token
# per row (pre-feed state in ``state``) and returns the logits after it.


class _Decoder:
    def __init__(
        self, model: Transformer, prompts: list[list[int]], state: _State, max_new: int, M: int
    ) -> None:
        self.model, self.config, self.state = model, model.config, state
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.B = len(prompts)
        self.rows = torch.arange(self.B, device=self.device)
        self.prompt_width = int(state.length.max())
        self.ids = _right_pad(prompts, self.config.pad_id, self.prompt_width, self.device)
        self.lengths = _dev(state.length.copy(), self.device)
        self.max_new, self.M = max_new, M

    def _rope(self, positions: np.ndarray | Tensor) -> KV:
        pos = positions if isinstance(positions, Tensor) else _dev(positions, self.device)
        if pos.dim() == 1:
            pos = pos[:, None]  # (B, 1)
        return rope_tables(pos, self.config.head_dim, self.config.rope_theta)

    def _prefill_stages(
        self, capture: bool = True
    ) -> tuple[list[Tensor], list[tuple[Attention, range]]]:
        """Full forward over the prompts, optionally capturing K/V (``attention.capture``) and
        what the pruned layers kept (``self.pruning``); returns the embeddings and each stage's
        output, and the stages."""
        sid = sentence_ids_for(self.ids, self.lengths, self.config.eos_id)
        stages = self.model.stages(sid)
        xs = [self.model.embed(self.ids)]
        self.pruning = PruningRecord(capture=capture) if self.config.prune else None
        for attention, layers in stages:
            attention.capture = {} if capture else None
            attention.pruning = self.pruning
            xs.append(self.model.run_layers(xs[-1], attention, layers))
        return xs, stages

    def _last_logits(self, x: Tensor) -> Tensor:
        return self.model.head(x[self.rows, self.lengths - 1])  # (B, V)

    def prefill(self) -> Tensor:
        raise NotImplementedError

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        raise NotImplementedError

    def cache_bytes(self) -> dict[str, float]:
        return {"live": 0.0, "allocated": 0.0}

    def _bytes(self, *tensors: Tensor) -> float:
        return float(sum(t.numel() * t.element_size() for t in tensors)) / self.B


class _Full(_Decoder):
    """Re-run the whole forward every step."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        width = self.prompt_width + self.max_new
        self.buf = torch.full((self.B, width), self.config.pad_id, device=self.device)
        self.buf[:, : self.prompt_width] = self.ids

    def _logits(self, T: int) -> Tensor:
        ids = self.buf[:, :T]
        sid = sentence_ids_for(ids, self.lengths, self.config.eos_id)
        return self._last_logits(self.model.hidden_states(ids, sid))

    def prefill(self) -> Tensor:
        return self._logits(self.prompt_width)

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        if int(self.state.length.max()) >= self.buf.shape[1]:  # a caller without max_new
            self.buf = F.pad(self.buf, (0, self.buf.shape[1]), value=self.config.pad_id)
        self.buf[self.rows, _dev(self.state.length, self.device)] = tokens
        self.lengths = _dev(self.state.length + active, self.device)
        return self._logits(int((self.state.length + active).max()))


class _GPTKV(_Decoder):
    """GPT with a K/V cache per layer, (B, H, prompt + max_new, hd)."""

    def prefill(self) -> Tensor:
        xs, stages = self._prefill_stages()
        ((attention, _),) = stages
        assert attention.capture is not None
        cap = self.prompt_width + self.max_new
        self.caches: dict[int, KV] = {}
        for layer, (k, v) in attention.capture.items():
            kc = k.new_zeros(self.B, self.config.n_heads, cap, self.config.head_dim)
            vc = torch.zeros_like(kc)
            kc[:, :, : self.prompt_width] = k.transpose(1, 2)  # (B, H, P, hd)
            vc[:, :, : self.prompt_width] = v.transpose(1, 2)
            self.caches[layer] = (kc, vc)
        return self._last_logits(xs[-1])

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        pos = self.state.length  # position of the fed token within the document
        self._grow(int(pos.max()) + 1)
        attention = KVCacheAttention(
            *self._rope(pos), self.caches, _dev(pos, self.device), int(pos.max()) + 1
        )
        x = self.model.run_layers(
            self.model.embed(tokens[:, None]), attention, range(self.config.n_layers)
        )
        return self.model.head(x[:, 0])

    def _grow(self, needed: int) -> None:
        """Double the capacity when a step needs more (callers that do not know max_new)."""
        cap = next(iter(self.caches.values()))[0].shape[2]
        if needed <= cap:
            return
        pad = max(needed, 2 * cap) - cap
        for layer, (k, v) in self.caches.items():
            self.caches[layer] = (F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)))

    def cache_bytes(self) -> dict[str, float]:
        c = self.config
        per_token = 2 * c.n_layers * c.d_model * self.dtype.itemsize
        live = float(self.state.length.mean()) * per_token
        return {
            "live": live,
            "allocated": self._bytes(*[t for kv in self.caches.values() for t in kv]),
        }


class _GPTHFKV(_Decoder):
    """GPTHF with encoder K/V for the current sentence and body K/V at sentence ends."""

    def prefill(self) -> Tensor:
        c = self.config
        xs, stages = self._prefill_stages()
        (enc, _), (body, _) = stages
        assert enc.capture is not None and body.capture is not None
        s = self.state
        # Encoder: copy the K/V of each row's unfinished sentence into slots 0..open_len-1.
        self.enc_cap = max(self.M, int(s.open_len.max()) + 1)
        start = _dev(s.length - s.open_len, self.device)  # (B,) first token of the open sentence
        slots = torch.arange(self.enc_cap, device=self.device)
        idx = (start[:, None] + slots).clamp(max=self.prompt_width - 1)  # (B, cap)
        idx = idx[:, :, None, None].expand(-1, -1, c.n_heads, c.head_dim)
        self.enc_caches: dict[int, KV] = {
            layer: (k.gather(1, idx).transpose(1, 2).contiguous(), v.gather(1, idx).transpose(1, 2).contiguous())
            for layer, (k, v) in enc.capture.items()
        }  # (B, H, cap, hd) each  # fmt: skip
        # Body: the captured ends are in sentence order; the first n_done are finished.
        n_ends = next(iter(body.capture.values()))[0].shape[2]
        self.body_cap = max(n_ends, 2 * int(s.n_done.max()) + 16)
        self.body_caches: dict[int, KV] = {}
        for layer, (k, v) in body.capture.items():  # (B, H, N, hd)
            kc = k.new_zeros(self.B, c.n_heads, self.body_cap, c.head_dim)
            vc = torch.zeros_like(kc)
            kc[:, :, :n_ends], vc[:, :, :n_ends] = k, v
            self.body_caches[layer] = (kc, vc)
        return self._last_logits(xs[-1])

    def _grow_body(self, needed: int) -> None:
        if needed <= self.body_cap:
            return
        self.body_cap = max(needed, 2 * self.body_cap)
        for layer, (k, v) in self.body_caches.items():
            pad = self.body_cap - k.shape[2]
            self.body_caches[layer] = (
                F.pad(k, (0, 0, 0, pad)),
                F.pad(v, (0, 0, 0, pad)),
            )

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        c, s = self.config, self.state
        self._grow_body(int(s.n_done.max()) + 1)
        enc = KVCacheAttention(  # position and slot = index within the current sentence
            *self._rope(s.open_len), self.enc_caches, _dev(s.open_len, self.device), int(s.open_len.max()) + 1
        )  # fmt: skip
        # Body: ends in slots 0..n_done-1, the token itself in slot n_done (kept if EOS-S).
        n_done = _dev(s.n_done, self.device)  # also the position: sentence index in the document
        body = KVCacheAttention(
            *self._rope(n_done), self.body_caches, n_done, int(s.n_done.max()) + 1
        )
        x = self.model.embed(tokens[:, None])  # (B, 1, C)
        x = self.model.run_layers(x, enc, range(c.n_encoder_layers))
        x = self.model.run_layers(x, body, range(c.n_encoder_layers, c.n_layers))
        return self.model.head(x[:, 0])

    def cache_bytes(self) -> dict[str, float]:
        c, s = self.config, self.state
        per_slot = 2 * c.d_model * self.dtype.itemsize
        live = (
            float((c.n_encoder_layers * s.open_len + c.n_body_layers * s.n_done).mean()) * per_slot
        )
        tensors = [t for kv in [*self.enc_caches.values(), *self.body_caches.values()] for t in kv]
        return {"live": live, "allocated": self._bytes(*tensors)}


class _GPTHFSentenceCache(_Decoder):
    """The paper's fast path: cached sentence embeddings, encoder re-run over the sentence."""

    def prefill(self) -> Tensor:
        xs, _ = self._prefill_stages(capture=False)
        return self._fill_caches(xs)

    def _fill_caches(self, xs: list[Tensor]) -> Tensor:
        """Sentence embeddings and current-sentence tokens from the prompt's forward ``xs``;
        returns the last prompt token's logits."""
        c, s = self.config, self.state
        enc_out = xs[1]  # (B, P, C): encoder output = sentence embeddings at the ends
        # Sentence embeddings of the finished sentences, in order.
        self.emb_cap = 2 * int(s.n_done.max()) + 16
        ends = torch.zeros(self.B, self.emb_cap, dtype=torch.long, device=self.device)
        eos = self.ids == c.eos_id
        eos &= torch.arange(self.prompt_width, device=self.device)[None, :] < self.lengths[:, None]
        rank = eos.long().cumsum(dim=1) - 1
        t = torch.arange(self.prompt_width, device=self.device).expand(self.B, -1)
        dump = torch.full_like(rank, self.emb_cap - 1)
        ends.scatter_(1, torch.where(eos, rank, dump), t)
        self.emb = enc_out.gather(1, ends[:, :, None].expand(-1, -1, c.d_model))  # (B, cap, C)
        # Tokens of the unfinished sentence.
        self.sent_cap = max(self.M, int(s.open_len.max()) + 1)
        start = (self.lengths - _dev(s.open_len, self.device))[:, None]
        idx = (start + torch.arange(self.sent_cap, device=self.device)).clamp(
            max=self.prompt_width - 1
        )
        self.sentence = self.ids.gather(1, idx)  # (B, sent_cap)
        return self._last_logits(xs[-1])

    def _encode_fed(self, tokens: Tensor) -> Tensor:
        """The encoder over each row's current sentence with the fed token appended; returns
        the fed token's encoder state (B, C)."""
        c, s, m = self.config, self.state, self.model
        open_len = _dev(s.open_len, self.device)
        self.sentence[self.rows, open_len] = tokens
        S = int(s.open_len.max()) + 1
        # Encoder over the current sentence, positions 0..S-1 (right-padded rows).
        pos = torch.arange(S, device=self.device).expand(self.B, S)
        x = m.run_layers(
            m.embed(self.sentence[:, :S]),
            CausalAttention(*self._rope(pos)),
            range(c.n_encoder_layers),
        )
        return x[self.rows, open_len]

    def step(self, tokens: Tensor, active: np.ndarray) -> Tensor:
        c, s = self.config, self.state
        m = self.model
        if int(s.n_done.max()) + 1 > self.emb_cap:
            grow = self.emb.new_zeros(self.B, self.emb_cap, c.d_model)
            self.emb, self.emb_cap = torch.cat([self.emb, grow], dim=1), 2 * self.emb_cap
        h = self._encode_fed(tokens)  # (B, C)
        # Body over [finished sentence embeddings..., fed token], positions = slot index.
        n_done = _dev(s.n_done, self.device)
        N = int(s.n_done.max()) + 1
        self.emb[self.rows, n_done] = h  # becomes a sentence embedding if the token is EOS-S
        pos = torch.arange(N, device=self.device).expand(self.B, N)
        y = m.run_layers(
            self.emb[:, :N],
            CausalAttention(*self._rope(pos)),
            range(c.n_encoder_layers, c.n_layers),
        )
        return m.head(y[self.rows, n_done])  # fmt: skip

    def cache_bytes(self) -> dict[str, float]:
        c, s = self.config, self.state
        live = float(s.n_done.mean()) * c.d_model * self.dtype.itemsize
        live += float(s.open_len.mean()) * 8  # token ids of the current sentence
        return {"live": live, "allocated": self._bytes(self.emb, self.sentence)}


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
            cap = keep.shape[1] + 8  # grows (doubling) only when a row has no free slot
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


_DECODERS: dict[tuple[str, str], type[_Decoder]] = {
    ("gpthf", "full"): _Full,
    ("gpt", "full"): _Full,
    ("gpthf", "sentence-cache"): _GPTHFSentenceCache,
    ("gpthf", "kv"): _GPTHFKV,
    ("gpt", "kv"): _GPTKV,
}


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


def decoder_class(config: ModelConfig, mode: str) -> type[_Decoder]:
    """The decoder of ``mode`` for a model config (a pruning model's evicts what it drops)."""
    if config.prune:
        return _PRUNED_DECODERS.get((config.arch, mode), _DECODERS[(config.arch, mode)])
    return _DECODERS[(config.arch, mode)]


# --------------------------------------------------------------------------------------------
# Sampling and the loop


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row from logits (B, V): greedy when temperature == 0."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    mode: str = "kv",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    max_sentence_tokens: int | None = None,
    stop_at_eod: bool = True,
    suppress_tokens: Sequence[int] = (),
    force_tokens: Sequence[Sequence[int]] | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Continue each prompt (token ids; sentences end with EOS-S, the last may be unfinished).

    ``seed`` seeds a fresh ``torch.Generator`` on the model's device unless ``generator`` is
    given. ``max_sentence_tokens`` defaults to the model config's M. ``stop_at_eod=False``
    treats end-of-document as an ordinary token; ``suppress_tokens`` are never sampled (the
    pad token never is), though a forced EOS-S still happens (benchmarks: fixed workloads).

    ``force_tokens`` (teacher forcing): one list of ``max_new_tokens`` ids per prompt, fed in
    place of the sampled tokens, so models that would write different text decode the same
    sequence (benchmarks: equal work, caches compared on the same tokens). The loop is the
    sampling loop (the logits of every step, one host sync per step) without the sampling; the
    sentence cap still forces EOS-S (in place of the given token), and a given end-of-document
    stops its row as a sampled one would (``stop_at_eod``).
    """
    c = model.config
    if mode not in MODES[c.arch]:
        raise ValueError(
            f"mode {mode!r} is not available for {c.arch}; choose from {MODES[c.arch]}"
        )
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(p) == 0 for p in rows):
        raise ValueError("generate needs at least one prompt, and every prompt needs a token")
    if any(t < 0 or t >= c.vocab_size for p in rows for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {c.vocab_size})")
    M = max_sentence_tokens or c.max_sentence_tokens
    if M < 2:
        raise ValueError("max_sentence_tokens must be >= 2")
    device = model.embed.weight.device
    given_ids: Tensor | None = None
    if force_tokens is not None:
        given = [list(map(int, t)) for t in force_tokens]
        if len(given) != len(rows) or any(len(t) != max_new_tokens for t in given):
            raise ValueError(
                f"force_tokens needs one list of max_new_tokens ({max_new_tokens}) ids per "
                f"prompt ({len(rows)}); got lengths {[len(t) for t in given]}"
            )
        if any(t < 0 or t >= c.vocab_size for g in given for t in g):
            raise ValueError(f"force_tokens ids must lie in [0, {c.vocab_size})")
        given_ids = torch.tensor(given, dtype=torch.long, device=device)  # (B, max_new_tokens)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    banned = torch.tensor(sorted({c.pad_id, *map(int, suppress_tokens)}), device=device)
    B = len(rows)
    state = _State.from_prompts(rows, c.eos_id)
    decoder = decoder_class(c, mode)(model, rows, state, max_new_tokens, M)
    active = np.ones(B, dtype=bool)
    new: list[list[int]] = [[] for _ in range(B)]
    natural, forced = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    stopped = np.zeros(B, dtype=bool)
    recorded: list[Tensor] = []
    t_start = time.perf_counter()
    t_first = t_start
    with torch.inference_mode():
        logits = decoder.prefill()
        for step in range(max_new_tokens):
            active_dev = _dev(active, device)
            if return_logits:
                recorded.append(torch.where(active_dev[:, None], logits.float(), float("nan")))
            if given_ids is not None:
                tokens = given_ids[:, step]
            else:
                logits = logits.clone()
                logits[:, banned] = float("-inf")
                tokens = sample_next(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                )
            force = state.open_len >= M - 1
            tokens = torch.where(_dev(force, device), c.eos_id, tokens)
            tokens = torch.where(active_dev, tokens, c.pad_id)
            host = np.asarray(tokens.tolist(), dtype=np.int64)  # the one sync per step
            if step == 0:
                t_first = time.perf_counter()
            for b in np.flatnonzero(active):
                new[b].append(int(host[b]))
            eod = active & (host == c.eod_id) & stop_at_eod
            ended = sentence_ended(host, active, eod, state.open_len, c.eos_id)
            forced += ended & force
            natural += ended & ~force
            stopped |= eod
            feed = active & ~eod
            if step == max_new_tokens - 1 or not feed.any():
                break
            logits = decoder.step(tokens, feed)
            state.feed(host, feed, c.eos_id)
            active = feed
    t_end = time.perf_counter()
    return GenerationResult(
        prompts=rows,
        tokens=new,
        stopped_at_eod=stopped.tolist(),
        natural_ends=natural.tolist(),
        forced_ends=forced.tolist(),
        logits=torch.stack(recorded, dim=1) if return_logits else None,
        cache_bytes=decoder.cache_bytes(),
        pruning=decoder.pruning_stats(
            int((state.length if c.arch == "gpt" else state.n_done).max())
        )
        if isinstance(decoder, _EvictingMixin | _GPTHFPrunedSentenceCache)
        else None,
        seconds={"prefill": t_first - t_start, "decode": t_end - t_first},
    )
