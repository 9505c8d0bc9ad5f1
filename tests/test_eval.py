"""Evaluation: known answers, prepack == pad, the Ray Data job and its report, clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from pipeline.blocks import SCORING_COLUMNS
from pipeline.manifest import Manifest, ManifestError
from tests.conftest import preprocessed
from training.eval.config import EvalConfigError
from training.eval.job import EvalConfig, EvalError, run_eval
from training.eval.report import EvalReport, format_table
from training.eval.scoring import (
    Sums,
    evaluate_rows,
    first_fit_decreasing,
    prepack_blocks,
    score_blocks,
)
from training.export import ExportConfig, write_export
from training.model import ModelConfig, build_model

TINY = {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: Tensor, sentence_ids: Tensor, document_ids: Tensor) -> Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


# Two hand-made blocks. Block 0: doc 0 = [5 6 EOS], doc 1 = [7 EOS] -> targets at positions
# 0, 1 (doc 0) and 3 (doc 1): 3 targets, 2 of them EOS-S. Block 1: one doc [8 9 10 EOS]:
# 3 targets, 1 EOS-S. Totals: 9 tokens, 6 targets, 3 EOS-S targets, 3 sentences.
HAND = {
    "input_ids": [[5, 6, 0, 7, 0], [8, 9, 10, 0]],
    "sentence_lengths": [[3, 2], [4]],
    "document_index": [[0, 1], [0]],
    "num_bytes": [17, 12],
    "num_words": [4, 3],
}


def test_uniform_logits_known_answer() -> None:
    V = 50
    s = evaluate_rows(Uniform(V), HAND, pad_id=1, eos_id=0, batching="pad")
    assert (s.rows, s.tokens, s.targets, s.sentences, s.bytes, s.words) == (2, 9, 6, 3, 29, 7)
    # exact up to fp32 log-softmax rounding (per-token NLLs are summed in fp64)
    assert s.nll == pytest.approx(6 * math.log(V), rel=1e-7)
    assert s.token_perplexity == pytest.approx(V, rel=1e-7)
    assert s.bits_per_byte == pytest.approx(6 * math.log2(V) / 29, rel=1e-7)
    assert s.word_perplexity == pytest.approx(math.exp(6 * math.log(V) / 7), rel=1e-7)
    # argmax of all-zero logits is id 0: right on every EOS-S target when EOS-S is 0 ...
    assert (s.eos_targets, s.eos_correct, s.eos_accuracy) == (3, 3, 1.0)
    # ... and never when it is another id (here 7 is not a label of an EOS position).
    s3 = evaluate_rows(Uniform(V), HAND, pad_id=1, eos_id=3, batching="prepack")
    assert (s3.eos_targets, s3.eos_correct) == (0, 0) and math.isnan(s3.eos_accuracy)
    assert s3.nll == pytest.approx(s.nll, rel=1e-7) and s3.targets == 6


def test_prepack_layout_never_crosses_blocks() -> None:
    batch, owner = prepack_blocks(HAND, pad_id=1, token_budget=16)
    assert batch.input_ids.shape[0] == 1  # both blocks in one row
    assert owner[0].tolist() == [0] * 5 + [1] * 4 + [-1] * 7  # longest first, then padding
    assert batch.document_ids[0, :9].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert batch.sentence_ids[0, :9].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # the last token of each block (and of each document) has no label
    assert batch.labels[0, :9].tolist() == [6, 0, -100, 0, -100, 9, 10, 0, -100]


def test_a_block_longer_than_the_budget_sets_the_row_width_for_all() -> None:
    """Rows fill up to the longest block rather than padding to it: [10], [4, 3, 2]."""
    blocks = {
        "input_ids": [[5] * n for n in (10, 4, 3, 2)],
        "sentence_lengths": [[n] for n in (10, 4, 3, 2)],
        "document_index": [[0]] * 4,
    }
    batch, owner = prepack_blocks(blocks, pad_id=1, token_budget=6, pad_to_multiple=1)
    assert batch.input_ids.shape == (2, 10)
    assert owner[1].tolist() == [1] * 4 + [2] * 3 + [3] * 2 + [-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=40), st.integers(8, 64))
def test_first_fit_decreasing(lengths: list[int], budget: int) -> None:
    bins = first_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget
    # first fit: no later bin's first item fitted in an earlier bin at the time -> at most
    # one bin is at most half full
    assert sum(sum(lengths[i] for i in b) * 2 <= budget for b in bins) <= 1


# --------------------------------------------------------------------------------------------
# Real data and checkpoints


@pytest.fixture(scope="module")
def data_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path, ray_session: None
) -> Path:
    return preprocessed(
        tmp_path_factory.mktemp("eval-data"), tokenizer_path, files=4, docs=25, seed=5, heldout=0.3
    )


def _manifest(data: Path) -> Manifest:
    return Manifest.require(str(data))


def _export(data: Path, out: Path, arch: str, seed: int, sha: str | None = None) -> str:
    m = _manifest(data)
    mc = ModelConfig.preset(
        "gpthf-tiny",
        vocab_size=m.vocab_size,
        eos_id=m.eos_id,
        pad_id=m.pad_id,
        eod_id=m.eod_id,
        max_sentence_tokens=32,
        **TINY,
    )
    if arch == "gpt":
        mc = mc.baseline()
    torch.manual_seed(seed)
    model = build_model(mc)
    write_export(
        str(out),
        model.state_dict(),
        ExportConfig(
            model=mc,
            step=0,
            tokens_seen=0,
            schedule_hash="test",
            tokenizer_sha256=sha or m.tokenizer.sha256,
            special_ids=m.special_ids,
        ),
        (data / "tokenizer.json").read_text(),
    )
    return str(out)


@pytest.fixture(scope="module")
def exports(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "gpthf": _export(data_dir, root / "gpthf", "gpthf", 1),
        "gpt": _export(data_dir, root / "gpt", "gpt", 2),
    }


def _heldout_table(data: Path) -> Any:
    import pyarrow as pa

    m = _manifest(data)
    return pa.concat_tables(
        [
            pq.read_table(u, columns=list(SCORING_COLUMNS))
            for u in m.shard_uris(str(data), "heldout")
        ]
    )


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_prepack_equals_pad_on_checkpoints(
    data_dir: Path, exports: dict[str, str], arch: str
) -> None:
    from training.export import load_export

    table = _heldout_table(data_dir)
    m = _manifest(data_dir)
    model = load_export(exports[arch]).model
    kw = dict(pad_id=m.pad_id, eos_id=m.eos_id)
    pad = score_blocks(model, table, batching="pad", **kw)  # type: ignore[arg-type]
    for budget in (64, 256):
        pre = score_blocks(model, table, batching="prepack", token_budget=budget, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(pre["targets"], pad["targets"])
        np.testing.assert_array_equal(pre["eos_targets"], pad["eos_targets"])
        np.testing.assert_allclose(pre["nll"], pad["nll"], rtol=1e-5)
        assert pre["nll"].sum() == pytest.approx(pad["nll"].sum(), rel=1e-5)
    a = evaluate_rows(model, table, batching="pad", **kw)  # type: ignore[arg-type]
    assert a.tokens == m.totals("heldout")["tokens"]
    assert 1 < a.token_perplexity < 1.5 * model.config.vocab_size


@pytest.mark.usefixtures("ray_session")
def test_eval_job_report(data_dir: Path, exports: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "report"
    cfg = EvalConfig(
        checkpoints=[exports["gpthf"], exports["gpt"]],
        data=str(data_dir),
        output=str(out),
        actors=1,
        batch_rows=7,  # does not divide the rows: no tail may be lost
    )
    report = run_eval(cfg)
    m = _manifest(data_dir)
    split = m.totals("heldout")
    assert [c.arch for c in report.checkpoints] == ["gpthf", "gpt"]
    for c in report.checkpoints:
        assert c.total.rows == split["rows"] and c.total.tokens == split["tokens"]
        total = sum((s.sums for s in c.shards), Sums())
        assert total.nll == pytest.approx(c.total.nll, rel=1e-12)
        assert c.total.token_perplexity == pytest.approx(
            math.exp(c.total.nll / c.total.targets), rel=1e-12
        )
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["manifest_version"] == m.version
    # The report reads back into the same typed object.
    again = EvalReport.read(str(out))
    assert [c.total.nll for c in again.checkpoints] == [c.total.nll for c in report.checkpoints]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gpthf |" in (out / "report.md").read_text()
    assert "token ppl" in format_table(report)


def _assert_same_sums(a: Sums, b: Sums, where: str) -> None:
    """Counts exactly, the NLL sum to 1e-9 relative, the pruning keep sum to 1e-6.

    Both paths run the same fp32 forward, but which blocks share a packed row (so the shapes
    of the attention matmuls, and their last bits) follows how rows arrive in batches. The NLL
    sum averages that rounding away; the keep does not: at the inference alpha of 8 the gate's
    slope at its centre is 1 / (2 * 2**-6) = 32, 128 times the logistic's, and a keep is a
    product of gates, so one fp32 ulp of a gate's input shows as ~1e-8 of the keep sum. A
    different gate, alpha or mask moves it by far more than 1e-6."""
    for f in dataclasses.fields(Sums):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float):
            rel = 1e-6 if f.name == "prune_kept" else 1e-9
            assert x == pytest.approx(y, rel=rel, abs=0), f"{where} {f.name}"
        else:
            assert x == y, f"{where} {f.name}"


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("batching", ["prepack", "pad"])
def test_local_eval_equals_the_ray_job(
    data_dir: Path, exports: dict[str, str], tmp_path: Path, batching: str
) -> None:
    """``--local`` (pyarrow reads, this process) scores every shard as the Ray job does."""
    kw: dict[str, Any] = dict(
        checkpoints=[exports["gpthf"]], data=str(data_dir), batching=batching, batch_rows=7
    )
    ray_job = run_eval(EvalConfig(output=str(tmp_path / "ray"), **kw))
    local = run_eval(EvalConfig(output=str(tmp_path / "local"), local=True, **kw))
    (r,), (c,) = ray_job.checkpoints, local.checkpoints
    assert [s.shard for s in c.shards] == [s.shard for s in r.shards]
    assert len(c.shards) > 1 and all(s.sums.rows for s in c.shards)
    for a, b in zip(c.shards, r.shards, strict=True):
        _assert_same_sums(a.sums, b.sums, a.shard)
    _assert_same_sums(c.total, r.total, "total")
    assert (c.arch, c.step, c.parameters, c.model_config_hash) == (
        r.arch,
        r.step,
        r.parameters,
        r.model_config_hash,
    )
    assert EvalReport.read(str(tmp_path / "local")).checkpoints[0].total == c.total


def test_local_eval_runs_without_ray(
    data_dir: Path, exports: dict[str, str], tmp_path: Path
) -> None:
    """``gpthf eval --local`` where Ray is not installed: importing ray fails in the subprocess
    and nothing on the path tries (nor is ray in ``sys.modules`` afterwards)."""
    out = tmp_path / "o"
    argv = ["eval", "--local", "--threads", "1", "--checkpoint", exports["gpt"]]
    argv += ["--data", str(data_dir), "--output", str(out)]
    code = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "from jobs.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('ray', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
        "sys.exit(rc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ray []" in proc.stdout, proc.stdout
    (score,) = EvalReport.read(str(out)).checkpoints
    assert score.total.rows == _manifest(data_dir).totals("heldout")["rows"]
    with pytest.raises(EvalConfigError, match=r"--local.*--actors"):
        EvalConfig(checkpoints=["x"], data="d", output="o", local=True, actors=2)


@pytest.mark.parametrize("local", [False, True], ids=["ray", "local"])
def test_scored_counts_are_checked_against_the_manifest(
    data_dir: Path, exports: dict[str, str], tmp_path: Path, local: bool
) -> None:
    """A manifest that claims a row more than a shard holds: the scored counts differ, named."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    raw = json.loads((data / "manifest.json").read_text())
    ref = _manifest(data_dir).shards("heldout")[0]
    (entry,) = [s for s in raw["splits"]["heldout"]["shards"] if s["path"] == ref.path]
    entry["rows"] += 1
    (data / "manifest.json").write_text(json.dumps(raw))
    cfg = EvalConfig(
        checkpoints=[exports["gpt"]], data=str(data), output=str(tmp_path / "o"), local=local
    )
    expected = f"{ref.path}: rows {ref.rows}/{ref.rows + 1}, tokens {ref.tokens}/{ref.tokens}"
    with pytest.raises(EvalError, match="scored counts differ from the manifest") as caught:
        run_eval(cfg)
    assert expected in str(caught.value)
    assert not (tmp_path / "o" / "report.json").exists()


def test_clear_errors(data_dir: Path, exports: dict[str, str], tmp_path: Path) -> None:
    def cfg(ckpt: str, data: Path = data_dir) -> EvalConfig:
        return EvalConfig(checkpoints=[ckpt], data=str(data), output=str(tmp_path / "o"))

    wrong_tok = _export(data_dir, tmp_path / "wrong", "gpt", 3, sha="0" * 64)
    with pytest.raises(EvalError, match="tokenizer"):
        run_eval(cfg(wrong_tok))
    broken = tmp_path / "broken"
    shutil.copytree(exports["gpt"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(EvalError, match="unreadable checkpoint"):
        run_eval(cfg(str(broken)))
    with pytest.raises(EvalError, match="unreadable checkpoint"):
        run_eval(cfg(str(tmp_path / "nowhere")))
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    victim = next((data / "heldout").glob("*.parquet"))
    victim.unlink()
    with pytest.raises(EvalError, match=re.escape(victim.name)):
        run_eval(cfg(exports["gpt"], data))
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_args_and_early_refusal(
    data_dir: Path, exports: dict[str, str], tmp_path: Path
) -> None:
    import argparse

    from jobs.evaluate import add_args, config_from_args, main

    parser = argparse.ArgumentParser()
    add_args(parser)
    argv = ["--checkpoint", exports["gpthf"], "--checkpoint", exports["gpt"], "--data"]
    argv += [str(data_dir), "--output", str(tmp_path / "r"), "--batching", "pad", "--actors", "3"]
    cfg = config_from_args(parser.parse_args(argv))
    assert cfg.checkpoints == [exports["gpthf"], exports["gpt"]]
    assert (cfg.batching, cfg.actors, cfg.split, cfg.gpu) == ("pad", 3, "heldout", False)
    with pytest.raises(ManifestError, match="nope"):
        main(parser.parse_args([*argv, "--split", "nope"]))


def test_failing_shard_is_named(data_dir: Path, exports: dict[str, str]) -> None:
    import pyarrow as pa

    from training.eval.job import _Scorer

    m = _manifest(data_dir)
    scorer = _Scorer(exports["gpt"], None, False, m.pad_id, m.eos_id, "prepack", 256, 1, 1)
    bad = pa.table({**HAND, "path": ["x/heldout/u7.parquet"] * 2})
    bad = bad.set_column(1, "sentence_lengths", pa.array([[3, 3], [4]]))  # 6 != 5 tokens
    with pytest.raises(EvalError, match=r"u7\.parquet"):
        scorer(bad)
    good = scorer(bad.set_column(1, "sentence_lengths", pa.array([[3, 2], [4]])))
    assert good["targets"].tolist() == [3, 3] and good["tokens"].tolist() == [5, 4]


def test_scoring_actors_use_the_nodes_cores(exports: dict[str, str]) -> None:
    """Ray starts actors with OMP_NUM_THREADS=1; the scorer sets torch's threads itself:
    ``threads`` when given, else the node's cores shared among the actors."""
    import os

    import torch

    from training.eval.job import _Scorer

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        for threads, actors, expected in ((3, 1, 3), (0, 1, cores), (0, 2 * cores, 1)):
            _Scorer(exports["gpt"], None, False, 1, 0, "prepack", 256, threads, actors)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    with pytest.raises(EvalConfigError, match="threads"):
        EvalConfig(checkpoints=["x"], data="d", output="o", threads=-1)
