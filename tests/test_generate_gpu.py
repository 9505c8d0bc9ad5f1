"""CUDA checks: the same maths on the GPU (fp32) and a bf16 smoke run. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests._model_helpers import PAD, generation_model, row_from_documents, tiny_model
from tests.test_generate import PROMPTS
from training.data.collate import collate_blocks
from training.generation.decode import MODES, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("arch", MODES)
def test_cuda_modes_match_cpu_in_fp32(arch: str) -> None:
    cpu = generation_model(arch)  # multi-token sentences (see tests/test_generate.py)
    gpu = generation_model(arch).cuda()
    ref = generate(cpu, PROMPTS, max_new_tokens=16, mode="full", return_logits=True)
    assert ref.logits is not None
    for mode in MODES[arch]:
        r = generate(gpu, PROMPTS, max_new_tokens=16, mode=mode, return_logits=True)
        assert r.logits is not None
        # Teacher-forced along the CPU tokens would be stricter; greedy paths agree here.
        assert r.tokens == ref.tokens
        torch.testing.assert_close(r.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("arch", MODES)
def test_cuda_bf16_forward_backward_and_generation(arch: str) -> None:
    model = tiny_model(arch).cuda().train()
    batch = collate_blocks([row_from_documents([[3, 4], [5]])], pad_id=PAD).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    model = model.eval().to(torch.bfloat16)
    for mode in MODES[arch]:
        r = generate(model, PROMPTS, max_new_tokens=8, mode=mode, return_logits=True)
        assert r.logits is not None
        for b, tokens in enumerate(r.tokens):  # NaN marks only the steps after a row stopped
            n = len(tokens)
            assert torch.isfinite(r.logits[b, :n]).all(), (mode, b)
            assert r.logits[b, n:].isnan().all(), (mode, b)
