"""Generation: every mode's logits at every step equal the full forward's (fp32, 1e-5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests._model_helpers import EOD, EOS, PAD, generation_model, one_torch_thread
from training.generation.decode import (
    MODES,
    GenerationResult,
    generate,
    sample_next,
    sentence_ended,
    sentence_ids_for,
)
from training.generation.text import encode_prompt, generate_text
from training.model import Transformer, build_model

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


M = 6  # tiny_config's max_sentence_tokens
PROMPTS = [
    [5, 6, 7],  # one unfinished sentence
    [5, 6, EOS, 8, 9, 10, 11, EOS],  # ends with EOS-S: the next token starts a sentence
    [7, EOS, 9, 9, 9, 9, 9, 9, 9],  # unfinished sentence already past M: EOS-S is forced
    [12],  # a single token
    [3, 4, EOS, 5, EOS, 6, 7, 8, EOS, 9, 10],  # several sentences, one unfinished
]
MODELS = {arch: generation_model(arch) for arch in MODES}  # multi-token sentences, see there
SAMPLING: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sampled": dict(temperature=1.0, top_k=20, top_p=0.95, seed=7),
}


def generated_sentences(result: GenerationResult) -> list[tuple[int, bool]]:
    """(length, ended naturally) of every sentence that began and ended inside the new tokens
    (EOS-S included in the length; natural: the model chose EOS-S before the cap forced it)."""
    out = []
    for new in result.tokens:
        start = next((i + 1 for i, t in enumerate(new) if t == EOS), len(new))
        for i in range(start, len(new)):
            if new[i] == EOS:
                out.append((i + 1 - start, i + 1 - start < M))
                start = i + 1
    return out


def teacher_forced_logits(model: Transformer, result: GenerationResult) -> list[torch.Tensor]:
    """The full forward over each final sequence, at the positions that chose a new token."""
    out = []
    for prompt, seq, new in zip(result.prompts, result.sequences, result.tokens, strict=True):
        ids = torch.tensor([seq])
        sid = sentence_ids_for(ids, torch.tensor([len(seq)]), model.config.eos_id)
        with torch.no_grad():
            logits = model(ids, sid)[0]
        out.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(new)])
    return out


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("arch, mode", [(a, m) for a in MODES for m in MODES[a]])
def test_every_step_matches_the_full_forward(arch: str, mode: str, sampling: str) -> None:
    model = MODELS[arch]
    r = generate(
        model, PROMPTS, max_new_tokens=24, mode=mode, return_logits=True, **SAMPLING[sampling]
    )
    assert r.logits is not None and r.logits.shape[:2] == (len(PROMPTS), max(map(len, r.tokens)))
    for b, ref in enumerate(teacher_forced_logits(model, r)):
        n = len(r.tokens[b])
        torch.testing.assert_close(r.logits[b, :n], ref, atol=1e-5, rtol=0.0)
        assert r.logits[b, n:].isnan().all()
    # The run crossed sentence boundaries both ways, and sentences begun during generation ran
    # several tokens (the encoder cache of the current sentence) before EOS-S appended them to
    # the sentence-end caches: not only the one-token sentences a random tiny model writes.
    assert sum(r.forced_ends) > 0
    sentences = generated_sentences(r)
    assert max((n for n, _ in sentences), default=0) >= 3, sentences
    assert any(natural and n >= 3 for n, natural in sentences), sentences
    assert sum(n == 1 for n, _ in sentences) <= len(sentences) // 4, sentences


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("arch", MODES)
def test_all_modes_produce_the_same_tokens(arch: str, sampling: str) -> None:
    results = {
        m: generate(MODELS[arch], PROMPTS, max_new_tokens=30, mode=m, **SAMPLING[sampling])
        for m in MODES[arch]
    }
    for r in results.values():
        assert r.tokens == results["full"].tokens
        assert (r.natural_ends, r.forced_ends) == (
            results["full"].natural_ends,
            results["full"].forced_ends,
        )


@pytest.mark.parametrize("arch", MODES)
def test_batched_equals_one_prompt_at_a_time(arch: str) -> None:
    batched = generate(MODELS[arch], PROMPTS, max_new_tokens=15, mode="kv")
    for prompt, tokens in zip(PROMPTS, batched.tokens, strict=True):
        assert generate(MODELS[arch], [prompt], max_new_tokens=15, mode="kv").tokens == [tokens]


def test_sentences_never_exceed_the_cap_and_ends_are_counted() -> None:
    r = generate(MODELS["gpthf"], PROMPTS, max_new_tokens=40, mode="kv", temperature=1.0, seed=3)
    for b, seq in enumerate(r.sequences):
        prompt_len, run, natural, forced = len(r.prompts[b]), 0, 0, 0
        for i, t in enumerate(seq):
            # EOS-S ends a sentence; so does ending the document, unless right after EOS-S.
            if i >= prompt_len and (t == EOS or (t == EOD and run > 0)):
                natural, forced = (natural, forced + 1) if run >= M - 1 else (natural + 1, forced)
            run = 0 if t == EOS else run + 1
            assert i < prompt_len or run <= M - 1
        assert (r.natural_ends[b], r.forced_ends[b]) == (natural, forced)
    total = sum(r.natural_ends) + sum(r.forced_ends)
    assert r.natural_end_rate == pytest.approx(sum(r.natural_ends) / total)


@pytest.mark.parametrize("arch", MODES)
def test_generation_stops_at_end_of_document(arch: str) -> None:
    base = MODELS[arch]
    free = generate(base, PROMPTS[:2], max_new_tokens=12, mode="kv")
    tokens = free.tokens[0]
    stop = next(i for i, t in enumerate(tokens) if t not in (EOS, PAD) and t not in tokens[:i])
    # eod_id only matters to generation: the same weights with another id for end-of-document.
    cfg = dataclasses.replace(base.config, eod_id=tokens[stop])
    model = build_model(cfg).eval()
    model.load_state_dict(base.state_dict())
    for mode in MODES[arch]:
        r = generate(model, PROMPTS[:2], max_new_tokens=12, mode=mode, return_logits=True)
        assert r.tokens[0] == tokens[: stop + 1]
        assert r.stopped_at_eod[0] and r.logits is not None
        assert r.logits[0, stop + 1 :].isnan().all()
        open_before = tokens[stop - 1] != EOS if stop else r.prompts[0][-1] != EOS
        assert r.natural_ends[0] == sum(t == EOS for t in tokens[:stop]) + open_before


def test_sampling_knobs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(
        sample_next(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1)
    )
    assert torch.equal(
        sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), logits.argmax(-1)
    )
    top5 = logits.topk(5).indices
    for _ in range(20):
        t = sample_next(logits, temperature=2.0, top_k=5, generator=g)
        assert (top5 == t[:, None]).any(dim=1).all()
    a = generate(MODELS["gpt"], PROMPTS, max_new_tokens=10, temperature=1.0, seed=11)
    b = generate(MODELS["gpt"], PROMPTS, max_new_tokens=10, temperature=1.0, seed=11)
    assert a.tokens == b.tokens
    assert all(PAD not in t for t in a.tokens)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not available for gpt"):
        generate(MODELS["gpt"], PROMPTS, max_new_tokens=2, mode="sentence-cache")
    with pytest.raises(ValueError, match="every prompt needs a token"):
        generate(MODELS["gpt"], [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(MODELS["gpt"], PROMPTS, max_new_tokens=2, top_p=0.0)


# -- text ------------------------------------------------------------------------------------

SPECIALS = ["<|endofsentence|>", "<|pad|>", "<|endofdoc|>"]  # ids 0, 1, 2 as in tiny_config


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    text = ["The cat sat on the mat.", "A dog ran in the park!", "Is it raining today?"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [EOS, PAD, EOD]
    return tok


def test_encode_prompt_splits_sentences_like_the_pipeline(tokenizer: Tokenizer) -> None:
    text = "The cat sat. A dog ran in the park and the cat sat on the mat"
    ids = encode_prompt(tokenizer, text, eos_id=EOS, max_sentence_tokens=64)
    first = tokenizer.encode("The cat sat.", add_special_tokens=False).ids
    second = tokenizer.encode(
        "A dog ran in the park and the cat sat on the mat", add_special_tokens=False
    ).ids
    assert ids == [*first, EOS, *second]  # the last sentence is left open
    closed = encode_prompt(tokenizer, text + ".", eos_id=EOS, max_sentence_tokens=64)
    assert closed[-1] == EOS
    short = encode_prompt(
        tokenizer, text, eos_id=EOS, max_sentence_tokens=4
    )  # pieces of <= 3 + EOS
    pieces = [len(p) for p in _split_at(short, EOS)]
    assert max(pieces) <= 4 and short[-1] != EOS


def test_a_prompt_that_spells_a_special_token_encodes_it_as_text(tokenizer: Tokenizer) -> None:
    # As the data pipeline does (pipeline.encoding): the model never saw these ids mid-sentence.
    text = "He wrote <|endofdoc|> and <|endofsentence|> on the mat."
    ids = encode_prompt(tokenizer, text, eos_id=EOS, max_sentence_tokens=64)
    assert EOD not in ids and ids.count(EOS) == 1 and ids[-1] == EOS
    assert tokenizer.decode(ids[:-1], skip_special_tokens=False).strip() == text
    assert not tokenizer.encode_special_tokens, "the tokenizer is left as it was"


def _split_at(ids: list[int], eos: int) -> list[list[int]]:
    out, cur = [], []
    for t in ids:
        cur.append(t)
        if t == eos:
            out.append(cur)
            cur = []
    return [*out, cur] if cur else out


@pytest.mark.parametrize("arch", MODES)
def test_generate_text_in_every_mode(tokenizer: Tokenizer, arch: str) -> None:
    torch.manual_seed(5)
    model = build_model(
        dataclasses.replace(MODELS[arch].config, vocab_size=tokenizer.get_vocab_size())
    ).eval()
    prompts = ["The cat sat on the mat. A dog", "Is it raining today?"]
    outputs = {}
    for mode in MODES[arch]:
        texts, r = generate_text(model, tokenizer, prompts, max_new_tokens=12, mode=mode)
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
        assert r.prompts[1][-1] == EOS and r.prompts[0][-1] != EOS
        outputs[mode] = (texts, r.tokens)
    assert all(v == outputs["full"] for v in outputs.values())


def test_suppressed_tokens_are_never_sampled_but_eos_is_still_forced() -> None:
    r = generate(
        MODELS["gpthf"], PROMPTS, max_new_tokens=20, suppress_tokens=[EOS, EOD], stop_at_eod=False
    )
    assert sum(r.natural_ends) == 0 and sum(r.forced_ends) > 0
    for tokens in r.tokens:
        assert EOD not in tokens
        run = 0
        for t in tokens:
            run = 0 if t == EOS else run + 1
            assert run < M


def given_continuation(n: int) -> list[list[int]]:
    """``n`` tokens for each of ``PROMPTS``, an EOS-S every fifth: the cap (M = 6) cuts only a
    sentence that a prompt began."""
    return [
        [EOS if i % 5 == 4 else 3 + (7 * b + 5 * i) % 40 for i in range(n)]
        for b in range(len(PROMPTS))
    ]


def capped(prompt: list[int], given: list[int]) -> list[int]:
    """``given`` with EOS-S in place of a token wherever the sentence cap forces it."""
    run = len(prompt) - (
        max(i for i, t in enumerate(prompt) if t == EOS) + 1 if EOS in prompt else 0
    )
    out = []
    for t in given:
        t = EOS if run >= M - 1 else t
        out.append(t)
        run = 0 if t == EOS else run + 1
    return out


@pytest.mark.parametrize("arch, mode", [(a, m) for a in MODES for m in MODES[a]])
def test_forced_tokens_are_decoded_in_place_of_sampled_ones(arch: str, mode: str) -> None:
    """Teacher forcing: every row decodes the given tokens (EOS-S where the cap forces it),
    each step's logits are the full forward's over them, and another model decodes the same."""
    given = given_continuation(12)
    r = generate(
        MODELS[arch], PROMPTS, max_new_tokens=12, mode=mode, force_tokens=given, return_logits=True
    )
    assert r.tokens == [capped(p, g) for p, g in zip(PROMPTS, given, strict=True)]
    assert r.tokens[1] == given[1] and r.tokens[2] != given[2]  # row 2's prompt is past the cap
    assert r.logits is not None
    for b, ref in enumerate(teacher_forced_logits(MODELS[arch], r)):
        torch.testing.assert_close(r.logits[b], ref, atol=1e-5, rtol=0.0)
    torch.manual_seed(3)
    other = build_model(MODELS[arch].config).eval()  # other weights: other free-running text
    assert generate(other, PROMPTS, max_new_tokens=12, mode=mode).tokens != r.tokens
    again = generate(other, PROMPTS, max_new_tokens=12, mode=mode, force_tokens=given)
    assert (again.tokens, again.natural_ends, again.forced_ends) == (
        r.tokens,
        r.natural_ends,
        r.forced_ends,
    )


def test_forced_tokens_need_one_full_list_per_prompt() -> None:
    with pytest.raises(ValueError, match="one list of max_new_tokens"):
        generate(MODELS["gpt"], PROMPTS, max_new_tokens=4, force_tokens=[[5] * 4])
    with pytest.raises(ValueError, match="one list of max_new_tokens"):
        generate(MODELS["gpt"], PROMPTS[:1], max_new_tokens=4, force_tokens=[[5] * 3])
    with pytest.raises(ValueError, match="force_tokens ids"):
        generate(MODELS["gpt"], PROMPTS[:1], max_new_tokens=2, force_tokens=[[5, 10_000]])


def test_end_of_document_after_eos_is_not_a_second_sentence_end() -> None:
    tokens = np.array([EOS, EOD, EOD, 7, EOS])
    active = np.array([True, True, True, True, False])
    eod = active & (tokens == EOD)
    open_len = np.array([3, 0, 2, 1, 1])  # row 1: EOS-S came just before its EOD
    got = sentence_ended(tokens, active, eod, open_len, EOS)
    assert got.tolist() == [True, False, True, False, False]
