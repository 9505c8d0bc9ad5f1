"""Every attention call goes through ``training.model.attention.attend``, which keeps cuDNN's
attention out on CUDA: it plans anew for every shape, and the routed groups of a training step
and a decode step's KV length change shape all the time (gpu-check's profile on an H200: 0.97 s
of a 1.25 s gpt-12 step in ``_cudnn_attention_*``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from tests._model_helpers import PAD, row_from_documents, tiny_model
from tests.test_generate import PROMPTS
from training.data.collate import collate_blocks
from training.generation.decode import MODES, generate
from training.model.attention import CUDA_SDPA_BACKENDS, attend

ROOT = Path(__file__).resolve().parents[1]


def test_cudnn_attention_is_left_out_and_flash_comes_first() -> None:
    assert SDPBackend.CUDNN_ATTENTION not in CUDA_SDPA_BACKENDS
    assert CUDA_SDPA_BACKENDS[0] == SDPBackend.FLASH_ATTENTION
    assert SDPBackend.MATH in CUDA_SDPA_BACKENDS  # any shape or mask still runs


def test_no_sdpa_call_bypasses_attend() -> None:
    calls = {
        str(p.relative_to(ROOT)): len(re.findall(r"scaled_dot_product_attention\(", p.read_text()))
        for p in (ROOT / "training").rglob("*.py")
    }
    assert {k: v for k, v in calls.items() if v} == {"training/model/attention.py": 2}
    assert "def attend(" in (ROOT / "training/model/attention.py").read_text()


def test_attend_is_sdpa_on_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    mask[..., 0] = True
    for kw in ({"is_causal": True}, {"attn_mask": mask}, {}):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(attend(q, k, v, **kw), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["gpt", "gpthf"])
def test_no_cudnn_attention_in_training_or_generation_on_cuda(arch: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(arch).cuda().to(torch.bfloat16).train()
    batch = collate_blocks([row_from_documents([[3, 4], [5]])], pad_id=PAD).to("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        logits = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
        logits.float().sum().backward()
        model.eval()
        for mode in MODES[arch]:
            generate(model, PROMPTS, max_new_tokens=4, mode=mode)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    assert not [n for n in names if "cudnn_attention" in n], sorted(names)
    assert any("flash" in n or "efficient" in n for n in names), sorted(names)
