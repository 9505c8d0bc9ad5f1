"""Everyday input a user meets: a byte-order mark, a Latin-1 file, out-of-range generation
options, NaN in JSON output. Each gets what a user expects (the text, a hint, one message and
the CLI's exit code, valid JSON), not a skip without a word or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from jobs.cli import main
from jobs.generate import _no_nan
from pipeline.config import InputConfig
from pipeline.counters import Counters, StrictModeError
from pipeline.readers import UTF8_BOM, read_documents
from pipeline.stats import format_stats
from training.generation.config import GenerateConfig, GenerateConfigError


def _read(path: Path, strict: bool = False) -> tuple[list, Counters]:
    counters = Counters(strict=strict)
    fs = fsspec.filesystem("file")
    docs = list(read_documents(fs, str(path), str(path), InputConfig(), counters))
    return docs, counters


def test_a_utf8_bom_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"text": "First record. It is here."}), json.dumps({"text": "Second."})]
    path.write_bytes(UTF8_BOM + "\n".join(lines).encode() + b"\n")
    assert path.read_bytes().startswith(UTF8_BOM)  # the fault is there
    docs, counters = _read(path)
    assert [d.text for d in docs] == ["First record. It is here.", "Second."]
    assert not counters.skipped


def test_a_latin1_file_is_skipped_with_a_hint_to_re_encode(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "Café au lait."}, ensure_ascii=False).encode("latin-1"))
    docs, counters = _read(path)
    assert not docs and counters.skipped == {"invalid_utf8": 1}
    stats = {
        "manifest_version": 1,
        "inputs": 1,
        "documents": 0,
        "sentences": 0,
        "tokens": 0,
        "bytes": 0,
        "mean_sentence_tokens": 0.0,
        "sentences_split": 0,
        "splits": {},
        "skipped": dict(counters.skipped),
    }
    assert "iconv -f latin1 -t utf-8" in format_stats(stats)
    with pytest.raises(StrictModeError, match="re-encode it"):
        _read(path, strict=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("temperature", -1.0, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be >= 0"),
        ("top_k", -2, "top_k must be >= 0"),
        ("top_p", 2.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ],
)
def test_generation_options_are_checked_by_the_config(field: str, value, message: str) -> None:
    with pytest.raises(GenerateConfigError, match=message):
        GenerateConfig(checkpoint="x", prompts=["a"], **{field: value})


def test_the_cli_refuses_a_bad_generation_option_with_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--top-p", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1]" in err and "Traceback" not in err


def test_json_output_has_no_nan() -> None:
    out = _no_nan({"natural_end_rate": float("nan"), "per": [1.0, float("inf")], "n": 3})
    text = json.dumps(out, allow_nan=False)  # raises on NaN
    assert json.loads(text) == {"natural_end_rate": None, "per": [1.0, None], "n": 3}
