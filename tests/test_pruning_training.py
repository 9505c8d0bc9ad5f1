"""Training with Dynamic Context Pruning, in this process (gloo, world size 1, no Ray): a
fine-tune from an export starts from its weights with every gate open, logs alpha and the kept
fraction per layer, resumes exactly; bad pruning options are refused before any work."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._model_helpers import one_torch_thread
from tests.conftest import preprocessed
from training.export import ExportConfig, write_export
from training.model import build_model
from training.train.config import TrainConfig, TrainConfigError, load_train_config
from training.train.driver import setup_run, worker_context
from training.train.local import arrow_stream
from training.train.worker import TrainWorker

pytestmark = [pytest.mark.usefixtures(one_torch_thread.__name__), pytest.mark.timeout(600)]
TINY = {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}
BASE: dict[str, Any] = {
    "run.workers": 1,
    "deepspeed.zero_stage": 2,
    "deepspeed.micro_batch_rows": 4,
    "deepspeed.grad_accum": 2,
    "optim.total_steps": 6,
    "optim.warmup_steps": 1,
    "optim.lr": 3e-3,
    "run.eval_rows": 8,
    "model.overrides": TINY,
}


@pytest.fixture(scope="module")
def data_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path, ray_session: None
) -> Path:
    root = tmp_path_factory.mktemp("prune-data")
    return preprocessed(root, tokenizer_path, files=2, docs=30, seed=3, heldout=0.1)


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return load_train_config(None, {"data.uri": str(data), "run.output": str(out), **BASE, **kw})


@pytest.fixture(scope="module")
def export(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of the unpruned model (random weights stand in for a trained model)."""
    setup = setup_run(config(data_dir, tmp_path_factory.mktemp("unused")))
    torch.manual_seed(11)
    model = build_model(setup.model_config)
    out = tmp_path_factory.mktemp("export")
    write_export(
        str(out),
        model.state_dict(),
        ExportConfig(
            model=setup.model_config,
            step=0,
            tokens_seen=0,
            tokenizer_sha256=setup.manifest.tokenizer.sha256,
            special_ids=setup.manifest.special_ids,
        ),
        (data_dir / "tokenizer.json").read_text(),
    )
    return out


def pruned(data: Path, out: Path, export: Path, **kw: Any) -> TrainConfig:
    return config(
        data,
        out,
        **{"pruning.enabled": True, "pruning.sparsity": 0.5, "model.init_from": str(export), **kw},
    )


def steps(worker: TrainWorker, batches: Iterator[Any], n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        step, micros = next(batches)
        assert step == worker.global_step
        out.append(worker.step(micros).record(1.0, 0.0, None, 1))
    return out


def batches_of(worker: TrainWorker) -> Iterator[Any]:
    return worker.micro_batches(arrow_stream(worker.stream_uris()))


@pytest.mark.usefixtures("process_group")
def test_finetune_starts_from_the_export_with_gates_open_and_resumes_exactly(
    data_dir: Path, export: Path, tmp_path: Path
) -> None:
    plain_cfg = config(data_dir, tmp_path / "plain", **{"model.init_from": str(export)})
    with TrainWorker(plain_cfg, worker_context(setup_run(plain_cfg), 0, None)).build() as plain:
        (plain_first,) = steps(plain, batches_of(plain), 1)
    cfg = pruned(data_dir, tmp_path / "run", export)
    ctx = worker_context(setup_run(cfg), 0, None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with TrainWorker(cfg, ctx).build() as first:
        model = first.engine.module
        assert model.config.prune and model.config.prune_alpha == cfg.pruning.alpha_final
        batches = batches_of(first)
        records = steps(first, batches, 3)
        first.save(ckpt)
        records += steps(first, batches, 3)
    # Step 1: alpha = 1 and every gate open, so the fine-tune scores like the export (the
    # sparsity term adds a gradient, not a different forward).
    assert records[0]["prune_alpha"] == 1.0
    assert records[0]["kept_fraction"] > 0.99
    assert records[0]["loss"] == pytest.approx(plain_first["loss"], rel=1e-3)
    alphas = [r["prune_alpha"] for r in records]
    assert alphas == sorted(alphas) and alphas[-1] < cfg.pruning.alpha_final
    assert {k for k in records[0] if k.startswith("kept_fraction/")} == {"kept_fraction/layer2"}
    with TrainWorker(cfg, ctx).build() as second:
        second.restore(ckpt)
        resumed = steps(second, batches_of(second), 3)
    for a, b in zip(records[3:], resumed, strict=True):
        assert (a["loss"], a["kept_fraction"], a["prune_alpha"]) == (
            b["loss"],
            b["kept_fraction"],
            b["prune_alpha"],
        )


def test_a_relative_init_from_is_resolved_before_the_workers_start(
    data_dir: Path, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train workers run in their own directory: ``--init-from runs/x/export`` as a user
    types it must reach them as the path the user meant (it failed there, not at set-up)."""
    monkeypatch.chdir(export.parent)
    setup = setup_run(pruned(data_dir, tmp_path / "run", Path(export.name)))
    assert setup.cfg.model.init_from == str(export)
    monkeypatch.chdir(tmp_path)  # where a worker would be: the path still names the export
    from training.train.finetune import load_init_weights

    assert load_init_weights(build_model(setup.model_config), setup.cfg.model.init_from, None)


def test_init_from_loads_every_weight_and_leaves_the_gates_at_their_init(
    data_dir: Path, export: Path, tmp_path: Path
) -> None:
    from training.export import load_export
    from training.train.finetune import load_init_weights

    setup = setup_run(pruned(data_dir, tmp_path / "run", export))
    model = build_model(setup.model_config)
    left = load_init_weights(model, str(export), None)
    assert left and all(".pruner." in k for k in left)
    source = load_export(str(export)).model.state_dict()
    for name, value in model.state_dict().items():
        if ".pruner." in name:
            continue
        assert torch.equal(value, source[name]), name
    for block in model.blocks[TINY["n_encoder_layers"] :]:
        assert block.pruner.gate_bias.item() == model.config.prune_init_bias


def test_bad_pruning_options_are_refused_before_any_work(
    data_dir: Path, export: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainConfigError, match="pass --prune"):
        config(data_dir, tmp_path, **{"pruning.sparsity": 0.1})
    with pytest.raises(TrainConfigError, match=r"not through model\.overrides"):
        setup_run(config(data_dir, tmp_path, **{"model.overrides": {**TINY, "prune": True}}))
    wider = {**TINY, "d_model": 128}
    with pytest.raises(TrainConfigError, match=r"another model.*d_model"):
        setup_run(pruned(data_dir, tmp_path, export, **{"model.overrides": wider}))
    with pytest.raises(TrainConfigError, match="no export there"):
        setup_run(pruned(data_dir, tmp_path, tmp_path / "nowhere"))
    # A pruning export whose weights lack the gates its config promises.
    from training.export import ExportError, load_export

    raw = json.loads((export / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    raw["model"] = {**raw["model"], "prune": True}
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError, match="do not fit"):
        load_export(str(broken))
    # ... or gates of another width than its config says.
    gated = tmp_path / "gated"
    gated.mkdir()
    setup = setup_run(pruned(data_dir, tmp_path / "g", export))
    write_export(
        str(gated),
        build_model(setup.model_config).state_dict(),
        ExportConfig(
            model=dataclasses.replace(setup.model_config, prune_dim=8),
            step=0,
            tokens_seen=0,
            tokenizer_sha256=setup.manifest.tokenizer.sha256,
            special_ids=setup.manifest.special_ids,
        ),
        (data_dir / "tokenizer.json").read_text(),
    )
    with pytest.raises(ExportError, match=r"do not fit.*pruner"):
        load_export(str(gated))
