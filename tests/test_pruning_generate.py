"""Generation with a pruning model: ``kv`` evicts what each layer dropped (GPT tokens, GPTHF
sentence ends), reuses the freed slots, and every step's logits equal the full forward's."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tests._model_helpers import EOD, EOS, PAD, generation_model, one_torch_thread
from tests.test_generate import (  # noqa: F401
    PROMPTS,
    given_continuation,
    teacher_forced_logits,
    tokenizer,
)
from training.export import ExportConfig, write_export
from training.generation.decode import generate
from training.generation.eviction import EvictingCache, headroom
from training.generation.pruning_report import pruning_report
from training.model import Transformer, build_model
from training.model.pruning import PRUNE_RULES, PruneRule

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def pruning_model(arch: str, bias: float = 0.05, std: float = 0.15) -> Transformer:
    """``generation_model`` with gates that drop part of the context at alpha = 8."""
    base = generation_model(arch)
    torch.manual_seed(5)
    model = build_model(dataclasses.replace(base.config, prune=True, prune_dim=8)).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for block in model.blocks:
            if block.pruner is not None:
                block.pruner.gate_bias.fill_(bias)
                block.pruner.interaction.weight.normal_(0.0, std)
    return model


@pytest.mark.parametrize(
    "dtype, atol",
    # fp64: the definition (the residue is the gates' fp32 products). fp32: a gate near its
    # zero is steep in log space, so fp32 noise upstream moves the logits more than without
    # pruning: 1e-4 here, against 1e-5 without.
    [(torch.float64, 1e-5), (torch.float32, 1e-4)],
)
@pytest.mark.parametrize("rule", PRUNE_RULES)
@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.0, top_k=20, seed=7)])
@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_evicting_kv_matches_the_full_forward_at_every_step(
    arch: str, sampling: dict, dtype: torch.dtype, atol: float, rule: PruneRule
) -> None:
    model = pruning_model(arch).to(dtype).use_prune_rule(rule)
    modes = ("full", "kv", "sentence-cache") if arch == "gpthf" else ("full", "kv")
    results = {
        mode: generate(model, PROMPTS, max_new_tokens=24, mode=mode, return_logits=True, **sampling)
        for mode in modes
    }
    for mode in modes[1:]:
        r = results[mode]
        assert r.tokens == results["full"].tokens
        for b, ref in enumerate(teacher_forced_logits(model, r)):
            n = len(r.tokens[b])
            assert r.logits is not None
            torch.testing.assert_close(r.logits[b, :n].to(dtype), ref, atol=atol, rtol=0.0)
        # It pruned: every layer evicted something, and the cache holds less than the context.
        kept = r.pruning
        assert kept is not None and kept.evicted_total > 0, mode
        assert all(n > 0 for n in kept.evicted_per_layer.values())
        unpruned = generate(
            generation_model(arch), PROMPTS, max_new_tokens=24, mode=mode, **sampling
        )
        assert r.cache_bytes["live"] < unpruned.cache_bytes["live"], mode


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_forced_tokens_compare_pruned_and_unpruned_caches_on_the_same_sequence(arch: str) -> None:
    """Teacher-forced (the pruning benchmark's equal work): the pruned and the unpruned model
    decode the same tokens, the evicting cache's logits are the full forward's over them, and
    it holds less than the unpruned cache of the same sequence."""
    given = given_continuation(24)
    model = pruning_model(arch)
    pruned = generate(model, PROMPTS, max_new_tokens=24, force_tokens=given, return_logits=True)
    unpruned = generate(generation_model(arch), PROMPTS, max_new_tokens=24, force_tokens=given)
    assert pruned.tokens == unpruned.tokens
    assert pruned.logits is not None and pruned.pruning is not None
    for b, ref in enumerate(teacher_forced_logits(model, pruned)):
        torch.testing.assert_close(pruned.logits[b], ref, atol=1e-4, rtol=0.0)
    assert pruned.pruning.evicted_total > 0
    assert pruned.cache_bytes["live"] < unpruned.cache_bytes["live"]


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_freed_slots_are_reused(arch: str) -> None:
    """A long generation whose layers drop most keys: the caches stay far smaller than the
    number of keys ever written, because new keys go into freed slots."""
    model = pruning_model(arch, bias=-0.05, std=0.15)
    r = generate(model, PROMPTS, max_new_tokens=120, mode="kv", stop_at_eod=False)
    assert r.pruning is not None
    written = r.pruning.keys_written
    for layer, capacity in r.pruning.capacity.items():
        assert capacity < written, (layer, capacity, written)


@pytest.mark.parametrize(
    "arch, mode", [("gpthf", "kv"), ("gpthf", "sentence-cache"), ("gpt", "kv")]
)
def test_open_gates_evict_nothing_and_equal_the_unpruned_model(arch: str, mode: str) -> None:
    model = pruning_model(arch, bias=30.0, std=0.02)
    r = generate(model, PROMPTS, max_new_tokens=16, mode=mode, return_logits=True)
    plain = generate(
        generation_model(arch), PROMPTS, max_new_tokens=16, mode=mode, return_logits=True
    )
    assert r.tokens == plain.tokens
    assert r.pruning is not None and r.pruning.evicted_total == 0
    assert r.logits is not None and plain.logits is not None
    torch.testing.assert_close(r.logits, plain.logits, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_the_report_says_what_the_cache_evicted(arch: str, tokenizer: Tokenizer) -> None:  # noqa: F811
    """The report's "kept to the end" is what the evicting cache still holds: computed from
    the full forward over the sequence up to the last token generation fed."""
    model = pruning_model(arch)
    r = generate(model, [PROMPTS[4]], max_new_tokens=30, mode="kv", stop_at_eod=False)
    assert r.pruning is not None
    fed = r.sequences[0][:-1]  # the last sampled token is never fed to the model
    report = pruning_report(model, fed, len(PROMPTS[4]), tokenizer)
    assert report.layers == model.config.pruned_layers
    for layer in report.layers:
        assert report.kept(layer) == r.pruning.kept[layer], layer
    units = fed.count(EOS) if arch == "gpthf" else len(fed)
    assert len(report.units) == units
    dropped = [u.dropped_at[layer] for u in report.units for layer in report.layers]
    assert any(d is not None for d in dropped)
    for u in report.units:  # a key is dropped by a later query, never by an earlier one
        assert all(d is None or d > u.ends_at for d in u.dropped_at.values())
    text = report.to_text()
    assert text.count("\n") == len(report.units) + 3 and "kept at the end" in text
    page = report.to_html()
    assert page.count('class="dropped') + page.count('class="kept') == units * len(report.layers)


def test_gpthf_generate_show_pruning_from_an_export(
    tokenizer: Tokenizer,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jobs.cli import main

    base = pruning_model("gpthf")
    config = dataclasses.replace(base.config, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(3)
    model = build_model(config)
    with torch.no_grad():
        for block in model.blocks:
            if block.pruner is not None:
                block.pruner.gate_bias.fill_(0.05)
                block.pruner.interaction.weight.normal_(0.0, 0.15)
    ids = {"end_of_sentence": EOS, "pad": PAD, "end_of_document": EOD}
    write_export(
        str(tmp_path / "export"),
        model.state_dict(),
        ExportConfig(
            model=config,
            step=0,
            tokens_seen=0,
            tokenizer_sha256=hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
            special_ids=ids,
        ),
        tokenizer.to_str(),
    )
    page = tmp_path / "pruning.html"
    prompt = "The cat sat on the mat. A dog ran in the park! Is it raining today? The cat"
    argv = ["generate", "--checkpoint", str(tmp_path / "export"), "--prompt", prompt]
    assert (
        main([*argv, "--show-pruning", "--pruning-html", str(page), "--max-new-tokens", "20"]) == 0
    )
    out = capsys.readouterr().out
    # M = 6 tokens: the tiny tokenizer's long sentences come in pieces, as in preprocessing.
    assert "[pruning] gpthf" in out and "'The cat sat on the'" in out
    assert "kept at the end: layer 2" in out
    assert "<table>" in page.read_text() and ">The cat sat on the</span>" in page.read_text()
    # A model without gates: refused with the way out.
    plain = tmp_path / "plain"
    write_export(
        str(plain),
        model.without_pruning().state_dict(),
        ExportConfig(
            model=dataclasses.replace(config, prune=False),
            step=0,
            tokens_seen=0,
            tokenizer_sha256=hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
            special_ids=ids,
        ),
        tokenizer.to_str(),
    )
    assert main(["generate", "--checkpoint", str(plain), "--prompt", prompt, "--show-pruning"]) == 2
    assert "no pruning gates" in capsys.readouterr().err


def test_compact_keeps_every_live_slot_and_gives_the_rest_back() -> None:
    g = torch.Generator().manual_seed(0)
    B, H, cap, hd, r = 3, 2, 20, 4, 5
    live = torch.rand(B, cap, generator=g) < 0.3
    live[0] = False  # a row that kept nothing
    cache = EvictingCache(
        k=torch.randn(B, H, cap, hd, generator=g),
        v=torch.randn(B, H, cap, hd, generator=g),
        k_int=torch.randn(B, cap, r, generator=g),
        log_keep=-torch.rand(B, cap, generator=g),
        live=live.clone(),
    )
    before = [t.clone() for t in cache.tensors()]
    n = int(live.sum(dim=1).max())
    cache.compact(n + 1)
    assert cache.capacity == n + 1
    for b in range(B):
        keep = live[b].nonzero()[:, 0]  # in slot order
        m = len(keep)
        assert cache.live[b, :m].all() and not cache.live[b, m:].any()
        torch.testing.assert_close(cache.k[b, :, :m], before[0][b, :, keep], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[b, :, :m], before[1][b, :, keep], rtol=0, atol=0)
        torch.testing.assert_close(cache.k_int[b, :m], before[2][b, keep], rtol=0, atol=0)
        torch.testing.assert_close(cache.log_keep[b, :m], before[3][b, keep], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_the_caches_give_evicted_slots_back(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the prompt and whenever the fullest row uses at most half of a cache, its live
    slots move to the front and the capacity is cut: the caches end no larger than the kept
    context needs (and every step stays exact: the tests above run through this)."""
    caches: dict[int, EvictingCache] = {}
    compact = EvictingCache.compact

    def spy(self: EvictingCache, capacity: int) -> None:
        caches[id(self)] = self
        compact(self, capacity)

    model = pruning_model(arch, bias=-0.05, std=0.15)
    monkeypatch.setattr(EvictingCache, "compact", spy)
    r = generate(model, PROMPTS, max_new_tokens=120, mode="kv", stop_at_eod=False)
    assert r.pruning is not None and len(caches) == len(r.pruning.capacity)
    written = r.pruning.keys_written
    for c in caches.values():
        n = int(c.live.sum(dim=1).max()) + 2  # the fullest row, one step either way
        assert c.capacity <= max(2 * n, headroom(n)) and c.capacity < written, (c.capacity, n)
