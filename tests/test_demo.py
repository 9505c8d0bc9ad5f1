"""The demo's generation settings and speed lines, without running the demo (tiny CPU models)."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import training.study.generation as study_generation
from jobs.cli import build_parser
from tests._model_helpers import EOD, EOS, PAD, one_torch_thread, tiny_model
from training.demo import (
    DEMO_PROMPTS,
    demo_sampling,
    format_speed,
    prompt_speed,
)
from training.generation.decode import MODES
from training.generation.text import generate_text

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

SPECIALS = ["<|endofsentence|>", "<|pad|>", "<|endofdoc|>"]  # ids 0, 1, 2 as in tiny_config


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DEMO_PROMPTS * 5, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [EOS, PAD, EOD]
    return tok


@pytest.mark.parametrize("arch", MODES)
def test_speed_lines_come_from_a_warmed_up_measurement_of_every_mode(
    tokenizer: Tokenizer, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(arch, vocab_size=tokenizer.get_vocab_size())
    calls: list[dict[str, Any]] = []
    real = study_generation.generate

    def recording(m: Any, prompts: Any, **kw: Any) -> Any:
        calls.append({"prompts": [list(p) for p in prompts], **kw})
        return real(m, prompts, **kw)

    monkeypatch.setattr(study_generation, "generate", recording)
    sampling = demo_sampling(greedy=False)
    rows = prompt_speed(model, tokenizer, DEMO_PROMPTS, new_tokens=8, repeats=3, sampling=sampling)

    modes = list(MODES[arch])
    assert [r.mode for r in rows] == modes
    assert all(len(r.tokens_per_s) == 3 and r.new_tokens == 8 and r.batch == 2 for r in rows)
    # One untimed warm-up per mode first, then the timed runs, every mode in every round.
    warm, timed = calls[: len(modes)], calls[len(modes) :]
    assert [c["mode"] for c in warm] == modes
    assert len(timed) == 3 * len(modes)
    assert all(c["max_new_tokens"] == 8 and not c["stop_at_eod"] for c in timed)
    for r in range(3):
        assert sorted(c["mode"] for c in timed[r * len(modes) : (r + 1) * len(modes)]) == sorted(
            modes
        )
    assert all(c["temperature"] == 0.8 and c["top_k"] == 40 and c["seed"] == 0 for c in calls)
    # The prompts are the ones generate_text encodes (last sentence closed or not the same way).
    _, shown = generate_text(model, tokenizer, DEMO_PROMPTS, max_new_tokens=1)
    assert all(c["prompts"] == shown.prompts for c in calls)

    lines = format_speed(f"{arch}-tiny", rows)
    assert len(lines) == len(modes)
    for line, row in zip(lines, rows, strict=True):
        assert line.split()[:2] == [f"{arch}-tiny", row.mode]
        assert f"{row.median:,.0f} tok/s [" in line


def test_greedy_is_a_flag_and_sampling_the_default() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).greedy is False
    args = parser.parse_args(["demo", "--greedy", "--fresh", "--workdir", "w"])
    assert (args.greedy, args.fresh, args.workdir) == (True, True, "w")
    assert demo_sampling(greedy=True)["temperature"] == 0.0
    assert demo_sampling(greedy=False) == {"temperature": 0.8, "top_k": 40, "seed": 0}
