"""Analytic FLOPs of GPTHF and the GPT: forward, training step, one generation step per mode.

Conventions: a matmul (m x k) @ (k x n) costs 2mkn. Per token and layer the projections cost
2 * (4 d^2 + 3 d f) (QKV 3d^2, output d^2, SwiGLU 3 d f); attention costs 4 d per attended key
(scores and weighted values, all heads); the tied LM head 2 d V per position whose logits are
computed. Norms, RoPE, softmax and the SwiGLU gate are elementwise and not counted.

``attended`` (default) counts the keys each query actually sees: causal prefixes, its
sentence, its document's earlier sentence ends plus itself. ``dense`` counts the rectangles a
non-fused kernel computes for one document run alone: T x T for the GPT, s_max x s_max per
sentence in the encoder, T x (sentences + 1) in the body (what ``FlopCounterMode`` sees with
the math SDPA backend, except the body's self term, which is elementwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from training.model import ModelConfig


@dataclass(frozen=True)
class Flops:
    linear: float = 0.0
    """QKV, output and MLP projections."""
    attention: float = 0.0
    """Attention scores and weighted values."""
    head: float = 0.0
    """Tied LM head."""

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head

    def __add__(self, other: Flops) -> Flops:
        return Flops(
            self.linear + other.linear, self.attention + other.attention, self.head + other.head
        )

    def __mul__(self, k: float) -> Flops:
        return Flops(self.linear * k, self.attention * k, self.head * k)

    __rmul__ = __mul__


def linear_flops_per_token_layer(c: ModelConfig) -> float:
    return 2.0 * (4 * c.d_model**2 + 3 * c.d_model * c.ffn_dim)


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def document_forward_flops(
    c: ModelConfig, sentence_lengths: Sequence[int], *, logits: str = "all", dense: bool = False
) -> Flops:
    """Forward over one document given its sentence lengths (EOS-S included).

    logits: "all" (training), "last" (generation prefill) or "none".
    """
    lens = [int(n) for n in sentence_lengths]
    T = sum(lens)
    per_key = 4.0 * c.d_model
    linear = T * c.n_layers * linear_flops_per_token_layer(c)
    if c.arch == "gpt":
        keys = T * T if dense else _tri(T)
        attention = c.n_layers * per_key * keys
    else:
        n = len(lens)
        enc_keys = n * max(lens) ** 2 if dense else sum(_tri(s) for s in lens)
        # A token of sentence k (0-based) sees k earlier ends plus itself.
        body_keys = T * (n + 1) if dense else sum(s * (k + 1) for k, s in enumerate(lens))
        attention = per_key * (c.n_encoder_layers * enc_keys + c.n_body_layers * body_keys)
    positions = {"all": T, "last": 1, "none": 0}[logits]
    return Flops(linear, attention, 2.0 * c.d_model * c.vocab_size * positions)


def forward_flops(
    c: ModelConfig, documents: Sequence[Sequence[int]], *, logits: str = "all", dense: bool = False
) -> Flops:
    """Forward over several documents (each a list of sentence lengths), e.g. a packed batch."""
    total = Flops()
    for doc in documents:
        total = total + document_forward_flops(c, doc, logits=logits, dense=dense)
    return total


def train_step_flops(c: ModelConfig, documents: Sequence[Sequence[int]]) -> Flops:
    """Forward + backward (2x forward) over the documents: 3x the forward."""
    return 3 * forward_flops(c, documents)


def uniform_document(context: int, sentence_len: int) -> list[int]:
    """Sentence lengths of a document of ``context`` tokens in sentences of ``sentence_len``."""
    full, rest = divmod(context, sentence_len)
    return [sentence_len] * full + ([rest] if rest else [])


def flops_per_token(c: ModelConfig, context: int, sentence_len: int = 25) -> Flops:
    """Training forward FLOPs per token over documents of ``context`` tokens."""
    return document_forward_flops(c, uniform_document(context, sentence_len)) * (1.0 / context)


def generation_step_flops(
    c: ModelConfig, mode: str, sentence_lengths: Sequence[int], *, dense: bool = False
) -> Flops:
    """One generation step: the context (sentence lengths, the last one possibly unfinished)
    already includes the token being fed; returns the FLOPs to get the next token's logits.
    ``dense``: count the causal re-runs (full, sentence-cache) as full rectangles."""
    lens = [int(n) for n in sentence_lengths]
    T, s, n_done = sum(lens), lens[-1], len(lens) - 1
    lin = linear_flops_per_token_layer(c)
    per_key = 4.0 * c.d_model
    head = 2.0 * c.d_model * c.vocab_size
    tri = (lambda n: n * n) if dense else _tri
    if mode == "full":
        return document_forward_flops(c, lens, logits="last", dense=dense)
    if mode == "kv" and c.arch == "gpt":
        return Flops(c.n_layers * lin, c.n_layers * per_key * T, head)
    if mode == "kv":  # one token through all layers; s keys in the encoder, n_done + 1 in the body
        return Flops(
            c.n_layers * lin,
            per_key * (c.n_encoder_layers * s + c.n_body_layers * (n_done + 1)),
            head,
        )
    if mode == "sentence-cache" and c.arch == "gpthf":
        # Encoder over the s tokens of the sentence, body over n_done embeddings + the token.
        return Flops(
            (c.n_encoder_layers * s + c.n_body_layers * (n_done + 1)) * lin,
            per_key * (c.n_encoder_layers * tri(s) + c.n_body_layers * tri(n_done + 1)),
            head,
        )
    raise ValueError(f"no generation mode {mode!r} for {c.arch}")


def sentence_lengths_of(tokens: Sequence[int], eos_id: int) -> list[int]:
    lens, cur = [], 0
    for t in tokens:
        cur += 1
        if t == eos_id:
            lens.append(cur)
            cur = 0
    return [*lens, cur] if cur else lens


def prefill_flops(c: ModelConfig, prompt: Sequence[int], *, dense: bool = False) -> Flops:
    """The forward over the prompt that yields the first new token's logits."""
    return document_forward_flops(
        c, sentence_lengths_of(prompt, c.eos_id), logits="last", dense=dense
    )


def decode_flops(
    c: ModelConfig,
    mode: str,
    prompt: Sequence[int],
    new_tokens: Sequence[int],
    *,
    dense: bool = False,
) -> Flops:
    """The steps after the prefill: one per new token but the last (which is never fed)."""
    total = Flops()
    lens = sentence_lengths_of(prompt, c.eos_id)
    open_sentence = bool(prompt) and prompt[-1] != c.eos_id
    for t in new_tokens[:-1]:
        if open_sentence:
            lens[-1] += 1
        else:
            lens.append(1)
        open_sentence = t != c.eos_id
        total = total + generation_step_flops(c, mode, lens, dense=dense)
    return total


def generation_flops(
    c: ModelConfig,
    mode: str,
    prompt: Sequence[int],
    new_tokens: Sequence[int],
    *,
    dense: bool = False,
) -> Flops:
    """All FLOPs to generate ``new_tokens`` after ``prompt``: prefill plus decode steps."""
    return prefill_flops(c, prompt, dense=dense) + decode_flops(
        c, mode, prompt, new_tokens, dense=dense
    )
