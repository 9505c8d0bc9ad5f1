"""Text in, text out: prompt encoding like the data pipeline, and generation from an export.

``training.generation.decode`` works on token ids; this module adds the tokenizer (prompts are
split into sentences and encoded exactly as ``gpthf preprocess`` encodes documents) and the
export loading used by ``gpthf generate`` and the demo.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.errors import UserError
from training.generation.decode import MODES, GenerationResult, generate
from training.generation.pruning_report import PruningReport, pruning_report
from training.model import Transformer
from training.model.pruning import PruneRule

_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")


class GenerationError(UserError):
    """A prompt or mode cannot be generated from; the message says why."""


def encode_prompt(
    tokenizer: Any,
    text: str,
    *,
    eos_id: int,
    max_sentence_tokens: int,
    close_last_sentence: bool | None = None,
) -> list[int]:
    """Token ids of a prompt, sentence by sentence as the data pipeline encodes documents.

    Sentences come from blingfire (via ``pipeline.text``), are tokenized alone and end with
    EOS-S; longer ones are split into pieces of at most M tokens, EOS-S included. The last
    sentence stays open (no EOS-S, so the model continues it) unless ``close_last_sentence``,
    which by default is true when the text ends with sentence-final punctuation.
    """
    from pipeline.packing import sentence_pieces
    from pipeline.text import normalise, split_sentences

    sentences = split_sentences(normalise(text))
    if not sentences:
        raise GenerationError(f"the prompt {text!r} has no text to condition on")
    if close_last_sentence is None:
        close_last_sentence = bool(_SENTENCE_END.search(sentences[-1]))
    ids: list[int] = []
    # Text that spells a special token is text, as the data pipeline encodes it.
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    for i, enc in enumerate(encodings):
        pieces = sentence_pieces(list(enc.ids), max_sentence_tokens)
        for k, piece in enumerate(pieces):
            last = i == len(encodings) - 1 and k == len(pieces) - 1
            ids += piece if last and not close_last_sentence else [*piece, eos_id]
    return ids


def generate_text(
    model: Transformer,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    close_last_sentence: bool | None = None,
    **kwargs: Any,
) -> tuple[list[str], GenerationResult]:
    """Generate continuations of text prompts; returns the decoded new text and the result."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    c = model.config
    M = kwargs.get("max_sentence_tokens") or c.max_sentence_tokens
    ids = [
        encode_prompt(tokenizer, t, eos_id=c.eos_id, max_sentence_tokens=M, close_last_sentence=close_last_sentence)
        for t in texts
    ]  # fmt: skip
    result = generate(model, ids, max_new_tokens=max_new_tokens, **kwargs)
    out = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in result.tokens]
    return out, result


@dataclass(frozen=True)
class GeneratedText:
    """What ``generate_from_export`` produced, with its speed and sentence-end statistics."""

    arch: str
    """gpthf or gpt."""
    mode: str
    texts: list[str]
    """The new text of each prompt."""
    new_tokens: int
    """New tokens over all prompts (forced EOS-S included)."""
    seconds: float
    tokens_per_s: float | None
    natural_end_rate: float
    """Share of the generated sentences the model ended itself (NaN: none ended)."""
    stopped_at_eod: list[bool]
    """Per prompt: generation ended at end-of-document (not at max_new_tokens)."""
    pruning: list[PruningReport] | None = None
    """Per prompt, what each pruned layer dropped (``show_pruning``)."""
    cache_bytes: dict[str, float] | None = None
    """Cache held per sequence at the end ("live", "allocated"); kv and sentence-cache modes."""
    prune_rule: str = ""
    """How a model with gates decided (step or soft); "" for a model without gates."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pruning"] = [r.to_dict() for r in self.pruning] if self.pruning else None
        return out


def generate_from_export(
    uri: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    mode: str = "kv",
    device: str = "cpu",
    storage: Any = None,
    show_pruning: bool = False,
    prune_rule: PruneRule = "step",
    **sampling: Any,
) -> GeneratedText:
    """Load an export (``training.export.load_export``: a bad one is an ``ExportError``) and
    continue each prompt; ``sampling`` goes to ``decode.generate`` (temperature, top_k, ...).
    ``show_pruning``: also report what each pruned layer dropped (a model with gates only);
    a model with gates decides by ``prune_rule`` (``training.model.pruning.PRUNE_RULES``)."""
    from tokenizers import Tokenizer

    from training.export import load_export

    exported = load_export(uri, storage, device=device)
    if exported.model_config.prune:
        exported.model.use_prune_rule(prune_rule)
    arch = exported.model_config.arch
    if mode not in MODES[arch]:
        raise GenerationError(
            f"mode {mode!r} is not available for {arch}; choose from {MODES[arch]}"
        )
    if show_pruning and not exported.model_config.prune:
        raise GenerationError(
            f"--show-pruning: {uri} has no pruning gates (trained without --prune); fine-tune "
            "it with `gpthf train --prune --init-from ...` first"
        )
    tok = Tokenizer.from_str(exported.tokenizer_json)
    t0 = time.perf_counter()
    with torch.no_grad():
        texts, result = generate_text(
            exported.model, tok, list(prompts), max_new_tokens=max_new_tokens, mode=mode, **sampling
        )
    dt = time.perf_counter() - t0
    new_tokens = sum(len(t) for t in result.tokens)
    reports = None
    if show_pruning:
        reports = [
            pruning_report(exported.model, seq, len(prompt), tok)
            for seq, prompt in zip(result.sequences, result.prompts, strict=True)
        ]
    return GeneratedText(
        arch=arch,
        mode=mode,
        texts=texts,
        new_tokens=new_tokens,
        seconds=dt,
        tokens_per_s=new_tokens / dt if dt else None,
        natural_end_rate=result.natural_end_rate,
        stopped_at_eod=[bool(x) for x in result.stopped_at_eod],
        pruning=reports,
        cache_bytes=result.cache_bytes if mode != "full" else None,
        prune_rule=prune_rule if exported.model_config.prune else "",
    )
