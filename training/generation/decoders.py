"""The unpruned decoders of ``training.generation.decode`` and the per-row state they share.

A decoder holds one generation's caches: ``prefill()`` runs the prompts and returns the logits
of each row's last prompt token; ``step(tokens)`` feeds one token per row and returns the
logits after it. ``full`` re-runs the forward; GPT ``kv``; GPTHF ``kv`` and ``sentence-cache``
(module docstring of ``decode``). The decoders of pruning models, which evict, are in
``training.generation.pruned_decoders``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.model import Transformer
from training.model.attention import (
    KV,
    Attention,
    CausalAttention,
    KVCacheAttention,
    rope_tables,
)
from training.model.pruning import PruningRecord


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


_DECODERS: dict[tuple[str, str], type[_Decoder]] = {
    ("gpthf", "full"): _Full,
    ("gpt", "full"): _Full,
    ("gpthf", "sentence-cache"): _GPTHFSentenceCache,
    ("gpthf", "kv"): _GPTHFKV,
    ("gpt", "kv"): _GPTKV,
}
