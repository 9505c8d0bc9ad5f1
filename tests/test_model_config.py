"""ModelConfig presets, validation, serialisation; model size and parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from tests._model_helpers import one_torch_thread
from training.model import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def test_presets_pair_up_with_equal_size_baselines() -> None:
    pairs = [("gpthf-tiny", "gpt-tiny"), ("gpthf-8-4", "gpt-12"), ("gpthf-16-8", "gpt-24")]
    for hf_name, gpt_name in pairs:
        hf, gpt = ModelConfig.preset(hf_name), ModelConfig.preset(gpt_name)
        assert hf.arch == "gpthf" and gpt.arch == "gpt"
        assert hf.baseline() == gpt
        assert hf.n_encoder_layers == 2 * hf.n_body_layers  # the 2:1 split
    c = ModelConfig.preset("gpthf-8-4")
    assert (c.d_model, c.n_heads, c.ffn_dim, c.n_encoder_layers, c.n_body_layers) == (
        768,
        12,
        3072,
        8,
        4,
    )
    c = ModelConfig.preset("gpthf-16-8")
    assert (c.d_model, c.n_heads, c.ffn_dim, c.n_encoder_layers, c.n_body_layers) == (
        1024,
        16,
        4096,
        16,
        8,
    )


def test_preset_overrides_and_round_trip() -> None:
    c = ModelConfig.preset("gpthf-tiny", vocab_size=300, eos_id=5, pad_id=6, eod_id=7)
    assert (c.vocab_size, c.eos_id, c.pad_id, c.eod_id) == (300, 5, 6, 7)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(arch="bert"), "arch"),
        (dict(d_model=100, n_heads=3), "head size"),
        (dict(n_encoder_layers=6), "n_encoder_layers"),
        (dict(arch="gpt"), "no encoder"),
        (dict(eos_id=9000), "outside the vocabulary"),
        (dict(eod_id=0), "must differ"),
        (dict(max_sentence_tokens=1), "max_sentence_tokens"),
    ],
)
def test_invalid_configs_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**ModelConfig.PRESETS["gpthf-tiny"], **overrides})


def test_unknown_preset_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpthf-huge")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "dropout": 0.1})


def test_parameter_count_matches_formula_and_is_equal_across_archs() -> None:
    hf = ModelConfig.preset("gpthf-tiny", vocab_size=1000)
    d, f, L, V = hf.d_model, hf.ffn_dim, hf.n_layers, hf.vocab_size
    expected = V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d  # tied embedding counted once
    m_hf, m_gpt = build_model(hf), build_model(hf.baseline())
    assert m_hf.num_parameters() == m_gpt.num_parameters() == expected
    assert m_hf.num_parameters(exclude_embedding=True) == expected - V * d
    assert m_hf.lm_head.weight is m_hf.embed.weight


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpthf-tiny", vocab_size=64, d_model=32, n_heads=2, ffn_dim=64)
    plain = build_model(cfg)
    ckpt = build_model(ModelConfig(**{**cfg.to_dict(), "activation_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 64, (2, 16))
    sid = torch.arange(16).div(4, rounding_mode="floor").expand(2, 16)
    grads, losses, in_backward = [], [], []
    for m in (plain, ckpt):
        calls = [0]

        def count(*_: object, calls: list[int] = calls) -> None:
            calls[0] += 1

        hooks = [block.register_forward_pre_hook(count) for block in m.blocks]
        m.train()
        loss = m(ids, sid).logsumexp(-1).mean()
        assert calls[0] == cfg.n_layers  # one forward per block
        calls[0] = 0
        loss.backward()
        in_backward.append(calls[0])
        for h in hooks:
            h.remove()
        losses.append(loss.item())
        assert m.embed.weight.grad is not None
        grads.append(m.embed.weight.grad.clone())
    # Checkpointing really happens: every block's forward runs again in the backward pass
    # (a model that ignored the flag would show 0 here and still match the gradients).
    assert in_backward == [0, cfg.n_layers]
    assert losses[0] == losses[1]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
