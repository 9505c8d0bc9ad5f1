"""Caches that evict what a pruning model dropped (Dynamic Context Pruning in ``kv`` mode).

One ``EvictingCache`` per pruned layer holds, per row and slot, the key and value, the
interaction key, and the running log keep of the entry (training.model.pruning). Each step:

1. the fed token's gates against every live slot are added to the slots' log keep;
2. slots whose keep reached 0 (log keep -inf) are freed: no later query can see them;
3. the token's own K/V go into the row's first free slot (freed slots are reused, so the
   cache's size follows the kept context, not the context), and it attends the live slots
   plus itself with log keep added to the logits: the same function as the full forward;
4. the own slot stays live if the entry is a key for later queries (GPT: every token; GPTHF
   body: a sentence end), otherwise it is free again.

RoPE is applied before a key is cached, so a slot's place in the cache carries no meaning,
which is what lets the cache give freed slots back (``compact``): after the prompt, and
whenever the fullest row holds at most half the capacity, every row's live slots move to its
front and the capacity is cut to what the fullest row needs. Attention, the gates and the keep
update then run over the kept context, not over every key ever written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.model.attention import Attention, attend
from training.model.pruning import NEG_INF, Gate


@dataclass
class EvictingCache:
    k: Tensor  # (B, H, capacity, hd)
    v: Tensor  # (B, H, capacity, hd)
    k_int: Tensor  # (B, capacity, r) fp32
    log_keep: Tensor  # (B, capacity) fp32, for the latest query
    live: Tensor  # (B, capacity) bool
    window: int = 0
    """Slots a step reads and writes: [0, window) holds every row's live slots and a free one
    for the fed token (set by ``ensure_free_slot``; 0: the whole capacity)."""

    @classmethod
    def from_prefill(
        cls, k: Tensor, v: Tensor, k_int: Tensor, log_keep: Tensor, live: Tensor, capacity: int
    ) -> EvictingCache:
        """k, v: (B, H, >= N, hd); k_int: (B, N, r); log_keep, live: (B, N) after the last prompt
        token; slots N..capacity-1 start free."""
        n = log_keep.shape[1]
        pad = max(capacity - n, 0)
        cache = cls(
            k=F.pad(k[:, :, :n], (0, 0, 0, pad)),
            v=F.pad(v[:, :, :n], (0, 0, 0, pad)),
            k_int=F.pad(k_int.float(), (0, 0, 0, pad)),
            log_keep=F.pad(torch.where(live, log_keep.float(), 0.0), (0, pad)),
            live=F.pad(live, (0, pad), value=False),
        )
        cache.compact(min(capacity, headroom(int(live.sum(dim=1).max()) + 1)))
        return cache

    @property
    def capacity(self) -> int:
        return self.live.shape[1]

    def grow(self, capacity: int) -> None:
        pad = capacity - self.capacity
        if pad <= 0:
            return
        self.k, self.v = F.pad(self.k, (0, 0, 0, pad)), F.pad(self.v, (0, 0, 0, pad))
        self.k_int = F.pad(self.k_int, (0, 0, 0, pad))
        self.log_keep = F.pad(self.log_keep, (0, pad))
        self.live = F.pad(self.live, (0, pad), value=False)

    def compact(self, capacity: int) -> None:
        """Each row's live slots to its front, in slot order, and the capacity to
        ``capacity`` (at least the fullest row's live count): the slots every row freed are
        given back at once. Free slots keep whatever they held (never read: not live)."""
        live_first = torch.argsort((~self.live).to(torch.uint8), dim=1, stable=True)
        order = live_first[:, :capacity]  # (B, capacity)
        B, H, _, hd = self.k.shape
        kv_index = order[:, None, :, None].expand(B, H, capacity, hd)
        self.k, self.v = self.k.gather(2, kv_index), self.v.gather(2, kv_index)
        self.k_int = self.k_int.gather(1, order[:, :, None].expand(-1, -1, self.k_int.shape[2]))
        self.log_keep = self.log_keep.gather(1, order)
        self.live = self.live.gather(1, order)

    def slot_bytes(self) -> int:
        """Bytes one live slot holds (K, V, interaction key, log keep)."""
        H, hd, r = self.k.shape[1], self.k.shape[3], self.k_int.shape[2]
        return 2 * H * hd * self.k.element_size() + 4 * r + 4

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v, self.k_int, self.log_keep, self.live]


def headroom(needed: int) -> int:
    """The capacity a cache is cut to when ``needed`` slots are in use: a quarter more (at
    least 8), so that it neither grows again at once nor is compacted at every step."""
    return needed + max(8, needed // 4)


def ensure_free_slot(caches: dict[int, EvictingCache]) -> None:
    """Before a step: every row of every cache needs one free slot for the fed token (live
    counts only fall during a step, and rise by at most one); a cache whose fullest row uses at
    most half of it is compacted. One host sync per step for all the caches."""
    if not caches:
        return
    counts = torch.stack([_used(c) for c in caches.values()]).tolist()  # the one sync
    for c, (live, end) in zip(caches.values(), counts, strict=True):
        n = live + 1
        if n > c.capacity:
            c.grow(max(n, 2 * c.capacity))
        elif 2 * n <= c.capacity and headroom(n) < c.capacity:
            c.compact(headroom(n))
            end = live  # compacted: every row's live slots are its first ones
        # Slot ``end`` is free in every row (no row has a live slot at or past it): the step
        # works on [0, end], not on the whole capacity (headroom, slots freed above).
        c.window = min(end + 1, c.capacity)


def _used(c: EvictingCache) -> Tensor:
    """(2,): the most live slots of a row, and 1 + the highest live slot index of any row."""
    index = torch.arange(1, c.capacity + 1, device=c.live.device)
    return torch.stack([c.live.sum(dim=1).max(), (c.live * index).max()])


class EvictingKVAttention(Attention):
    """One fed token per row against ``EvictingCache``s (see the module docstring).

    keep_self: (B,) bool, whether the fed token stays as a key for later queries.
    """

    def __init__(
        self, cos: Tensor, sin: Tensor, caches: dict[int, EvictingCache], keep_self: Tensor
    ) -> None:
        super().__init__(cos, sin)
        self.caches, self.keep_self = caches, keep_self
        self.rows = torch.arange(keep_self.shape[0], device=keep_self.device)
        self.evicted: dict[int, Tensor] = {}
        """Per layer, (B, window) bool: the slots this step freed."""

    def __call__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, gate: Gate | None = None
    ) -> Tensor:
        if gate is None:
            raise ValueError(f"layer {layer} has no pruning gate but its cache evicts")
        c, rows = self.caches[layer], self.rows
        w = c.window or c.capacity  # views of the slots this step touches
        live, log_keep = c.live[:, :w], c.log_keep[:, :w]
        log_gates = gate.log_gates(gate.q_int, c.k_int[:, :w])[:, 0]  # (B, 1, r) x (B, w, r)
        log_keep.copy_(torch.where(live, log_keep + log_gates, log_keep))
        dropped = live & (log_keep == NEG_INF)
        self.evicted[layer] = dropped
        live &= ~dropped
        slot = (~live).int().argmax(dim=1)  # (B,) the first free slot (ensure_free_slot)
        c.k[rows, :, slot] = k[:, 0]  # (B, H, hd)
        c.v[rows, :, slot] = v[:, 0]
        c.k_int[rows, slot] = gate.k_int[:, 0]
        log_keep[rows, slot] = 0.0
        live[rows, slot] = True  # it attends to itself
        bias = torch.where(live, log_keep, NEG_INF)[:, None, None, :]  # (B, 1, 1, w)
        out = attend(
            q.transpose(1, 2), c.k[:, :, :w], c.v[:, :, :w], attn_mask=bias.to(q.dtype)
        )  # (B, H, 1, hd)
        live[rows, slot] = self.keep_self
        return out.transpose(1, 2)  # (B, 1, H, hd)
