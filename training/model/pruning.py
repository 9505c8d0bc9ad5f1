"""Dynamic Context Pruning (Anagnostidis et al. 2023, arXiv 2305.15805; DESIGN.md section 2).

Each pruned layer has small interaction projections (width r) of its normed input. A later
query n gates an earlier key j with ``sigma_alpha(q_int[n] . k_int[j] / sqrt(r) + beta)``; the
key is kept for query k with the running product of the gates of every query after it up to
and including k, so once a gate says 0 the key stays dropped and a cache can evict it:

    log keep[k, j] = sum_{j < n <= k} log sigma_alpha(q_int[n] . k_int[j] / sqrt(r) + beta)

``log keep`` is added to the attention logits (a query's own key is always kept). With
alpha = 1 the gate is the ordinary sigmoid (never exactly 0); with alpha > 1 it is the first
coordinate of alpha-entmax([x, 0]), which reaches exact zeros and ones. Training anneals alpha
from 1 to its final value and adds lambda x (fraction of kept interactions) to the loss.

Which keys a layer prunes: GPT layers prune earlier tokens of the document; GPTHF body layers
prune the ends (embeddings) of earlier sentences of the document, never tokens of the current
sentence (the encoder has no gate). The gates are pairwise, so a pruned layer forms one
(queries x keys) gate matrix per document (GPT) or per document x sentence ends (GPTHF body),
the same size as that layer's attention scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

NEG_INF = float("-inf")


class _AlphaSigmoid(torch.autograd.Function):
    """First coordinate p of alpha-entmax([x, 0]) for alpha > 1.

    With e = alpha - 1, p solves p**e - (1 - p)**e = e * x (clamped: p = 1 for e * x >= 1,
    p = 0 for e * x <= -1). The left side is odd about p = 1/2 and increasing, so we solve for
    s = |e * x| on [1/2, 1] and mirror. Safeguarded Newton: each step keeps a bracket [lo, hi]
    of the root and falls back to bisection when the Newton point leaves it. It starts at
    max(s**(1/e), (1 + s) / 2), close to the root both for large e (where (1-p)**e vanishes)
    and for e near 1 (where the equation is linear), and converges within ITERATIONS for
    alpha from 1.0001 to 200 (tests/test_pruning_model.py holds it to a 60-step bisection).
    It replaced a 24-step bisection: 2 ``pow`` per step instead of 2 x 24 (what that did to
    generation speed: benchmarks/README.md, pruning). The gradient is the implicit one,
    dp/dx = 1 / (p**(e-1) + (1-p)**(e-1)) inside (0, 1), 0 at the clamps. (The ``entmax`` package solves the general
    n-way problem by bisection over a whole dimension; this two-point case is one scalar
    equation per pair.)

    Every element is solved on its own with a fixed number of steps, so a (queries x keys)
    training forward and a cache's one query at a time give bit-identical gates.
    """

    ITERATIONS: ClassVar[dict[torch.dtype, int]] = {torch.float64: 10, torch.float32: 6}
    """Newton steps: past the dtype's resolution of p in the sweep the tests run."""

    FP64_BELOW_E = 0.05
    """For alpha - 1 below this, both sides of the equation are within e of each other near 1
    and fp32 cancels: the first steps of annealing solve in fp64."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        # In x's dtype: training gates are (queries x keys) per layer, and fp32 halves the
        # cost (the log gates call it in fp32; gradcheck in fp64).
        e = alpha - 1.0
        work = x.double() if e < _AlphaSigmoid.FP64_BELOW_E else x
        a = (work * e).clamp(-1.0, 1.0)
        s = a.abs()
        lo = s.pow(1.0 / e).clamp_min(0.5)  # f(s**(1/e)) = -(1 - p)**e <= 0: below the root
        hi = torch.ones_like(s)
        p = torch.maximum(lo, 0.5 + 0.5 * s)
        for _ in range(_AlphaSigmoid.ITERATIONS.get(work.dtype, 10)):
            q = 1 - p
            p_e1, q_e1 = p.pow(e - 1), q.pow(e - 1)
            # q ** e as q * q ** (e - 1): one pow fewer; at q = 0 (e < 1: 0 * inf) it is 0.
            f = p * p_e1 - torch.where(q > 0, q * q_e1, 0.0) - s
            above = f > 0
            hi = torch.where(above, p, hi)
            lo = torch.where(above, lo, p)
            step = p - f / (e * (p_e1 + q_e1))
            p = torch.where((step >= lo) & (step <= hi), step, (lo + hi) * 0.5)
        p = torch.where(a >= 0, p, 1 - p)
        p = torch.where(a >= 1.0, 1.0, torch.where(a <= -1.0, 0.0, p)).to(x.dtype)
        ctx.e = e
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        inside = (p > 0) & (p < 1)
        q = p.clamp(1e-12, 1 - 1e-12)
        slope = 1.0 / (q.pow(ctx.e - 1) + (1 - q).pow(ctx.e - 1))
        return grad * torch.where(inside, slope, 0.0).to(grad.dtype), None


def alpha_sigmoid(x: Tensor, alpha: float) -> Tensor:
    """sigma_alpha(x): the sigmoid at alpha = 1, exact 0 and 1 outside |x| < 1/(alpha-1) above."""
    if alpha < 1:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    if alpha == 1.0:
        return torch.sigmoid(x)
    return _AlphaSigmoid.apply(x, alpha)


def log_alpha_sigmoid(x: Tensor, alpha: float) -> Tensor:
    """log sigma_alpha(x), -inf exactly where the gate is 0; gradients stay finite there."""
    if alpha == 1.0:
        return nn.functional.logsigmoid(x)
    p = alpha_sigmoid(x, alpha)
    # The clamp keeps log's gradient finite where p == 0; ``where`` then routes none of it.
    return torch.where(p > 0, p.clamp_min(1e-30).log(), NEG_INF)


class Pruner(nn.Module):
    """One layer's interaction projections and gate bias beta."""

    def __init__(self, d_model: int, dim: int, init_bias: float) -> None:
        super().__init__()
        self.dim = dim
        self.interaction = nn.Linear(d_model, 2 * dim, bias=False)  # [q_int | k_int]
        self.gate_bias = nn.Parameter(torch.full((1,), float(init_bias)))
        self.alpha = 1.0
        """Set by ``Transformer.set_prune_alpha`` (annealed in training, final at inference)."""

    def forward(self, h: Tensor) -> Gate:
        q_int, k_int = self.interaction(h).float().chunk(2, dim=-1)  # (B, T, r) each, fp32
        return Gate(q_int, k_int, self.gate_bias.float(), self.alpha)


@dataclass
class Gate:
    """A layer's interaction queries/keys for one forward, and how to turn them into gates."""

    q_int: Tensor  # (..., T, r) fp32
    k_int: Tensor  # (..., T, r) fp32
    bias: Tensor  # (1,)
    alpha: float

    def log_gates(self, q_int: Tensor, k_int: Tensor) -> Tensor:
        """log gate of each query against each key: (..., Lq, r) x (..., Lk, r) -> (..., Lq, Lk),
        fp32. The products are taken in fp64: near the gate's zero the log gate is steep, and
        the training forward (a (L, L) product) and a cache (one query at a time) must agree
        on it to far below fp32's rounding of a differently ordered sum."""
        x = q_int.double() @ k_int.double().transpose(-1, -2)
        x = x / math.sqrt(q_int.shape[-1]) + self.bias.double()
        return log_alpha_sigmoid(x.float(), self.alpha)


def running_keep(log_gates: Tensor, gated: Tensor) -> Tensor:
    """log keep: the cumulative sum of the log gates along the query axis (-2), counting only
    the ``gated`` (query, key) pairs; -inf once any counted gate was 0."""
    return torch.where(gated, log_gates, 0.0).cumsum(dim=-2)


@dataclass
class PruningRecord:
    """What a forward's pruned layers kept, per layer index.

    ``kept``: sum of keep over the gated (query, key) pairs, a tensor that carries gradient (the
    sparsity loss); ``pairs``: the number of those pairs. ``keep``: when ``capture`` is set,
    each layer's log keep as the pattern computed it (for generation caches and reports).
    """

    kept: dict[int, Tensor] = field(default_factory=dict)
    pairs: dict[int, Tensor] = field(default_factory=dict)
    capture: bool = False
    keep: dict[int, list[Tensor]] = field(default_factory=dict)
    """Per layer, when ``capture``: per routing group (n, L, keys) log keep of each query (GPT:
    keys are the run's tokens; GPTHF body: its sentence ends in order). Rows that are single
    runs from position 0 (generation) form one group of (B, T, keys)."""
    k_int: dict[int, Tensor] = field(default_factory=dict)
    """Per layer, when ``capture``: (B, keys, r) interaction keys of those keys."""
    per_query: bool = False
    query_sums: dict[int, Tensor] = field(default_factory=dict)
    """Per layer, when ``per_query``: (B, T, 3) for each query position: keep summed over its
    gated keys, how many of them are still live (keep > 0: what a cache holds), and how many
    gated keys it has (0 on padding)."""

    def add(self, layer: int, log_keep: Tensor, gated: Tensor) -> None:
        kept = torch.where(gated, log_keep.exp(), 0.0).sum()
        pairs = gated.sum()
        if layer in self.kept:  # a layer attended in several groups (documents of one length)
            kept, pairs = kept + self.kept[layer], pairs + self.pairs[layer]
        self.kept[layer], self.pairs[layer] = kept, pairs

    def kept_fraction(self) -> Tensor:
        """Fraction of kept interactions over all pruned layers' gated pairs (0-dim, with grad)."""
        if not self.kept:
            return torch.zeros(())
        kept = torch.stack(list(self.kept.values())).sum()
        pairs = torch.stack(list(self.pairs.values())).sum()
        return kept / pairs.clamp_min(1)

    def per_layer(self) -> dict[int, float]:
        """Kept fraction of each pruned layer (1.0 for a layer that saw no gated pair)."""
        kept, pairs = self.totals()
        return {layer: kept[layer] / pairs[layer] if pairs[layer] else 1.0 for layer in kept}

    def totals(self) -> tuple[dict[int, float], dict[int, float]]:
        """(kept, pairs) per layer as floats, for summing over batches and ranks (one host
        read for all layers, not two per layer)."""
        layers = sorted(self.kept)
        if not layers:
            return {}, {}
        values = torch.stack(
            [self.kept[k].detach().double() for k in layers]
            + [self.pairs[k].double() for k in layers]
        ).tolist()
        n = len(layers)
        kept = dict(zip(layers, values[:n], strict=True))
        pairs = dict(zip(layers, values[n:], strict=True))
        return kept, pairs
