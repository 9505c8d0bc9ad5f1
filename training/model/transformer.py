"""GPTHF and its GPT baseline: config, one decoder block, the model (imports only torch).

Both architectures are the same stack of pre-norm blocks (RMSNorm, RoPE attention, SwiGLU)
with tied input/output embeddings. They differ only in the attention pattern each stage uses
(``Transformer.stages``):

* GPT: all L layers causal within the document, positions = token index in the document;
* GPTHF: L_e encoder layers, causal within the sentence (positions = token index in the
  sentence), then L_b body layers where a token sees the ends of the earlier sentences of its
  document plus itself (positions = sentence index in the document).

The patterns live in ``training.model.attention``; none of them materialises a T x T mask.
``ModelConfig.attention`` picks how the full forward computes them: gathered short sequences
and SDPA ("sdpa"), or block masks and FlexAttention ("flex"); the maths is the same.
Generation (``training.generation.decode``) reuses the same blocks with cached patterns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.model.attention import (
    Attention,
    DocumentCausalAttention,
    SentenceAttention,
    SentenceEndAttention,
    SentenceLayout,
    flex_stages,
)
from training.model.pruning import PRUNE_RULES, Pruner, PruneRule, PruningRecord

ARCHS = ("gpthf", "gpt")
ATTENTIONS = ("sdpa", "flex")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a model's shape and behaviour; stored as JSON in checkpoints."""

    arch: str = "gpthf"
    """"gpthf" (encoder + body) or "gpt" (all layers causal)."""
    vocab_size: int = 8192
    """Tokenizer vocabulary, special tokens included (the manifest's vocab_size)."""
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 6
    """Total depth L (GPTHF: L_e + L_b)."""
    n_encoder_layers: int = 4
    """L_e, the word-level encoder layers of GPTHF; must be 0 for the GPT."""
    ffn_dim: int = 512
    """Hidden width of the SwiGLU MLP."""
    eos_id: int = 0
    """End-of-sentence token (EOS-S); ids come from the data manifest."""
    pad_id: int = 1
    eod_id: int = 2
    """End-of-document token; generation stops when it is produced."""
    max_sentence_tokens: int = 64
    """M, EOS-S included: the data pipeline's cap; generation forces EOS-S when it is reached."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (training memory, not maths)."""
    attention: str = "sdpa"
    """Backend of the full (training, evaluation) forward; the maths is the same. "sdpa":
    documents (GPT) and sentences (GPTHF encoder) gathered into short sequences for SDPA, the
    body's queries against their document's sentence ends. "flex": the rows as they are, with
    torch.nn.attention.flex_attention and one block mask per stage; compiled on CUDA, the
    training path there (its backward does not run on CPU in torch 2.13, its forward does).
    Cached generation uses its own patterns either way."""
    prune: bool = False
    """Dynamic Context Pruning: interaction projections and a gate per layer (GPT: every layer,
    over earlier tokens; GPTHF: body layers, over earlier sentence ends). Off: today's model."""
    prune_dim: int = 64
    """r, the width of the interaction queries and keys."""
    prune_alpha: float = 8.0
    """alpha of the gate at inference (training anneals from 1 to the schedule's final value,
    which the export records here)."""
    prune_init_bias: float = 10.0
    """beta at initialisation: sigma(10) = 0.99995, so a model that starts pruning keeps
    essentially everything (fine-tuning lowers it where the sparsity loss pays)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpthf-tiny": dict(arch="gpthf", d_model=128, n_heads=4, n_layers=6, n_encoder_layers=4, ffn_dim=512),
        "gpt-tiny": dict(arch="gpt", d_model=128, n_heads=4, n_layers=6, n_encoder_layers=0, ffn_dim=512),
        "gpthf-8-4": dict(arch="gpthf", d_model=768, n_heads=12, n_layers=12, n_encoder_layers=8, ffn_dim=3072),
        "gpt-12": dict(arch="gpt", d_model=768, n_heads=12, n_layers=12, n_encoder_layers=0, ffn_dim=3072),
        "gpthf-16-8": dict(arch="gpthf", d_model=1024, n_heads=16, n_layers=24, n_encoder_layers=16, ffn_dim=4096),
        "gpt-24": dict(arch="gpt", d_model=1024, n_heads=16, n_layers=24, n_encoder_layers=0, ffn_dim=4096),
    }  # fmt: skip

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"ModelConfig: {msg}")

        if self.arch not in ARCHS:
            fail(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "ffn_dim"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or self.head_dim % 2:
            fail(f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) x an even head size")
        if self.arch == "gpthf" and not 0 < self.n_encoder_layers < self.n_layers:
            fail(
                f"GPTHF needs 0 < n_encoder_layers < n_layers, got {self.n_encoder_layers} "
                f"of {self.n_layers}"
            )
        if self.arch == "gpt" and self.n_encoder_layers != 0:
            fail("the GPT has no encoder: set n_encoder_layers=0 (or use .baseline())")
        ids = {"eos_id": self.eos_id, "pad_id": self.pad_id, "eod_id": self.eod_id}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                fail(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if len(set(ids.values())) != 3:
            fail(f"eos_id, pad_id and eod_id must differ, got {ids}")
        if self.max_sentence_tokens < 2:
            fail("max_sentence_tokens must be >= 2 (one token plus EOS-S)")
        if self.attention not in ATTENTIONS:
            fail(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.prune and self.attention == "flex":
            fail(
                "pruning needs attention='sdpa': a pruned layer adds its gate matrices per "
                "gathered run, which the flex block masks do not have"
            )
        if self.prune_dim < 1 or self.prune_alpha < 1:
            fail(
                f"need prune_dim >= 1 and prune_alpha >= 1, got {self.prune_dim}, {self.prune_alpha}"
            )

    def prunes(self, layer: int) -> bool:
        """Whether ``layer`` has a pruning gate (GPTHF: body layers only)."""
        return self.prune and (self.arch == "gpt" or layer >= self.n_encoder_layers)

    @property
    def pruned_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.prunes(i)]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_body_layers(self) -> int:
        return self.n_layers - self.n_encoder_layers

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset; ``overrides`` set e.g. vocab_size and the special ids."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def baseline(self) -> ModelConfig:
        """The GPT of equal size (same width, depth, vocabulary)."""
        return dataclasses.replace(self, arch="gpt", n_encoder_layers=0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"ModelConfig.from_dict: unknown keys {unknown}; the checkpoint was written by "
                "another version of training/model/transformer.py"
            )
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """Pre-norm decoder block; the attention pattern is supplied by the caller."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        d = config.d_model
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.gate_up = nn.Linear(d, 2 * config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, d, bias=False)
        self.pruner = (
            Pruner(d, config.prune_dim, config.prune_init_bias) if config.prunes(layer) else None
        )

    def forward(self, x: Tensor, attention: Attention) -> Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)
        qkv = self.qkv(h).view(B, T, 3, self.n_heads, self.head_dim)
        q, k = attention.rotate(qkv[:, :, :2]).unbind(dim=2)  # (B, T, H, hd) each
        if self.pruner is None:
            y = attention(self.layer, q, k, qkv[:, :, 2])  # (B, T, H, hd)
        else:
            y = attention(self.layer, q, k, qkv[:, :, 2], self.pruner(h))
        x = x + self.proj(y.reshape(B, T, C))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, ffn) each
        return x + self.down(F.silu(gate) * up)


# --------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """GPTHF or GPT, by ``config.arch``. ``forward`` returns logits (B, T, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.last_pruning: PruningRecord | None = None
        """What the last forward's pruned layers kept (None for a model without pruning)."""
        self.prune_per_query = False
        """Record kept and live keys per query position too (evaluation's per-block sums)."""
        self.reset_parameters()
        self.set_prune_alpha(config.prune_alpha)

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("gate_bias"):
                nn.init.constant_(p, self.config.prune_init_bias)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "down.weight")):  # writes into the residual
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def set_prune_alpha(self, alpha: float) -> None:
        """alpha of every pruning gate (training anneals it; a loaded model uses the config's)."""
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        for module in self.modules():
            if isinstance(module, Pruner):
                module.alpha = float(alpha)

    def use_prune_rule(self, rule: PruneRule) -> Transformer:
        """Set the gates' inference rule (``PRUNE_RULES``): ``step`` (alpha = infinity, the
        paper's) or ``soft`` (the config's final alpha, what a loaded model starts with)."""
        if rule not in PRUNE_RULES:
            raise ValueError(f"unknown pruning rule {rule!r}; choose one of {PRUNE_RULES}")
        self.set_prune_alpha(math.inf if rule == "step" else self.config.prune_alpha)
        return self

    def without_pruning(self) -> Transformer:
        """The same model without its gates (itself when it has none): what it computes with
        every gate open."""
        if not self.config.prune:
            return self
        plain = Transformer(dataclasses.replace(self.config, prune=False))
        weights = {k: v for k, v in self.state_dict().items() if ".pruner." not in k}
        plain.load_state_dict(weights)
        return plain.to(self.embed.weight.device).train(self.training)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied matrix counts once
        return n - self.embed.weight.numel() if exclude_embedding else n

    # -- the difference between the architectures ---------------------------------------------

    def stages(
        self, sentence_ids: Tensor, document_ids: Tensor | None = None
    ) -> list[tuple[Attention, range]]:
        """(attention pattern, layers) for each stage of a full forward over packed rows."""
        c = self.config
        if c.attention == "flex":  # the same patterns as block masks (see ModelConfig.attention)
            patterns = flex_stages(sentence_ids, document_ids, c.arch, c.head_dim, c.rope_theta)
            if c.arch == "gpt":
                return [(patterns[0], range(c.n_layers))]
            encoder, body = patterns
            return [
                (encoder, range(c.n_encoder_layers)),
                (body, range(c.n_encoder_layers, c.n_layers)),
            ]
        if c.arch == "gpt":  # causal within the document
            attn = DocumentCausalAttention.build(
                sentence_ids, document_ids, c.head_dim, c.rope_theta
            )
            return [(attn, range(c.n_layers))]
        layout = SentenceLayout.build(sentence_ids, document_ids)
        return [
            (SentenceAttention(layout, c.head_dim, c.rope_theta), range(c.n_encoder_layers)),
            (SentenceEndAttention(layout, c.head_dim, c.rope_theta), range(c.n_encoder_layers, c.n_layers)),
        ]  # fmt: skip

    # -- shared plumbing ------------------------------------------------------------------------

    def run_layers(self, x: Tensor, attention: Attention, layers: range) -> Tensor:
        for i in layers:
            block = self.blocks[i]
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attention, use_reentrant=False)
            else:
                x = block(x, attention)
        return x

    def hidden_states(
        self, input_ids: Tensor, sentence_ids: Tensor, document_ids: Tensor | None = None
    ) -> Tensor:
        """Last block's output (B, T, C), before the final norm. A pruning model leaves what its
        gates kept in ``last_pruning``."""
        x = self.embed(input_ids)  # (B, T, C)
        record = PruningRecord(per_query=self.prune_per_query) if self.config.prune else None
        for attention, layers in self.stages(sentence_ids, document_ids):
            attention.pruning = record
            x = self.run_layers(x, attention, layers)
        self.last_pruning = record
        return x

    def head(self, x: Tensor) -> Tensor:
        """Final norm and tied output projection: (..., C) -> (..., V)."""
        return self.lm_head(self.norm(x))

    def forward(
        self, input_ids: Tensor, sentence_ids: Tensor, document_ids: Tensor | None = None
    ) -> Tensor:
        """Logits (B, T, V). sentence_ids: block-local sentence index, -1 on (trailing) padding;
        document_ids: block-local document index (None: one document per row)."""
        if input_ids.shape != sentence_ids.shape or (
            document_ids is not None and document_ids.shape != input_ids.shape
        ):
            raise ValueError(
                "input_ids, sentence_ids and document_ids must share one (B, T) shape, got "
                f"{tuple(input_ids.shape)}, {tuple(sentence_ids.shape)}, "
                f"{None if document_ids is None else tuple(document_ids.shape)}"
            )
        return self.head(self.hidden_states(input_ids, sentence_ids, document_ids))


def build_model(config: ModelConfig) -> Transformer:
    return Transformer(config)


__all__ = ["ARCHS", "ATTENTIONS", "Block", "ModelConfig", "Transformer", "build_model"]
