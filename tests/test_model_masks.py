"""Mask properties (hypothesis): what each logit may and may not depend on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests._model_helpers import PAD, VOCAB, one_torch_thread, row_from_documents, tiny_model
from training.data.collate import collate_blocks

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


MODELS = {arch: tiny_model(arch, seed=1) for arch in ("gpthf", "gpt")}
SAME: dict[str, Any] = dict(atol=1e-6, rtol=0.0)  # "unchanged": only float noise allowed
CHANGED = 1e-4  # a real dependence moves logits far more than this (init_std=0.2)

documents = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), min_size=1, max_size=3)


@dataclass
class Case:
    ids: Tensor  # (1, T)
    sid: Tensor
    doc: Tensor
    n: int  # real tokens

    def logits(self, arch: str, ids: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return MODELS[arch](self.ids if ids is None else ids, self.sid, self.doc)[0]

    def positions(self, where: Tensor) -> list[int]:
        return torch.nonzero(where[0, : self.n]).flatten().tolist()


def make_case(docs: list[list[int]], seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    n = sum(map(sum, docs))
    tokens = torch.randint(3, VOCAB, (n,), generator=g).tolist()
    b = collate_blocks([row_from_documents(docs, tokens)], pad_id=PAD)
    return Case(b.input_ids, b.sentence_ids, b.document_ids, n)


def changed(case: Case, positions: list[int], seed: int) -> Tensor:
    ids = case.ids.clone()
    g = torch.Generator().manual_seed(seed + 1)
    for p in positions:
        ids[0, p] = (ids[0, p] + 1 + torch.randint(0, VOCAB - 1, (1,), generator=g)) % VOCAB
    return ids


arches = st.sampled_from(["gpthf", "gpt"])


@settings(max_examples=20, deadline=None)
@given(docs=documents, seed=st.integers(0, 10_000), arch=arches, data=st.data())
def test_changing_a_sentence_leaves_earlier_sentences_unchanged(docs, seed, arch, data) -> None:
    case = make_case(docs, seed)
    j = data.draw(st.integers(0, int(case.sid.max())))
    in_j = case.positions(case.sid == j)
    ids = changed(case, in_j, seed)
    before, after = case.logits(arch), case.logits(arch, ids)
    earlier = case.positions((case.sid >= 0) & (case.sid < j))
    torch.testing.assert_close(after[earlier], before[earlier], **SAME)
    assert (after[in_j] - before[in_j]).abs().max() > CHANGED  # the test can see a change


@settings(max_examples=20, deadline=None)
@given(docs=documents, seed=st.integers(0, 10_000), arch=arches, data=st.data())
def test_a_later_token_never_changes_an_earlier_position(docs, seed, arch, data) -> None:
    case = make_case(docs, seed)
    p = data.draw(st.integers(0, case.n - 1))
    before, after = case.logits(arch), case.logits(arch, changed(case, [p], seed))
    torch.testing.assert_close(after[:p], before[:p], **SAME)
    assert (after[p] - before[p]).abs().max() > CHANGED


@settings(max_examples=20, deadline=None)
@given(docs=documents, seed=st.integers(0, 10_000), arch=arches, data=st.data())
def test_documents_never_see_each_other(docs, seed, arch, data) -> None:
    assume(len(docs) > 1)
    case = make_case(docs, seed)
    d = data.draw(st.integers(0, len(docs) - 1))
    in_d = case.positions(case.doc == d)
    subset = data.draw(st.lists(st.sampled_from(in_d), min_size=1, unique=True))
    before, after = case.logits(arch), case.logits(arch, changed(case, subset, seed))
    others = case.positions((case.doc >= 0) & (case.doc != d))
    torch.testing.assert_close(after[others], before[others], **SAME)  # earlier and later docs


@settings(max_examples=20, deadline=None)
@given(docs=documents, seed=st.integers(0, 10_000), data=st.data())
def test_gpthf_sees_an_earlier_sentence_only_through_its_end(docs, seed, data) -> None:
    """Change a non-final token of sentence k, then put back the original encoder state at
    k's end e_k: every later sentence's logits are restored exactly. So the dependence of
    later sentences on sentence k passes through e_k alone."""
    case = make_case(docs, seed)
    model = MODELS["gpthf"]
    c = model.config
    # Sentences k with >= 2 tokens and a later sentence in the same document.
    candidates = []
    for k in range(int(case.sid.max()) + 1):
        pos = case.positions(case.sid == k)
        doc = int(case.doc[0, pos[0]])
        later = case.positions((case.doc == doc) & (case.sid > k))
        if len(pos) >= 2 and later:
            candidates.append((pos, later))
    assume(candidates)
    pos, later = data.draw(st.sampled_from(candidates))
    p = data.draw(st.sampled_from(pos[:-1]))
    ids = changed(case, [p], seed)
    end = pos[-1]

    with torch.no_grad():
        (enc, enc_layers), (body, body_layers) = model.stages(case.sid, case.doc)
        h = model.run_layers(model.embed(case.ids), enc, enc_layers)  # encoder output
        h_new = model.run_layers(model.embed(ids), enc, enc_layers)
        base = model.head(model.run_layers(h, body, body_layers))[0]
        moved = model.head(model.run_layers(h_new, body, body_layers))[0]
        h_mix = h_new.clone()
        h_mix[0, end] = h[0, end]  # restore e_k only
        restored = model.head(model.run_layers(h_mix, body, body_layers))[0]
    assert (moved[later] - base[later]).abs().max() > CHANGED  # later sentences did depend on k
    torch.testing.assert_close(restored[later], base[later], **SAME)
    assert c.n_encoder_layers > 0
