"""``run.compile`` and ``run.deterministic`` (CPU; inductor's C++ backend needs gcc).

Compiled blocks give eager's logits and gradients to fp32 rounding on batches of different
shapes, and compile once per frame and code path: a new T or B (>= 2) compiles nothing. A
TrainWorker with ``--compile`` trains to the same losses; one with ``--deterministic`` turns
torch's deterministic algorithms on for its lifetime and puts the previous settings back.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tests._model_helpers import PAD, one_torch_thread, row_from_documents, tiny_config
from training.data.collate import IGNORE_INDEX, collate_blocks
from training.data.order import Shard
from training.model import Transformer, build_model
from training.train.config import TrainConfig, TrainConfigError, load_train_config
from training.train.context import WorkerContext
from training.train.worker import TrainWorker, compile_blocks

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

# Batches of other T and B, documents as sentence lengths; (B, T) after padding. All B >= 2:
# dynamo specialises sizes 0 and 1.
BATCH_A = [[[3, 1, 4], [2, 5], [6]], [[7, 2, 2, 3]], [[1], [2, 3, 17, 20]]]  # (3, 48)
BATCH_B = [[[3, 1], [2, 5, 30, 40, 9], [6, 6]], [[7, 2]], [[2, 2, 2, 2, 2, 2]]]  # (3, 104)
BATCH_C = [[[5] * 10], [[3, 4, 5]]]  # (2, 56)


def forward_backward(model: Transformer, rows: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits and parameter gradients of one training forward and backward."""
    b = collate_blocks([row_from_documents(docs) for docs in rows], pad_id=PAD)
    model.zero_grad()
    logits = model(b.input_ids, b.sentence_ids, b.document_ids)
    loss = F.cross_entropy(
        logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if model.last_pruning is not None:
        loss = loss + model.last_pruning.kept_fraction()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal to fp32 rounding: inductor fuses and reorders the sums (norms, the MLP), so the
    tensors differ by rounding relative to their norm (measured: <= 3.5e-6)."""
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code is cached on ``Block.forward``'s code object for the whole process: start
    each count from nothing."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def frames_compiled() -> int:
    frames = counters["frames"]
    assert frames["ok"] == frames["total"], f"a frame failed to compile: {dict(frames)}"
    return int(frames["ok"])


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    ("arch", "prune", "paths"),
    [("gpt", False, 1), ("gpthf", True, 2)],  # GPTHF pruned: encoder blocks have no gate
    ids=["gpt", "gpthf-pruned"],
)
def test_compiled_blocks_equal_eager_and_compile_once(arch: str, prune: bool, paths: int) -> None:
    torch.manual_seed(0)
    config = tiny_config(arch, prune=prune, n_layers=4, prune_dim=8, prune_init_bias=0.0)
    eager = build_model(config).train()
    # Smooth gates (the sigmoid, open about half way): an annealed gate (alpha > 1) is steep near
    # 0 and turns the rounding of its input into gradient differences up to 6e-5 (measured at
    # alpha 4); the gates run eagerly, what is compiled is the same either way.
    eager.set_prune_alpha(1.0)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    for i, rows in enumerate([BATCH_A, BATCH_B, BATCH_C]):
        want, want_grads = forward_backward(eager, rows)
        got, got_grads = forward_backward(compiled, rows)
        close(got, want, "logits")
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            close(got_grads[name], grad, name)
        if prune:
            assert compiled.last_pruning is not None and eager.last_pruning is not None
            assert list(compiled.last_pruning.kept) == config.pruned_layers  # int layer keys
        if i == 0:
            first = frames_compiled()
    # Each block is three graphs around its two eager calls (RoPE, the pattern); the graphs
    # after the first break depend on whether the block has a gate. Every layer shares them, and
    # T and B are symbolic: the later batches compiled nothing.
    assert 0 < first <= 3 * paths, counters["frames"]
    assert frames_compiled() == first, "a batch of another shape recompiled"
    breaks = list(counters["graph_break"])
    assert breaks and all("torch.compiler.disable" in b for b in breaks), breaks


def test_compiled_model_keeps_its_state_dict_and_deepcopies() -> None:
    model = build_model(tiny_config("gpthf"))
    keys = list(model.state_dict())
    compile_blocks(model)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    for block, copied in zip(model.blocks, twin.blocks, strict=True):
        assert isinstance(copied.forward, types.MethodType) and copied.forward.__self__ is copied
        assert isinstance(block.forward, types.MethodType) and block.forward.__self__ is block


# -- through the TrainWorker ------------------------------------------------------------------


def worker(tmp_path: Path, **overrides: Any) -> TrainWorker:
    """A worker over made-up rows: no Ray, no shards read (``step`` is given the rows)."""
    cfg: TrainConfig = load_train_config(
        None,
        {
            "data.uri": "unused",
            "run.output": str(tmp_path),
            "deepspeed.zero_stage": 2,
            "deepspeed.micro_batch_rows": 3,
            "deepspeed.grad_accum": 2,
            "optim.total_steps": 4,
            "optim.warmup_steps": 1,
            "optim.lr": 3e-3,
            **overrides,
        },
    )
    ctx = WorkerContext(
        model_config=tiny_config("gpthf", n_layers=3, n_encoder_layers=2),
        shards=(Shard("unused", 100),),
        data_root="unused",
        dataset_start_step=0,
        resume_from=None,
        val_rows=(),
        output=str(tmp_path),
        schedule_hash="",
        tokenizer_sha256="",
        manifest_version=0,
    )
    return TrainWorker(cfg, ctx).build()


STEPS = [[BATCH_A, BATCH_B], [BATCH_B, BATCH_C]]  # two steps of two micro-batches


def losses(w: TrainWorker) -> list[float]:
    tables = [[pa.Table.from_pylist([row_from_documents(d) for d in m]) for m in s] for s in STEPS]
    return [w.step(micro_batches).loss for micro_batches in tables]


@pytest.mark.usefixtures("process_group", "fresh_dynamo")
def test_worker_with_compile_trains_to_the_same_losses(tmp_path: Path) -> None:
    with worker(tmp_path / "eager") as w:
        want = losses(w)
    with worker(tmp_path / "compiled", **{"run.compile": True}) as w:
        got = losses(w)
        assert frames_compiled() > 0, "the engine ran the compiled blocks"
    # Step 2 runs on what step 1's compiled backward and AdamW made of the weights.
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.usefixtures("process_group")
def test_deterministic_flag_reaches_torch_and_is_undone(tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with worker(tmp_path, **{"run.deterministic": True}):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark == benchmark
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == cublas  # a CPU run leaves it alone
    with worker(tmp_path):  # the default changes nothing
        assert not torch.are_deterministic_algorithms_enabled()


def test_compile_with_zero3_is_refused_before_any_work() -> None:
    # ZeRO-3's parameter hooks on every Linear break each block into pieces (measured: dynamo
    # hit its recompile limit and ran the blocks eagerly).
    with pytest.raises(TrainConfigError, match="--zero-stage 0, 1 or 2 with --compile"):
        load_train_config(None, {"run.compile": True, "deepspeed.zero_stage": 3})
