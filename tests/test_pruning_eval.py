"""Evaluation with --pruning: the kept fraction and the evicting cache's size beside the
perplexity, per block sums equal under both batchings, exports without gates refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.test_eval import (  # noqa: F401
    _assert_same_sums,
    _heldout_table,
    _manifest,
    data_dir,
    exports,
)
from training.eval.job import EvalConfig, EvalError, run_eval
from training.eval.report import format_table
from training.eval.scoring import score_blocks
from training.export import load_export, write_export
from training.model import Transformer, build_model


def with_gates(model: Transformer, bias: float, std: float, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    out = build_model(dataclasses.replace(model.config, prune=True, prune_dim=16)).eval()
    out.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for block in out.blocks:
            if block.pruner is not None:
                block.pruner.gate_bias.fill_(bias)
                block.pruner.interaction.weight.normal_(0.0, std)
    out.prune_per_query = True
    return out


def expected_pairs(table, arch: str) -> np.ndarray:
    """Gated pairs per block from the definition: GPT, earlier tokens of the document; GPTHF
    body, earlier sentence ends of the document, for every token."""
    out = []
    for lengths, docs in zip(
        table.column("sentence_lengths").to_pylist(),
        table.column("document_index").to_pylist(),
        strict=True,
    ):
        total = 0
        for d in set(docs):
            sents = [n for n, k in zip(lengths, docs, strict=True) if k == d]
            if arch == "gpt":
                n = sum(sents)
                total += n * (n - 1) // 2
            else:
                total += sum(i * n for i, n in enumerate(sents))
        out.append(total)
    return np.asarray(out)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_pruning_sums_per_block(data_dir: Path, exports: dict[str, str], arch: str) -> None:  # noqa: F811
    table = _heldout_table(data_dir)
    m = _manifest(data_dir)
    kw = dict(pad_id=m.pad_id, eos_id=m.eos_id)
    base = load_export(exports[arch]).model
    n_pruned = len(dataclasses.replace(base.config, prune=True).pruned_layers)
    tokens = np.asarray([len(x) for x in table.column("input_ids").to_pylist()])

    open_gates = with_gates(base, bias=30.0, std=0.02)
    got = score_blocks(open_gates, table, batching="pad", **kw)  # type: ignore[arg-type]
    plain = score_blocks(base, table, batching="pad", **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(got["nll"], plain["nll"], rtol=1e-5)
    np.testing.assert_array_equal(got["prune_pairs"], n_pruned * expected_pairs(table, arch))
    np.testing.assert_array_equal(got["prune_live"], got["prune_pairs"])
    np.testing.assert_allclose(got["prune_kept"], got["prune_pairs"], rtol=1e-6)
    np.testing.assert_array_equal(got["prune_queries"], n_pruned * tokens)
    assert not plain["prune_pairs"].any()  # no gates: nothing recorded

    pruning = with_gates(base, bias=0.0, std=0.2)
    pad = score_blocks(pruning, table, batching="pad", **kw)  # type: ignore[arg-type]
    pre = score_blocks(pruning, table, batching="prepack", token_budget=256, **kw)  # type: ignore[arg-type]
    for name in ("prune_live", "prune_pairs", "prune_queries"):
        np.testing.assert_array_equal(pre[name], pad[name])
    np.testing.assert_allclose(pre["prune_kept"], pad["prune_kept"], rtol=1e-5)
    assert 0 < pad["prune_live"].sum() < pad["prune_pairs"].sum()  # it pruned, not all


@pytest.mark.usefixtures("ray_session")
def test_eval_job_reports_kept_fraction_and_cache(
    data_dir: Path,  # noqa: F811
    exports: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    exp = load_export(exports["gpt"])
    pruning = with_gates(exp.model, bias=0.0, std=0.2)
    uri = str(tmp_path / "pruned")
    write_export(
        uri,
        pruning.state_dict(),
        dataclasses.replace(exp.config, model=pruning.config),
        exp.tokenizer_json,
    )
    with pytest.raises(EvalError, match="no pruning gates"):
        run_eval(
            EvalConfig(
                checkpoints=[exports["gpt"]],
                data=str(data_dir),
                output=str(tmp_path / "x"),
                pruning=True,
            )
        )
    on = run_eval(
        EvalConfig(checkpoints=[uri], data=str(data_dir), output=str(tmp_path / "on"), pruning=True)
    )
    off = run_eval(EvalConfig(checkpoints=[uri], data=str(data_dir), output=str(tmp_path / "off")))
    plain = run_eval(
        EvalConfig(checkpoints=[exports["gpt"]], data=str(data_dir), output=str(tmp_path / "p"))
    )

    def soft_config(out: str, **kw: Any) -> EvalConfig:
        return EvalConfig(
            checkpoints=[uri],
            data=str(data_dir),
            output=str(tmp_path / out),
            pruning=True,
            prune_rule="soft",
            **kw,
        )

    (c,) = on.checkpoints
    assert 0 < c.total.kept_fraction < 1 and 0 < c.total.cache_fraction < 1
    # The default is the paper's step rule: every keep 0 or 1, so the keep summed over the
    # gated pairs is the count of pairs still live; the soft rule keeps fractions.
    assert c.prune_rule == "step" and c.total.prune_kept == c.total.prune_live
    soft = run_eval(soft_config("soft"))
    (sc,) = soft.checkpoints
    assert sc.prune_rule == "soft" and sc.prune_alpha == pruning.config.prune_alpha
    assert sc.total.prune_kept < sc.total.prune_live and sc.total.nll != c.total.nll
    assert "| soft (alpha 8) |" in format_table(soft) and "| step |" in format_table(on)
    full, kept = c.cache_bytes(False), c.cache_bytes(True)
    assert full is not None and kept is not None and kept < full
    # Without --pruning the gates are off: the export's base model, to the last digit.
    assert off.checkpoints[0].total.nll == pytest.approx(plain.checkpoints[0].total.nll, rel=1e-9)
    assert off.checkpoints[0].total.prune_pairs == 0
    assert c.total.nll != off.checkpoints[0].total.nll
    table = format_table(on)
    assert "cache kept" in table and f"{c.total.kept_fraction:.4f}" in table
    assert "cache kept" in (tmp_path / "on" / "report.md").read_text()
    # --local (no Ray) scores with the gates as the actors do: the same sums, shard by shard.
    # Under the soft rule: the step is discontinuous at 0, and the two paths pack blocks
    # differently (fp32 matmuls of other shapes), so a logit within rounding of 0 could flip.
    local = run_eval(soft_config("local", local=True))
    (lc,) = local.checkpoints
    for a, b in zip(lc.shards, sc.shards, strict=True):
        _assert_same_sums(a.sums, b.sums, a.shard)
    assert lc.cache_entry_bytes == sc.cache_entry_bytes and lc.prune_rule == "soft"


def test_the_config_rules_are_the_models() -> None:
    from typing import get_args

    from training.eval.config import PruneRule as EvalRule
    from training.generation.config import PruneRule as GenerateRule
    from training.model.pruning import PRUNE_RULES

    assert get_args(EvalRule) == get_args(GenerateRule) == PRUNE_RULES
