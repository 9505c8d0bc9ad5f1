"""The `gpthf` command line: YAML config + flag overrides, and one clear line per user error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.config import ConfigError, load_preprocess_config
from tests.conftest import make_document


def test_yaml_config_with_flag_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "pre.yaml"
    cfg_file.write_text(
        "input:\n  paths: [a.jsonl]\n  text_field: body\n"
        "packing:\n  sentences_per_block: 16\n  seed: 3\n"
        "output: out\ntokenizer: tok.json\n"
    )
    cfg = load_preprocess_config(cfg_file, {"packing.seed": 9, "output": None})
    assert cfg.input.text_field == "body"
    assert cfg.packing.sentences_per_block == 16 and cfg.packing.seed == 9
    assert cfg.output == "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text("packing:\n  sentence_per_block: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['sentence_per_block'\]"):
        load_preprocess_config(bad)
    bad.write_text("packing:\n  max_sentence_tokens: 2\n")
    with pytest.raises(ConfigError, match="M"):
        load_preprocess_config(bad)


@pytest.mark.usefixtures("ray_session")
def test_cli_preprocess_then_rerun(
    tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    rng = random.Random(5)
    src.write_text("".join(json.dumps({"text": make_document(rng)}) + "\n" for _ in range(10)))
    out = tmp_path / "out"
    args = [
        "preprocess",
        str(src),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer_path),
        "-S",
        "4",
        "--no-plot",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "manifest v1" in printed and "documents 10" in printed
    assert main(args) == 0
    assert "nothing new" in capsys.readouterr().out
    assert main([*args[:-3], "-S", "5", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpthf preprocess: error:") and "sentences_per_block" in err


def test_cli_errors_are_one_clear_line(
    tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "preprocess",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tokenizer_path),
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err


def test_cli_tokenizer_train(
    tmp_path: Path, corpus_text: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "t.txt"
    src.write_text("\n\n".join(corpus_text[:50]))
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(src), "--output", str(out), "--vocab-size", "300"]) == 0
    assert "vocab 300" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {t["content"] for t in data["added_tokens"]} >= {
        "<|endofsentence|>",
        "<|pad|>",
        "<|endofdoc|>",
    }
