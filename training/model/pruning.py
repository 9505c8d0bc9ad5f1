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
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

NEG_INF = float("-inf")


LOG_HALF = math.log(0.5)

PruneRule = Literal["step", "soft"]
PRUNE_RULES: tuple[PruneRule, ...] = ("step", "soft")
"""How a trained model's gates decide at inference (evaluation, generation). ``step``, the
default, is the paper's rule (alpha = infinity): keep an interaction iff its gate logit is > 0,
so every keep is 0 or 1 and a cache evicts exactly where a gate drops. ``soft`` keeps the gate
at the final alpha training annealed towards (the model config's ``prune_alpha``): keeps are
fractional and a cache evicts only where one reaches 0. Training always uses the annealed
alpha."""


def _solve_log_alpha_sigmoid(s: Tensor, e: float) -> tuple[Tensor, Tensor]:
    """(log p, log q) of the gate at |x| = ``s`` (fp64, 0 <= e s < 1): p = sigma_alpha(s) in
    [1/2, 1), q = 1 - p, the root of p**e - q**e = e s.

    Both logs are wanted to full relative precision, far into the tails: log p is a tiny
    negative number where a gate is nearly open (summed over many queries into a keep), log q
    is what a nearly closed gate contributes (-16 at alpha = 1.04, x = -12). So the solver
    works on logs, and which log it iterates on depends on alpha (a scalar, so every element
    takes the same steps: a (queries x keys) forward and a cache's one query at a time agree
    bit for bit):

    - e <= 1 (alpha <= 2, the whole anneal up to 2): Newton on u = log q of
      F(u) = (p**e - q**e) / e - s, its powers as expm1(e log p), expm1(e u). As e -> 0 this is the
      logistic, log(1 - exp(u)) - u = s, on which Newton is quadratic from the start; it
      starts at min(-softplus(s), log(1 - e s) / e) (the e = 0 root, and the root where p**e
      is near 1) and is kept above a lower bound of the root: q >= min((c/2)**(1/e), c/2),
      c = 1 - e s (from p**e >= 1 - q and q**e + (1 - p**e) >= c).
    - e > 1: Newton on L = log p of H(L) = L - log(e s + q**e) / e, whose slope
      1 + p q**(e-1) / (e s + q**e) is at least 1 (q**(e-1) vanishes as q does, where e < 1
      it would blow up), starting at max(-softplus(-s), log(e s) / e); log(e s + q**e) as
      log1p(e s - 1 + q**e) where it is near 0, plain log where it is not.

    Step counts: enough for a relative error under 1e-9 in both logs against a 200-digit
    reference, alpha from 1 + 1e-9 to 200, |x| up to 1e4 and to within 1e-7 of the clamp
    (tests/test_pruning_model.py).
    """
    a = s * e
    if e <= 1:
        c = 1 - a
        floor = torch.minimum(torch.log(c / 2) / e, torch.log(c / 2))
        u = torch.minimum(-nn.functional.softplus(s), torch.log(c) / e).clamp(max=LOG_HALF)
        for _ in range(_LogAlphaSigmoid.STEPS_LOG_Q):
            q = u.exp()
            p = 1 - q
            p_e1, q_e1 = torch.expm1(e * torch.log1p(-q)), torch.expm1(e * u)  # p**e - 1, q**e - 1
            f = (p_e1 - q_e1) / e - s
            slope = q * (1 + p_e1) / p + (1 + q_e1)  # -F'(u) = q p**(e-1) + q**e
            u = torch.maximum(u + f / slope, floor).clamp(max=LOG_HALF)
        return torch.log1p(-u.exp()), u
    log_p = torch.maximum(-nn.functional.softplus(-s), a.log() / e).clamp(LOG_HALF, -1e-300)
    for _ in range(_LogAlphaSigmoid.STEPS_LOG_P):
        q = -torch.expm1(log_p)
        q_e = torch.exp(e * q.log())  # q**e (may be far below fp64's epsilon: kept apart from 1)
        t = a + q_e  # p**e, no cancellation
        # log1p keeps a tiny log p exact where p**e is near 1 (a - 1 is exact there: a >= 1/2);
        # where p**e is small, (a - 1) + q**e would cancel (2**-43 + (-1)) and log is exact.
        h = log_p - torch.where(t < 0.5, t.log(), torch.log1p((a - 1) + q_e)) / e
        slope = 1 + (1 - q) * q_e / (q * (a + q_e))  # 1 + p q**(e-1) / (a + q**e)
        log_p = (log_p - h / slope).clamp(LOG_HALF, -1e-300)
    return log_p, torch.log(-torch.expm1(log_p))


class _LogAlphaSigmoid(torch.autograd.Function):
    """log sigma_alpha(x) for alpha > 1, where sigma_alpha(x) is the first coordinate p of
    alpha-entmax([x, 0]): with e = alpha - 1, p**e - (1 - p)**e = e x, clamped (p = 1 for
    e x >= 1, p = 0 for e x <= -1). The curve is odd about (0, 1/2), so it is solved at |x|
    (:func:`_solve_log_alpha_sigmoid`) and mirrored. Always in fp64, whatever x's dtype: the
    equation's two sides agree to within e of each other for small e, and the tails need
    logs of numbers fp32 cannot hold (log q = -100 at x = -100 near alpha = 1); the result
    is returned in x's dtype.

    The gradient is the implicit one: dp/dx = 1 / (p**(e-1) + q**(e-1)), so
    d log p / dx = exp(-log p - logaddexp((e-1) log p, (e-1) log q)), finite everywhere
    inside and 0 at the clamps. (The ``entmax`` package solves the general n-way problem by
    bisection over a whole dimension; this two-point case is one scalar equation per pair.)
    """

    STEPS_LOG_Q: ClassVar[int] = 5
    """Newton steps on log q (alpha <= 2)."""
    STEPS_LOG_P: ClassVar[int] = 4
    """Newton steps on log p (alpha > 2)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        e = alpha - 1.0
        xd = x.double()
        pos = xd >= 0
        inside = xd.abs() * e < 1
        # Every element is solved (at |x| = 0 where it is clamped): selecting the ones inside
        # the clamps would be a data-dependent shape, a host sync per pruned layer on a GPU
        # (tests/test_host_syncs.py), for a saving only where most gates sit at 0 or 1.
        s = torch.where(inside, xd.abs(), 0.0)
        log_p, log_q = _solve_log_alpha_sigmoid(s, e)
        clamped_out = torch.where(pos, 0.0, NEG_INF)  # log sigma(x) at the clamps
        out = torch.where(inside, torch.where(pos, log_p, log_q), clamped_out)
        other = torch.where(inside, torch.where(pos, log_q, log_p), torch.where(pos, NEG_INF, 0.0))
        ctx.e = e
        ctx.save_for_backward(out, other, inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out, other, inside = ctx.saved_tensors
        e1 = ctx.e - 1.0
        log_slope = -out - torch.logaddexp(e1 * out, e1 * other)
        slope = torch.where(inside, log_slope.exp(), 0.0)  # nothing flows from a clamp
        return grad * slope.to(grad.dtype), None


def log_alpha_sigmoid(x: Tensor, alpha: float) -> Tensor:
    """log sigma_alpha(x): log of the sigmoid at alpha = 1; for alpha > 1 exactly 0 for
    x >= 1/(alpha - 1) and -inf for x <= -1/(alpha - 1), exact in both tails in between
    (:class:`_LogAlphaSigmoid`); gradients finite everywhere. At alpha = inf the limit, the
    paper's inference rule: 0 where x > 0, -inf elsewhere (x = 0 drops), without gradient."""
    if alpha < 1:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    if alpha == 1.0:
        return nn.functional.logsigmoid(x)
    if math.isinf(alpha):  # the step rule: keep iff the logit is > 0 (no gradient: inference)
        return torch.where(x > 0, 0.0, NEG_INF).to(x.dtype)
    return _LogAlphaSigmoid.apply(x, alpha)


def alpha_sigmoid(x: Tensor, alpha: float) -> Tensor:
    """sigma_alpha(x): the sigmoid at alpha = 1, exact 0 and 1 outside |x| < 1/(alpha-1) above."""
    if alpha == 1.0:
        return torch.sigmoid(x)
    return log_alpha_sigmoid(x, alpha).exp()


class Pruner(nn.Module):
    """One layer's interaction projections and gate bias beta.

    The projections start at N(0, init_std = 0.02) like every linear of the model. The paper's
    code writes N(0, 1/sqrt(d)) into its q_int and k_int, but its GPT then re-initialises every
    ``nn.Linear`` to N(0, 0.02) (``self.apply(self._init_weights)`` after the blocks are
    built), so 0.02 is what it trains with too."""

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

    def log_gates(self, q_int: Tensor, k_int: Tensor, only: Tensor | None = None) -> Tensor:
        """log gate of each query against each key: (..., Lq, r) x (..., Lk, r) -> (..., Lq, Lk),
        fp32. The products are taken in fp64: near the gate's zero the log gate is steep, and
        the training forward (a (L, L) product) and a cache (one query at a time) must agree
        on it to far below fp32's rounding of a differently ordered sum. ``only`` (bool,
        broadcastable): the pairs that are gated; the others come back 0 with no gradient, as
        gates past the clamp (a GPT's (L, L) matrix is half keys after their query)."""
        x = q_int.double() @ k_int.double().transpose(-1, -2)
        x = x / math.sqrt(q_int.shape[-1]) + self.bias.double()
        if only is not None:
            x = torch.where(only, x, math.inf)  # past the clamp: log gate 0, no gradient
        return log_alpha_sigmoid(x, self.alpha).float()  # solved in fp64 either way


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
