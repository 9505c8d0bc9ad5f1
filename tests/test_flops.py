"""Analytic FLOPs against torch.utils.flop_counter.FlopCounterMode on small configs.

What the counter does not count: elementwise work (RMSNorm, RoPE, softmax, SiLU gate, the
residual adds), the GPTHF body's self score and self value (a mul + sum, not a matmul), the
embedding lookup and its backward. On CPU it also misses the fused SDPA kernel, so these tests
run SDPA on the math backend, whose bmm's it does count, as full rectangles (masked entries
included): hence the comparison with the analytic ``dense`` convention.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests._model_helpers import EOS, one_torch_thread, tiny_config, tiny_model
from training.generation.decode import MODES, generate, sentence_ids_for
from training.model.flops import (
    document_forward_flops,
    flops_per_token,
    generation_flops,
    generation_step_flops,
    linear_flops_per_token_layer,
    train_step_flops,
)

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


SENTENCES = [5, 3, 7, 4, 6]  # one document, 25 tokens
MM = {torch.ops.aten.mm, torch.ops.aten.addmm}


def _document(c_eos: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 48, (1, sum(SENTENCES)), generator=torch.Generator().manual_seed(0))
    ends = torch.tensor(SENTENCES).cumsum(0) - 1
    ids[0, ends] = c_eos
    return ids, sentence_ids_for(ids, torch.tensor([ids.shape[1]]), c_eos)


def _count(fn: Callable[[], object]) -> dict[str, float]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()} | {
        "mm": sum(v for k, v in counter.get_flop_counts()["Global"].items() if k in MM),
        "total": counter.get_total_flops(),
    }


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_forward_flops_match_the_counter(arch: str) -> None:
    model = tiny_model(arch)
    ids, sid = _document()
    counted = _count(lambda: model(ids, sid))
    analytic = document_forward_flops(model.config, SENTENCES, dense=True)
    assert counted["mm"] == analytic.linear + analytic.head  # projections and LM head: exact
    assert counted["total"] == pytest.approx(analytic.total, rel=0.01)
    attended = document_forward_flops(model.config, SENTENCES)
    assert attended.attention < analytic.attention and attended.linear == analytic.linear


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_training_step_is_three_forwards(arch: str) -> None:
    model = tiny_model(arch).train()
    ids, sid = _document()
    counted = _count(lambda: model(ids, sid).sum().backward())
    three = 3 * document_forward_flops(model.config, SENTENCES, dense=True)
    assert counted["total"] == pytest.approx(three.total, rel=0.01)
    assert train_step_flops(model.config, [SENTENCES]).total == pytest.approx(
        3 * document_forward_flops(model.config, SENTENCES).total
    )


@pytest.mark.parametrize("arch, mode", [(a, m) for a in MODES for m in MODES[a]])
def test_generation_flops_match_the_counter(arch: str, mode: str) -> None:
    """A batch of one: every cached key is a real one (no padding in the rectangles)."""
    model = tiny_model(arch)
    prompt = [5, 6, EOS, 8, 9, 10, EOS, 11, 12]
    r = generate(model, [prompt], max_new_tokens=8, mode=mode)
    counted = _count(lambda: generate(model, [prompt], max_new_tokens=8, mode=mode))
    expected = generation_flops(model.config, mode, prompt, r.tokens[0], dense=True)
    assert counted["mm"] == expected.linear + expected.head
    assert counted["total"] == pytest.approx(expected.total, rel=0.01)


def test_closed_forms_and_orderings() -> None:
    hf, gpt = tiny_config("gpthf"), tiny_config("gpt")
    lin = linear_flops_per_token_layer(hf)
    assert lin == 2 * (4 * 32 * 32 + 3 * 32 * 64)
    # Uniform sentences of 5 over 100 tokens: per-token encoder keys 3, body keys 10.5 on average.
    per_token = flops_per_token(hf, 100, 5)
    enc, body = 2 * 4 * 32 * 3.0, 2 * 4 * 32 * 10.5
    assert per_token.attention == pytest.approx(enc + body)
    assert flops_per_token(gpt, 100, 5).attention == pytest.approx(4 * 4 * 32 * 50.5)
    # A step with 2000 tokens of context in 80 sentences (current one 10 tokens).
    lens = [25] * 79 + [10] + [15]
    gpt_kv = generation_step_flops(gpt, "kv", lens)
    hf_kv = generation_step_flops(hf, "kv", lens)
    hf_sc = generation_step_flops(hf, "sentence-cache", lens)
    gpt_full = generation_step_flops(gpt, "full", lens)
    assert hf_kv.linear == gpt_kv.linear and hf_kv.attention < gpt_kv.attention / 10
    assert hf_kv.total < hf_sc.total < gpt_full.total / 10
    with pytest.raises(ValueError, match="no generation mode"):
        generation_step_flops(gpt, "sentence-cache", lens)
