"""lm-evaluation-harness with the ``gpthf`` model: real lm-eval 0.4.13, the shipped local task.

The agreement test runs the real ``gpthf preprocess`` and ``gpthf eval`` (in-process Ray) on
the same documents that lm-eval scores, and compares the two bits-per-byte figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from tests.conftest import make_document
from tests.test_hf import _export
from training.generation.decode import sentence_ids_for
from training.hf.lm_eval_model import GPTHFLM

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "training" / "hf" / "tasks"
S, M = 8, 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(11)
    path = tmp_path_factory.mktemp("lmeval") / "docs.jsonl"
    docs = [make_document(rng, rng.randint(2, 12)) for _ in range(30)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def export(tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _export(tokenizer_path, tmp_path_factory.mktemp("lmeval-export") / "e", "gpthf", 4)


def _evaluate(lm: GPTHFLM, corpus: Path) -> dict[str, float]:
    out = simple_evaluate(
        model=lm,
        tasks=["gpthf_sample"],
        task_manager=TaskManager(include_path=str(TASKS), metadata={"path": str(corpus)}),
        bootstrap_iters=0,
    )
    assert out is not None
    return {k.split(",")[0]: v for k, v in out["results"]["gpthf_sample"].items()}


def test_bits_per_byte_agrees_with_gpthf_eval(
    ray_session: None, tokenizer_path: Path, corpus: Path, export: str, tmp_path: Path
) -> None:
    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess
    from training.eval.config import EvalConfig
    from training.eval.job import run_eval

    run_preprocess(
        PreprocessConfig(
            input=InputConfig(paths=[str(corpus)]),
            output=str(tmp_path / "data"),
            tokenizer=str(tokenizer_path),
            packing=PackingConfig(
                sentences_per_block=S, max_sentence_tokens=M, heldout_fraction=0.0
            ),
            plot=False,
        )
    )
    report = run_eval(
        EvalConfig(
            checkpoints=[export], data=str(tmp_path / "data"), output=str(tmp_path / "ev"),
            split="train",
        )
    )  # fmt: skip
    ours = report.checkpoints[0].total
    lm = GPTHFLM(pretrained=export, sentences_per_block=S)
    res = _evaluate(lm, corpus)
    # Same sentences, tokens and byte count: the only difference left is where blocks start
    # (gpthf packs documents back to back, lm-eval scores each document from its start).
    assert lm.sums.bytes == ours.bytes
    assert lm.sums.tokens == ours.tokens
    assert math.isclose(res["gpthf_bits_per_byte"], lm.sums.bits_per_byte, rel_tol=1e-9)
    assert abs(res["gpthf_bits_per_byte"] / ours.bits_per_byte - 1) < 0.01
    # lm-eval's own bits_per_byte: the same log-likelihood over the raw text's bytes.
    raw = sum(len(json.loads(line)["text"].encode()) for line in corpus.read_text().splitlines())
    assert math.isclose(res["bits_per_byte"], lm.sums.nll / math.log(2) / raw, rel_tol=1e-9)


def test_loglikelihood_and_generate_until(export: str) -> None:
    lm = GPTHFLM(pretrained=export)
    c = lm.config
    ctx, conts = "Cats sleep in the garden.", [" Dogs run quietly.", " Old green birds sing!"]
    out = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, x), 0) for x in conts])
    # Each equals the model's own log-probabilities of the continuation's tokens.
    for (ll, greedy), cont in zip(out, conts, strict=True):
        whole, ctx_ids = lm._encode(ctx + cont), lm._encode(ctx)
        assert whole[: len(ctx_ids)] == ctx_ids  # the context closes its sentence: a prefix
        ids = torch.tensor([whole])
        sid = sentence_ids_for(ids, torch.tensor([len(whole)]), c.eos_id)
        with torch.no_grad():
            logp = lm.model(ids, sid)[0].log_softmax(-1)
        tgt = torch.tensor(whole[len(ctx_ids) :])
        ref = logp[len(ctx_ids) - 1 : -1].gather(1, tgt[:, None]).sum()
        assert math.isclose(ll, float(ref), rel_tol=1e-5)
        assert greedy == bool((logp[len(ctx_ids) - 1 : -1].argmax(-1) == tgt).all())
    (text,) = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 12}), 0)]
    )
    from training.generation.text import generate_text

    ref_text, _ = generate_text(lm.model, lm.tok, ctx, max_new_tokens=12, mode="kv")
    assert text.strip() == ref_text[0].split("\n")[0].strip()


def test_gpthf_lm_eval_command_line(export: str, corpus: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "jobs.cli", "lm-eval", "--model", "gpthf",
            "--model_args", f"pretrained={export},sentences_per_block={S}",
            "--tasks", "gpthf_sample", "--metadata", json.dumps({"path": str(corpus)}),
            "--device", "cpu", "--output_path", str(tmp_path / "out"),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=240,
        env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpthf_bits_per_byte" in proc.stdout
    (result,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(result.read_text())["results"]["gpthf_sample"]
    lm = GPTHFLM(pretrained=export, sentences_per_block=S)
    assert math.isclose(
        data["gpthf_bits_per_byte,none"], _evaluate(lm, corpus)["gpthf_bits_per_byte"]
    )


def test_an_hf_folder_scores_as_its_export(export: str, corpus: Path, tmp_path: Path) -> None:
    from training.hf.folder import export_hf

    export_hf(export, str(tmp_path / "hf"))
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:5]]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in docs]
    a = GPTHFLM(pretrained=export, sentences_per_block=S).loglikelihood_rolling(reqs)
    b = GPTHFLM(pretrained=str(tmp_path / "hf"), sentences_per_block=S).loglikelihood_rolling(reqs)
    assert a == b
