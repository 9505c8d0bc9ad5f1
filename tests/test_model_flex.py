"""attention="flex" (block masks, FlexAttention) computes what attention="sdpa" (gathered runs)
does: same logits on CPU (forward only there), same gradients on CUDA, same generation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests._model_helpers import (
    PAD,
    generation_model,
    one_torch_thread,
    row_from_documents,
    tiny_config,
)
from tests.test_generate import PROMPTS
from training.data.collate import PackedBatch, collate_blocks
from training.generation.decode import MODES, generate
from training.model import ModelConfig, Transformer, build_model

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

ARCHS = ("gpthf", "gpt")
FP32: dict[str, Any] = dict(atol=1e-5, rtol=1e-5)


def pair(arch: str, seed: int = 0, **overrides: Any) -> tuple[Transformer, Transformer]:
    """(sdpa, flex) models holding the same weights."""
    torch.manual_seed(seed)
    sdpa = build_model(tiny_config(arch, **overrides)).eval()
    flex = build_model(tiny_config(arch, attention="flex", **overrides)).eval()
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


PAIRS = {arch: pair(arch) for arch in ARCHS}


def batch(rows: list[list[list[int]]]) -> PackedBatch:
    """Rows of documents given as sentence lengths; shorter rows get trailing padding."""
    return collate_blocks([row_from_documents(docs) for docs in rows], pad_id=PAD)


def assert_same_logits(arch: str, b: PackedBatch, one_doc_per_row: bool = False) -> None:
    doc = None if one_doc_per_row else b.document_ids
    sdpa, flex = PAIRS[arch]
    with torch.no_grad():
        want = sdpa(b.input_ids, b.sentence_ids, doc)
        got = flex(b.input_ids, b.sentence_ids, doc)
    # Pads: the gathered path's attention writes zeros there, flex's lets a pad attend itself
    # (and earlier pads): logits differ there, but no real token sees a pad and the loss
    # ignores them; flex's must still be finite.
    assert torch.isfinite(got).all()
    valid = b.sentence_ids >= 0
    torch.testing.assert_close(got[valid], want[valid], **FP32)


documents = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=5), min_size=1, max_size=3)
rows = st.lists(documents, min_size=1, max_size=3)


# Three documents (a 1-token sentence among them), one document, a short row: much padding.
MIXED = [[[3, 1, 4], [2, 5], [6]], [[7, 2, 2, 3]], [[1], [2, 3]]]


@settings(max_examples=15, deadline=None)
@given(rows=rows, arch=st.sampled_from(ARCHS), one_doc_per_row=st.booleans())
@example(rows=MIXED, arch="gpthf", one_doc_per_row=False)
@example(rows=MIXED, arch="gpt", one_doc_per_row=False)
def test_flex_logits_equal_sdpa(
    rows: list[list[list[int]]], arch: str, one_doc_per_row: bool
) -> None:
    assert_same_logits(arch, batch(rows), one_doc_per_row)


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_equals_sdpa_across_several_mask_blocks(arch: str) -> None:
    """T = 280 (273 tokens, collate pads to a multiple of 8), not a multiple of flex's 128-token
    blocks: documents and sentences across block edges, rows ending mid-block, a padded block."""
    long_row = [[1 + (i * 7) % 6 for i in range(n)] for n in (30, 9, 41)]  # 3 docs, 273 tokens
    short_row = [[2, 6, 1], [5] * 20]  # 110 tokens, then 170 pads
    b = batch([long_row, short_row])
    assert b.input_ids.shape[1] == 280
    assert_same_logits(arch, b)


def test_prune_with_flex_is_refused() -> None:
    with pytest.raises(ValueError, match="pruning needs attention='sdpa'"):
        tiny_config("gpthf", attention="flex", prune=True)


def test_attention_choices_and_old_configs() -> None:
    with pytest.raises(ValueError, match=r"attention must be one of \('sdpa', 'flex'\)"):
        tiny_config("gpt", attention="dense")
    # What --model-overrides '{"attention": "flex"}' reaches: ModelConfig.preset's overrides.
    assert ModelConfig.preset("gpt-tiny", attention="flex").attention == "flex"
    old = tiny_config("gpthf").to_dict()
    del old["attention"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(old).attention == "sdpa"


def test_flex_backward_on_cpu_says_what_to_do() -> None:
    _, flex = PAIRS["gpt"]
    b = batch([[[3, 2]]])
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex(b.input_ids, b.sentence_ids, b.document_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_model_generates_as_sdpa_in_every_mode(arch: str) -> None:
    """Full mode runs the flex stages every step; the cached modes capture K/V from them."""
    sdpa = generation_model(arch)  # writes multi-token sentences (see there)
    flex = build_model(dataclasses.replace(sdpa.config, attention="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    for mode in MODES[arch]:
        want = generate(sdpa, PROMPTS, max_new_tokens=6, mode=mode, return_logits=True)
        got = generate(flex, PROMPTS, max_new_tokens=6, mode=mode, return_logits=True)
        assert got.tokens == want.tokens, mode
        assert got.logits is not None and want.logits is not None
        torch.testing.assert_close(got.logits, want.logits, equal_nan=True, **FP32)


# --------------------------------------------------------------------------------------------
# CUDA: the compiled kernels, forward and backward


def _loss_and_grads(
    model: Transformer, b: PackedBatch, autocast: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(b.input_ids, b.sentence_ids, b.document_ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_flex_forward_and_backward_equal_sdpa(arch: str, precision: str) -> None:
    # hd = 64 (a head size the fused kernels are tuned for); T = 240 spans two mask blocks.
    sdpa, flex = (
        m.cuda().train()
        for m in pair(arch, d_model=128, n_heads=2, ffn_dim=256, max_sentence_tokens=64)
    )
    long_row = [[1 + (i * 7) % 30 for i in range(n)] for n in (5, 3, 9)]
    b = batch([long_row, [[2, 6, 1], [5] * 12], [[40]]]).to("cuda")
    assert b.input_ids.shape[1] == 240
    autocast = precision == "bf16"
    want_logits, want = _loss_and_grads(sdpa, b, autocast)
    got_logits, got = _loss_and_grads(flex, b, autocast)
    valid = b.sentence_ids >= 0
    assert want.keys() == got.keys()
    if not autocast:
        torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-4, rtol=1e-4)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
        return

    # bf16: both round activations to 8 bits of mantissa in different orders; compare errors
    # relative to each tensor's size, not element by element.
    def rel(a: Tensor, b: Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    assert rel(got_logits[valid], want_logits[valid]) < 2e-2
    errors = {name: rel(got[name], want[name]) for name in want}
    assert max(errors.values()) < 5e-2, errors


def test_the_backend_is_not_part_of_a_runs_identity() -> None:
    """A run may resume with the other backend (same weights, same maths); a real change of
    the model still changes the schedule hash, and the backend is free to change in a fine-tune."""
    from training.train.config import TrainConfig
    from training.train.finetune import FREE_FIELDS

    def hashed(overrides: dict) -> str:
        cfg = TrainConfig()
        cfg.model.overrides = overrides
        return cfg.schedule_hash()

    assert hashed({"attention": "flex"}) == hashed({}) == hashed({"attention": "sdpa"})
    assert hashed({"d_model": 64}) != hashed({})
    assert "attention" in FREE_FIELDS
