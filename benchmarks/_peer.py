"""The peer a user would pick instead of us: Hugging Face ``transformers``' Llama, same shape.

``llama_peer(gpt)`` builds a ``LlamaForCausalLM`` with our GPT's width, depth, heads, SwiGLU
width, RMSNorm epsilon, RoPE theta and tied embeddings, attention through SDPA, and copies our
weights into it, so both models compute the same function: ``check_same_function`` asserts it on
single-document rows before any timing. Optional: ``pip install -e '.[hf]'`` (the benchmarks
print a note and skip the peer column when transformers is missing).

How the peer sees packed rows: Llama with SDPA has no per-document mask (only its
flash-attention-2 path reads packed ``position_ids``), so a user packing documents into rows
runs it causal over the whole row, which is what we time: it does T x T work where ours does
the sum of each document's squares, and it lets documents see each other. On one-document rows
both do the same work.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from training.model import Transformer


def available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def llama_peer(gpt: Transformer) -> Any:
    """A ``LlamaForCausalLM`` (SDPA attention) holding our GPT's weights; same device, dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = gpt.config
    if c.arch != "gpt":
        raise ValueError("the Llama peer mirrors the GPT baseline, not GPTHF")
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads,
        max_position_embeddings=1 << 16,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=True,
        pad_token_id=c.pad_id,
        bos_token_id=None,
        eos_token_id=c.eod_id,
        attn_implementation="sdpa",
    )
    weight = gpt.embed.weight
    peer = LlamaForCausalLM(cfg).to(device=weight.device, dtype=weight.dtype)
    d, f = c.d_model, c.ffn_dim
    with torch.no_grad():
        peer.model.embed_tokens.weight.copy_(gpt.embed.weight)
        peer.model.norm.weight.copy_(gpt.norm.weight)
        for ours, theirs in zip(gpt.blocks, peer.model.layers, strict=True):
            q, k, v = ours.qkv.weight.split(d)
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(ours.proj.weight)
            theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
            gate, up = ours.gate_up.weight.split(f)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(ours.down.weight)
    peer.train(gpt.training)
    return peer


def check_same_function(gpt: Transformer, peer: Any, input_ids: Tensor, atol: float) -> float:
    """Largest logit difference on one-document rows (no padding); raises past ``atol``."""
    sid = torch.zeros_like(input_ids)
    with torch.no_grad():
        ours = gpt(input_ids, sid).float()
        theirs = peer(input_ids=input_ids).logits.float()
    diff = float((ours - theirs).abs().max())
    if diff > atol:
        raise AssertionError(f"the Llama peer is not our GPT: logits differ by {diff:.3g}")
    return diff


def same_kernels(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, the SDPA backends our model uses (``training.model.attention.attend``: no
    cuDNN attention, which plans anew for every shape): the peer runs under the same, so that a
    comparison is of the two models and not of one library's backend choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    from training.model.attention import CUDA_SDPA_BACKENDS

    return sdpa_kernel(CUDA_SDPA_BACKENDS)


def peer_loss(peer: Any, input_ids: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the peer on packed rows, causal over the whole row (see module doc)."""
    with same_kernels(input_ids.device):
        logits = peer(input_ids=input_ids).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
    )
