"""A swapped tokenizer, a damaged shard or a missing one is refused before training or
evaluation starts, naming the file and the way out; an export whose tokenizer was swapped is
refused when it is loaded.

Before: a swapped ``tokenizer.json`` trained silently and the export shipped it (generation then
dropped every id beyond the small vocabulary); a damaged shard failed mid-run with a raw
traceback, after Ray had started. Each test damages real files of a real data folder (made by
``benchmarks/synthetic_shards.py``: the block schema, a manifest with every shard's sha256) and
first asserts that the damage is there (the fault landed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.manifest import Manifest, ManifestError
from training.eval.config import EvalConfig
from training.eval.job import EvalError, run_eval
from training.export import ExportError, load_export

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_shards import SyntheticSpec, tokenizer_json, write_synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("integrity") / "data"
    write_synthetic(data, SyntheticSpec(rows=32, sentences=8, vocab_size=512, shards=2))
    return data


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "training.train.local", "--data", str(data), "--output", str(out),
        "--model", "gpt-tiny", "--model-overrides", '{"d_model": 32, "n_heads": 2, "ffn_dim": 64}',
        "--micro-batch", "2", "--total-steps", "2", "--warmup-steps", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _damage_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
    path.write_bytes(bytes(raw))


def test_a_swapped_tokenizer_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    manifest = Manifest.require(str(data))
    (data / "tokenizer.json").write_text(tokenizer_json(300))  # another, smaller vocabulary
    assert _sha(data / "tokenizer.json") != manifest.tokenizer.sha256  # the fault landed

    proc = _train(data, tmp_path / "run")

    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tokenizer.json: sha256" in proc.stderr and "put back the tokenizer" in proc.stderr
    assert not (tmp_path / "run" / "local").exists()  # refused before any step or checkpoint


def test_a_damaged_or_missing_shard_is_named_before_training_and_eval(
    data: Path, tmp_path: Path
) -> None:
    manifest = Manifest.require(str(data))
    damaged = data / manifest.shards("train")[1].path
    missing = data / manifest.shards("heldout")[0].path
    _damage_middle(damaged)
    missing.unlink()
    assert _sha(damaged) != manifest.shards("train")[1].sha256  # the faults landed

    with pytest.raises(ManifestError) as caught:
        manifest.verify_data(str(data), ["train", "heldout"])
    message = str(caught.value)
    assert f"{manifest.shards('train')[1].path}: sha256" in message
    assert f"{manifest.shards('heldout')[0].path}: missing" in message
    assert "never skipped" in message

    proc = _train(data, tmp_path / "run")
    assert proc.returncode == 2 and "differs from the manifest" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    # The same data with only the damaged shard left: evaluation names it before Ray starts.
    shutil.copy(damaged, missing)  # any bytes: present, but not what the manifest recorded
    export = _export_of_untrained_model(data, tmp_path)
    with pytest.raises(EvalError, match=r"does not match its manifest\.json"):
        run_eval(EvalConfig(checkpoints=[export], data=str(data), output=str(tmp_path / "e")))
    # "exists" trusts present files: it is the cheap mode, and says so.
    check = manifest.verify_data(str(data), ["heldout"], mode="exists")
    assert check.mode == "exists" and check.hashed_bytes == 0


def _export_of_untrained_model(data: Path, tmp_path: Path) -> str:
    import torch

    from training.export import ExportConfig, write_export
    from training.model import ModelConfig, build_model

    m = Manifest.require(str(data))
    mc = ModelConfig.preset(
        "gpt-tiny",
        vocab_size=m.vocab_size,
        eos_id=m.eos_id,
        pad_id=m.pad_id,
        eod_id=m.eod_id,
        max_sentence_tokens=m.max_sentence_tokens,
    )
    torch.manual_seed(0)
    out = tmp_path / "export"
    write_export(
        str(out),
        build_model(mc).state_dict(),
        ExportConfig(
            model=mc,
            step=0,
            tokens_seen=0,
            tokenizer_sha256=m.tokenizer.sha256,
            special_ids=m.special_ids,
        ),
        (data / "tokenizer.json").read_text(),
    )
    return str(out)


def test_an_export_with_a_swapped_tokenizer_is_refused_when_loaded(
    data: Path, tmp_path: Path
) -> None:
    export = Path(_export_of_untrained_model(data, tmp_path))
    assert load_export(str(export)).model.config.vocab_size == 512  # intact: it loads
    (export / "tokenizer.json").write_text(tokenizer_json(300))
    recorded = json.loads((export / "config.json").read_text())["tokenizer_sha256"]
    assert _sha(export / "tokenizer.json") != recorded  # the fault landed

    with pytest.raises(ExportError, match="tokenizer was replaced"):
        load_export(str(export))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "generate", "--checkpoint", str(export), "--prompt",
         "t5 t6"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "tokenizer was replaced" in proc.stderr
    assert "Traceback" not in proc.stderr
