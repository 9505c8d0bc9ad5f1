"""What a pruning model dropped, and when: for a prompt and its continuation, each pruned
layer's fate of every unit of context (GPTHF: finished sentences, whose embeddings the body
attends; GPT: tokens), as text for a terminal and as an HTML page.

It is computed from one full forward over the final sequence with the keep masks captured:
the function that ``kv`` generation evicts by (tests/test_pruning_generate.py holds the two
equal), so "dropped at" is exactly the step at which the cache let the entry go.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import torch

from training.generation.decode import sentence_ids_for
from training.model import Transformer
from training.model.pruning import NEG_INF, PruningRecord


@dataclass(frozen=True)
class Unit:
    """One key of the pruned layers: a sentence (GPTHF) or a token (GPT)."""

    text: str
    in_prompt: bool
    ends_at: int
    """Token position of the key (the sentence's EOS-S, or the token)."""
    dropped_at: dict[int, int | None]
    """Per pruned layer: the token position whose query dropped it (None: kept to the end)."""


@dataclass(frozen=True)
class PruningReport:
    arch: str
    layers: list[int]
    units: list[Unit]
    tokens: int
    """Tokens in the sequence (prompt + continuation)."""

    def kept(self, layer: int) -> int:
        return sum(u.dropped_at[layer] is None for u in self.units)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "layers": self.layers,
            "tokens": self.tokens,
            "units": [
                {
                    "text": u.text,
                    "in_prompt": u.in_prompt,
                    "ends_at": u.ends_at,
                    "dropped_at": {str(k): v for k, v in u.dropped_at.items()},
                }
                for u in self.units
            ],
        }

    def to_text(self) -> str:
        kind = "sentence" if self.arch == "gpthf" else "token"
        head = (
            f"[pruning] {self.arch}: which {kind}s each pruned layer dropped, at which token "
            f"(of {self.tokens}); '.' kept to the end, '>' marks the continuation\n"
        )
        summary = "  kept at the end: " + ", ".join(
            f"layer {layer} {self.kept(layer)}/{len(self.units)}" for layer in self.layers
        )
        cols = "".join(f"{'L' + str(layer):>7}" for layer in self.layers)
        lines = [f"  {'':1}{'at':>5}{cols}  {kind}"]
        for u in self.units:
            cells = "".join(
                f"{('.' if u.dropped_at[layer] is None else str(u.dropped_at[layer])):>7}"
                for layer in self.layers
            )
            text = u.text if len(u.text) <= 70 else u.text[:67] + "..."
            lines.append(f"  {' ' if u.in_prompt else '>'}{u.ends_at:>5}{cells}  {text!r}")
        return head + "\n".join(lines) + "\n" + summary + "\n"

    def to_html(self) -> str:
        kind = "sentence" if self.arch == "gpthf" else "token"
        rows = []
        for layer in self.layers:
            spans = []
            for u in self.units:
                at = u.dropped_at[layer]
                cls = ("kept" if at is None else "dropped") + ("" if u.in_prompt else " new")
                title = "kept to the end" if at is None else f"dropped at token {at}"
                sep = " " if kind == "sentence" else ""
                spans.append(
                    f'<span class="{cls}" title="{title}">{html.escape(u.text)}</span>{sep}'
                )
            rows.append(
                f"<tr><th>layer {layer}<br><small>{self.kept(layer)}/{len(self.units)} "
                f"kept</small></th><td>{''.join(spans)}</td></tr>"
            )
        return (
            "<!doctype html><meta charset='utf-8'><title>gpthf pruning</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto}"
            "td{padding:.5em;line-height:1.8;white-space:pre-wrap}th{text-align:left;"
            "vertical-align:top;padding:.5em}.kept{background:#d8f0d8}.dropped{color:#999;"
            "text-decoration:line-through}.new{font-style:italic;border-bottom:2px solid #68c}"
            "</style>"
            f"<h1>What each layer of the {self.arch} dropped</h1>"
            f"<p>Units: {kind}s. Green: still in the cache after the last token; grey, struck "
            "through: dropped (hover for the token whose query dropped it). Underlined italics: "
            "the continuation.</p>"
            f"<table>{''.join(rows)}</table>"
        )


def pruning_report(
    model: Transformer, ids: list[int], prompt_len: int, tokenizer: Any
) -> PruningReport:
    """The report for one sequence of token ids (its first ``prompt_len`` are the prompt)."""
    c = model.config
    if not c.prune:
        raise ValueError(
            "this model has no pruning gates (trained without --prune): nothing to show"
        )
    x = torch.tensor([ids], device=model.embed.weight.device)
    sid = sentence_ids_for(x, torch.tensor([len(ids)], device=x.device), c.eos_id)
    record = PruningRecord(capture=True)
    with torch.no_grad():
        h = model.embed(x)
        for attention, stage in model.stages(sid):
            attention.pruning = record
            h = model.run_layers(h, attention, stage)
    layers = c.pruned_layers
    # First query at which each key's keep is 0, per layer: (keys,) token positions.
    first_drop = {}
    for layer in layers:
        (keep,) = record.keep[layer]  # (1, T, keys)
        dropped = keep[0] == NEG_INF  # (T, keys)
        any_drop = dropped.any(dim=0)
        first = dropped.int().argmax(dim=0)
        first_drop[layer] = [int(f) if a else None for f, a in zip(first, any_drop, strict=True)]
    if c.arch == "gpt":
        units = [
            Unit(
                text=tokenizer.decode([t], skip_special_tokens=False),
                in_prompt=i < prompt_len,
                ends_at=i,
                dropped_at={layer: first_drop[layer][i] for layer in layers},
            )
            for i, t in enumerate(ids)
        ]
    else:
        ends = [i for i, t in enumerate(ids) if t == c.eos_id]
        units, start = [], 0
        for j, end in enumerate(ends):
            units.append(
                Unit(
                    text=tokenizer.decode(ids[start:end], skip_special_tokens=True).strip(),
                    in_prompt=end < prompt_len,
                    ends_at=end,
                    dropped_at={layer: first_drop[layer][j] for layer in layers},
                )
            )
            start = end + 1
    return PruningReport(arch=c.arch, layers=layers, units=units, tokens=len(ids))
