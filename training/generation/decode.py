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
embeddings no remaining query can see. The decoders live in ``training.generation.decoders``
and, for pruning models, ``training.generation.pruned_decoders``; this module holds the
sampling and the loop. Prompts are ragged; rows are right-padded and each carries its own
state. A sentence that reaches ``max_sentence_tokens`` (EOS-S included, as in the data
pipeline) gets EOS-S forced; ``GenerationResult`` counts natural and forced sentence ends.
Generation of a row stops after ``max_new_tokens`` or when it produces end-of-document.
Text prompts and exports: ``training.generation.text``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from training.generation.decoders import (
    _DECODERS,
    PruningStats,
    _Decoder,
    _dev,
    _State,
    sentence_ended,
    sentence_ids_for,
)
from training.generation.pruned_decoders import (
    _PRUNED_DECODERS,
    _EvictingMixin,
    _GPTHFPrunedSentenceCache,
)
from training.model import ModelConfig, Transformer

__all__ = [
    "MODES",
    "GenerationResult",
    "PruningStats",
    "decoder_class",
    "generate",
    "sample_next",
    "sentence_ids_for",
]

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
