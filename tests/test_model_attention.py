"""Structured attention equals DESIGN.md's masks, computed densely (T x T) as a reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import training.model.attention as attention_module
from tests._model_helpers import PAD, one_torch_thread, row_from_documents, tiny_model
from training.data.collate import collate_blocks
from training.model import Transformer
from training.model.attention import Attention

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


ROWS = [
    [[3, 1, 4], [2, 5], [6]],  # three documents, a 1-token sentence
    [[7, 2, 2, 3]],  # one document
    [[1], [2, 3]],  # short row: lots of padding
]


def reference_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """RoPE written from its formula, as complex multiplication, independent of the project's
    tables: the pair (x_i, x_{i + hd/2}) is the complex number x_i + 1j * x_{i + hd/2}, rotated
    by the angle position * theta^(-2i / hd), in float64. x: (B, T, ..., hd); positions: (B, T).
    """
    hd = x.shape[-1]
    half = hd // 2
    freq = torch.tensor([theta ** (-2.0 * i / hd) for i in range(half)], dtype=torch.float64)
    angle = positions.to(torch.float64)[..., None] * freq  # (B, T, hd/2)
    rotation = torch.polar(torch.ones_like(angle), angle)  # e^{1j angle}, (B, T, hd/2)
    rotation = rotation.view(*positions.shape, *[1] * (x.dim() - 3), half)  # (B, T, ..., hd/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)  # (B, T, ..., hd)


class DenseReference(Attention):
    """Masked softmax over a full (B, T, T) boolean mask with its own RoPE: the naive
    implementation. Nothing of ``training.model.attention`` runs but the base class's slots."""

    def __init__(self, positions: Tensor, mask: Tensor, model: Transformer) -> None:
        unused = torch.empty(0)
        super().__init__(unused, unused)  # no project RoPE tables: ``rotate`` is ours
        self.positions, self.theta = positions, model.config.rope_theta  # (B, T)
        self.mask = mask  # (B, T, T)

    def rotate(self, x: Tensor) -> Tensor:
        return reference_rope(x, self.positions, self.theta)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~self.mask[:, None], float("-inf")).softmax(-1)
        return torch.einsum("bhij,bjhd->bihd", probs, v)


def reference_masks(sentence_ids: Tensor, document_ids: Tensor) -> dict[str, Tensor]:
    """Positions and masks exactly as DESIGN.md words them, with plain loops."""
    B, T = sentence_ids.shape
    out = {k: torch.zeros(B, T, dtype=torch.long) for k in ("tok_pos", "sent_pos", "doc_pos")}
    for k in ("enc", "body", "gpt"):
        out[k] = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # pads see only themselves
    for b in range(B):
        sid, doc = sentence_ids[b].tolist(), document_ids[b].tolist()
        real = [t for t in range(T) if sid[t] >= 0]
        is_end = {t: t + 1 == T or sid[t + 1] != sid[t] for t in real}
        for i in real:
            same_doc = [t for t in real if doc[t] == doc[i]]
            out["tok_pos"][b, i] = sum(1 for t in real if sid[t] == sid[i] and t < i)
            out["doc_pos"][b, i] = sum(1 for t in same_doc if t < i)
            out["sent_pos"][b, i] = len({sid[t] for t in same_doc if sid[t] < sid[i]})
            for j in real:
                out["enc"][b, i, j] = sid[j] == sid[i] and j <= i
                earlier_end = j <= i and is_end[j] and sid[j] < sid[i] and doc[j] == doc[i]
                out["body"][b, i, j] = earlier_end or j == i
                out["gpt"][b, i, j] = doc[j] == doc[i] and j <= i
    return out


def reference_logits(model: Transformer, ids: Tensor, sid: Tensor, doc: Tensor) -> Tensor:
    r = reference_masks(sid, doc)
    c = model.config
    x = model.embed(ids)
    if c.arch == "gpt":
        x = model.run_layers(x, DenseReference(r["doc_pos"], r["gpt"], model), range(c.n_layers))
    else:
        enc = DenseReference(r["tok_pos"], r["enc"], model)
        body = DenseReference(r["sent_pos"], r["body"], model)
        x = model.run_layers(x, enc, range(c.n_encoder_layers))
        x = model.run_layers(x, body, range(c.n_encoder_layers, c.n_layers))
    return model.head(x)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_structured_attention_equals_dense_masks(arch: str) -> None:
    model = tiny_model(arch)
    batch = collate_blocks([row_from_documents(d) for d in ROWS], pad_id=PAD)
    valid = batch.sentence_ids >= 0
    with torch.no_grad():
        got = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
        ref = reference_logits(model, batch.input_ids, batch.sentence_ids, batch.document_ids)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_packed_row_equals_each_document_alone(arch: str) -> None:
    model = tiny_model(arch)
    docs = ROWS[0]
    row = row_from_documents(docs)
    batch = collate_blocks([row], pad_id=PAD)
    with torch.no_grad():
        packed = model(batch.input_ids, batch.sentence_ids, batch.document_ids)[0]
        start = 0
        for doc in docs:
            n = sum(doc)
            alone = collate_blocks(
                [row_from_documents([doc], row["input_ids"][start : start + n])], pad_id=PAD
            )
            logits = model(alone.input_ids, alone.sentence_ids, alone.document_ids)[0, :n]
            torch.testing.assert_close(packed[start : start + n], logits, atol=1e-5, rtol=1e-5)
            start += n


# Rows whose runs fall into several length groups: sentences of 1-23 tokens (encoder groups
# <= 16 and 17-32), documents of 1-70 tokens (GPT and body groups <= 16, 17-32, 33-64, 65-128).
LONG_ROWS = [
    [[20, 3, 17, 9, 21], [2, 5], [23, 1, 15]],
    [[1], [4, 4, 4], [12, 12, 12, 12, 12, 10]],
    [[5], [6, 7], [20]],
]


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_runs_in_several_length_groups_equal_dense_masks(arch: str) -> None:
    model = tiny_model(arch, max_sentence_tokens=32)
    batch = collate_blocks([row_from_documents(d) for d in LONG_ROWS], pad_id=PAD)
    layout = attention_module.SentenceLayout.build(batch.sentence_ids, batch.document_ids)
    assert layout.sentences.groups is not None and layout.documents.groups is not None
    assert len(layout.sentences.groups) == 2 and len(layout.documents.groups) == 4
    valid = batch.sentence_ids >= 0
    with torch.no_grad():
        got = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
        ref = reference_logits(model, batch.input_ids, batch.sentence_ids, batch.document_ids)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_run_groups_bound_padding_and_sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each SDPA call attends runs of one length group (at most 2x padding, or <= 16 tokens);
    one call per group and layer, never one per run, never a T-long sequence here."""
    seen: list[tuple[int, int]] = []
    real_sdpa = attention_module.F.scaled_dot_product_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, **kw: object) -> Tensor:
        assert kw.get("attn_mask") is None and kw.get("is_causal")  # fused-kernel eligible
        seen.append((q.shape[0], q.shape[-2]))
        return real_sdpa(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    batch = collate_blocks([row_from_documents(d) for d in LONG_ROWS], pad_id=PAD)
    T = batch.input_ids.shape[1]
    sentences = [n for row in LONG_ROWS for d in row for n in d]
    documents = [sum(d) for row in LONG_ROWS for d in row]
    for arch, runs, groups in (("gpthf", sentences, 2), ("gpt", documents, 4)):
        seen.clear()
        model = tiny_model(arch, max_sentence_tokens=32)
        with torch.no_grad():
            model(batch.input_ids, batch.sentence_ids, batch.document_ids)
        layers = model.config.n_encoder_layers if arch == "gpthf" else model.config.n_layers
        assert len(seen) == groups * layers  # the body makes no SDPA call
        assert sum(n for n, _ in seen[:groups]) == len(runs)  # every run once per layer
        assert max(L for _, L in seen) == max(runs) < T
    # The GPT groups are exactly the documents by power-of-two bucket.
    gpt = attention_module.DocumentCausalAttention.build(
        batch.sentence_ids, batch.document_ids, 16, 1e4
    )
    lengths = gpt.routing.run_length
    for runs in gpt.routing.group_runs:
        group = [lengths[r] for r in runs.tolist()]
        assert max(group) <= max(16, 2 * min(group) - 1), group


def test_gpthf_body_keys_are_the_documents_own_sentence_ends() -> None:
    """The body's cost is linear in the keys each query may see: a document's tokens are
    scored against that document's ends only (N_g columns), not the row's."""
    batch = collate_blocks([row_from_documents([[3, 3], [2] * 9, [4]])], pad_id=PAD)
    layout = attention_module.SentenceLayout.build(batch.sentence_ids, batch.document_ids)
    widths = sorted(e.shape[1] for e in layout.doc_ends)
    assert layout.end_pos.shape == (1, 12)  # the row has 12 sentence ends
    assert widths == [2, 9]  # ... but no document sees more than its own 9
    # A one-sentence document groups with the 2-sentence one (both <= 16 tokens), so that
    # group's width is 2; the 18-token document is alone in the 17-32 group with 9.


def test_gpt_single_document_rows_attend_the_rows_themselves() -> None:
    one = collate_blocks([row_from_documents([[4, 4]]), row_from_documents([[3]])], pad_id=PAD)
    built = attention_module.DocumentCausalAttention.build(
        one.sentence_ids, one.document_ids, 16, 1e4
    )
    assert built.routing.groups is None  # causal SDPA over (B, T): no gather at all
    two = collate_blocks([row_from_documents([[4], [4]])], pad_id=PAD)
    built = attention_module.DocumentCausalAttention.build(
        two.sentence_ids, two.document_ids, 16, 1e4
    )
    assert built.routing.groups is not None
    assert [g.shape for g in built.routing.groups] == [(2, 4)]  # two 4-token runs, no T x T


class _RecordShapes(TorchDispatchMode):
    """Every tensor an op returns, forward and backward (autograd's saved buffers included)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_no_tensor_has_two_dimensions_of_size_t(arch: str) -> None:
    """No (.., T, .., T) tensor anywhere in a training forward and backward over packed rows
    of several documents: no dense mask, no dense score matrix."""
    rows = [[[9, 11, 7], [13, 12]], [[14, 14, 14], [10]], [[23], [17, 12]]]
    batch = collate_blocks([row_from_documents(d) for d in rows], pad_id=PAD)
    T = batch.input_ids.shape[1]
    assert T == 56  # collate pads 52 to a multiple of 8; no other dimension is 56
    model = tiny_model(arch, max_sentence_tokens=32).train()
    with _RecordShapes() as rec:
        logits = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
        loss.backward()
    assert len(rec.shapes) > 100
    square = [(op, s) for op, s in rec.shapes if sum(d == T for d in s) >= 2]
    assert not square, square[:5]


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_backward_through_packed_rows(arch: str) -> None:
    model = tiny_model(arch).train()
    batch = collate_blocks([row_from_documents(d) for d in ROWS], pad_id=PAD)
    logits = model(batch.input_ids, batch.sentence_ids, batch.document_ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_reference_rope_is_a_relative_rotation() -> None:
    """The reference's own check: norms kept, position 0 is the identity, and a query-key
    product depends only on the distance between their positions."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 2, 16, generator=g, dtype=torch.float64).unbind(0)  # (1,1,2,hd)
    at = lambda x, p: reference_rope(x, torch.tensor([[p]]), 1e4)  # noqa: E731
    torch.testing.assert_close(at(q, 0), q)
    torch.testing.assert_close(at(q, 5).norm(dim=-1), q.norm(dim=-1))
    score = lambda m, n: (at(q, m) * at(k, n)).sum(-1)  # noqa: E731
    torch.testing.assert_close(score(7, 3), score(4, 0))
    assert not torch.allclose(score(7, 3), score(3, 7))


def test_project_rope_equals_the_reference() -> None:
    """The project's tables and ``rotate`` against the formula, on (B, T, 2, H, hd) like a block."""
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 64, (2, 5), generator=g)  # fp32 angles: exact to ~1e-6 here
    x = torch.randn(2, 5, 2, 3, 16, generator=g)
    got = Attention(*attention_module.rope_tables(positions, 16, 500.0)).rotate(x)
    torch.testing.assert_close(got, reference_rope(x, positions, 500.0), atol=1e-5, rtol=1e-5)


def test_gpthf_body_saves_no_fp32_scores_in_bf16_training() -> None:
    """bf16 training keeps the body's (n, H, L, N + 1) probabilities in bf16 for backward."""
    rows = [[[9, 11, 7], [13, 12]], [[14, 14, 14], [10]], [[23], [17, 12]]]
    batch = collate_blocks([row_from_documents(d) for d in rows], pad_id=PAD)
    model = tiny_model("gpthf", max_sentence_tokens=32).train().to(torch.bfloat16)
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch.input_ids, batch.sentence_ids, batch.document_ids)
    layout = attention_module.SentenceLayout.build(batch.sentence_ids, batch.document_ids)
    prob_shapes = {
        (e.shape[0], 2, a.shape[2], e.shape[1] + 1)
        for e, a in zip(layout.doc_ends, layout.doc_allowed, strict=True)
    }
    assert {s for dt, s in saved if dt == torch.bfloat16} >= prob_shapes  # they are saved...
    assert not [s for dt, s in saved if dt == torch.float32 and len(s) == 4]  # ... never in fp32


def test_body_attention_in_query_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd (prefill, evaluation) the body scores queries in chunks, so a long
    prompt's memory stays linear in its length; the result is the one-call result."""
    import training.model.attention as attention
    from tests._model_helpers import tiny_model

    model = tiny_model("gpthf").eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (2, 300), generator=g)
    ids[:, 6::7] = 0  # EOS-S: sentences of 7 tokens, ~43 ends a row
    from training.generation.decode import sentence_ids_for

    sid = sentence_ids_for(ids, torch.tensor([300, 250]), 0)
    calls: list[int] = []
    real = attention._attend_ends_and_self

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_attend_ends_and_self", counted)
    with torch.no_grad():
        whole = model(ids, sid)
        one_call_each = len(calls)
        monkeypatch.setattr(attention, "ENDS_CHUNK_ELEMENTS", 2000)
        chunked = model(ids, sid)
    assert len(calls) - one_call_each > 2 * one_call_each  # it did chunk the queries
    assert max(calls[one_call_each:]) < min(calls[:one_call_each])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
