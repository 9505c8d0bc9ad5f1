"""The `gpthf` command line: flags generated from the config dataclasses, YAML config + flag
overrides, and one clear line per user error."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline import settings
from pipeline.config import ConfigError, PreprocessConfig, StorageConfig, load_preprocess_config
from pipeline.contamination import ContaminationConfig
from pipeline.errors import UserError
from tests.conftest import make_document
from training.eval.config import EvalConfig
from training.generation.config import GenerateConfig
from training.train.config import TrainConfig, TrainConfigError

ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- generated flags

JOB_CONFIGS = {
    "preprocess": PreprocessConfig,
    "nightly": PreprocessConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "generate": GenerateConfig,
    "contamination": ContaminationConfig,
}

# The flags users, scripts and the cluster manifests already type: they must keep working.
LEGACY_FLAGS = {
    "preprocess": "--output --tokenizer -S --sentences-per-block -M --max-sentence-tokens "
    "--heldout-fraction --seed --strict --format --text-field --id-field --text-document "
    "--workers --on-changed --endpoint-url --no-plot --json --config",
    "nightly": "--input --output --tokenizer --date --config",
    "train": "--data --output --model --workers --cpus-per-worker --placement-strategy --gpu "
    "--zero-stage --micro-batch --grad-accum --lr --total-steps --warmup-steps --max-steps "
    "--checkpoint-every --eval-every --seed --name --resume --activation-checkpointing "
    "--model-overrides --config",
    "eval": "--checkpoint --data --split --output --actors --gpu --batching --token-budget "
    "--batch-rows --endpoint-url --config",
    "generate": "--checkpoint --prompt --max-new-tokens --mode --temperature --top-k --top-p "
    "--seed --gpu --json --config",
    "contamination": "--output --mode --remove --json --config",
}


def help_entries(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """``gpthf COMMAND --help``, one string per option or positional (its flags, then its help)."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a doc is one run of text
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    entries: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if re.match(r"  \S", line):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", sorted(JOB_CONFIGS))
def test_help_lists_every_field_with_its_doc_and_default(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = help_entries(command, capsys, monkeypatch)
    cfg = JOB_CONFIGS[command]
    fields = settings.leaves(cfg)
    assert len(fields) > 5
    for leaf in fields:
        if leaf.secret:
            assert not any(f"--{leaf.path}" in e for e in entries), f"secret {leaf.path} has a flag"
            continue
        assert leaf.doc, f"{leaf.path} has no docstring: document it under the field"
        (entry,) = [e for e in entries if e.startswith(f"--{leaf.path} ") or e == f"--{leaf.path}"
                    or e.startswith(f"--{leaf.path},")]  # fmt: skip
        for flag in leaf.flags:
            assert flag in entry, (leaf.path, flag, entry)
        assert leaf.doc.rstrip(".") in entry, (leaf.path, entry)
        default = (
            "(required)" if leaf.required else f"(default: {settings.show_value(leaf.default)})"
        )
        assert default in entry, (leaf.path, entry)
        if leaf.choices:
            assert f"One of: {', '.join(map(str, leaf.choices))}." in entry
    text = " ".join(entries)
    for flag in LEGACY_FLAGS[command].split():
        assert re.search(rf"(^|[ ,]){re.escape(flag)}([ ,]|$)", text), f"{command}: {flag} missing"
    if command == "preprocess":
        assert any(e.startswith("INPUT ") for e in entries)


def test_legacy_train_flags_map_to_fields() -> None:
    from jobs.train import add_args, config_from_args

    parser = argparse.ArgumentParser()
    add_args(parser)
    argv = "--data D --output O --model gpt-tiny --workers 2 --cpus-per-worker 0.5 "
    argv += (
        "--placement-strategy STRICT_SPREAD --gpu --zero-stage 3 --micro-batch 4 --grad-accum 2 "
    )
    argv += "--lr 2e-3 --total-steps 90 --warmup-steps 9 --max-steps 30 --checkpoint-every 10 "
    argv += "--eval-every 15 --seed 7 --name r1 --resume --activation-checkpointing"
    cfg = config_from_args(
        parser.parse_args([*argv.split(), "--model-overrides", '{"d_model": 64}'])
    )
    assert (cfg.data.uri, cfg.run.output, cfg.model.preset) == ("D", "O", "gpt-tiny")
    assert cfg.model.overrides == {"d_model": 64}
    assert (cfg.run.workers, cfg.run.cpus_per_worker, cfg.run.gpu) == (2, 0.5, True)
    assert cfg.run.placement_strategy == "STRICT_SPREAD"
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.micro_batch_rows) == (3, 4)
    assert cfg.deepspeed.grad_accum == 2 and cfg.deepspeed.activation_checkpointing
    assert (cfg.optim.lr, cfg.optim.total_steps, cfg.optim.warmup_steps) == (2e-3, 90, 9)
    assert (cfg.run.max_steps, cfg.run.checkpoint_every, cfg.run.eval_every) == (30, 10, 15)
    assert (cfg.run.seed, cfg.run.name, cfg.run.resume) == (7, "r1", True)
    again = config_from_args(
        parser.parse_args(["--optim.betas", "0.8", "0.9", "--run.max_steps", "none"])
    )
    assert again.optim.betas == (0.8, 0.9) and again.run.max_steps is None


@pytest.mark.parametrize(
    ("command", "yaml_text", "flags", "message"),
    [
        (
            "train",
            "run:\n  placement_strategy: SPRED\n",
            ["--placement-strategy", "SPRED"],
            "run.placement_strategy must be one of PACK, SPREAD, STRICT_SPREAD, STRICT_PACK, got 'SPRED'",
        ),
        (
            "train",
            "deepspeed:\n  zero_stage: 4\n",
            ["--deepspeed.zero_stage", "4"],
            "deepspeed.zero_stage must be one of 0, 1, 2, 3, got 4",
        ),
        (
            "preprocess",
            "input:\n  format: xml\n",
            ["--format", "xml"],
            "input.format must be one of auto, jsonl, parquet, text, got 'xml'",
        ),
        (
            "eval",
            "checkpoints: [a]\ndata: d\noutput: o\nbatching: padded\n",
            ["--checkpoint", "a", "--data", "d", "--output", "o", "--batching", "padded"],
            "batching must be one of prepack, pad, got 'padded'",
        ),
        (
            "train",
            "optim:\n  lr: fast\n",
            ["--lr", "fast"],
            "optim.lr must be a number, got 'fast'",
        ),
    ],
)
def test_bad_value_in_yaml_or_flag_is_refused_alike(
    command: str,
    yaml_text: str,
    flags: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml_text)
    assert main([command, "--config", str(cfg_file)]) == 2
    from_yaml = capsys.readouterr().err
    assert main([command, *flags]) == 2
    from_flag = capsys.readouterr().err
    assert from_yaml == from_flag == f"gpthf {command}: error: {message}\n"


def test_unset_flags_do_not_override_yaml(tmp_path: Path) -> None:
    from jobs.train import add_args, config_from_args

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        "data: {uri: D}\nrun: {output: O, workers: 3, gpu: true, seed: 5}\n"
        "optim: {lr: 1e-2, betas: [0.8, 0.99]}\ndeepspeed: {activation_checkpointing: true}\n"
        "model: {overrides: {d_model: 64}}\n"
    )
    parser = argparse.ArgumentParser()
    add_args(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(cfg_file), "--lr", "0.02"]))
    assert cfg.optim.lr == 0.02  # given: overrides
    assert (cfg.run.workers, cfg.run.gpu, cfg.run.seed, cfg.data.uri) == (3, True, 5, "D")
    assert cfg.optim.betas == (0.8, 0.99) and cfg.model.overrides == {"d_model": 64}
    assert cfg.deepspeed.activation_checkpointing
    off = config_from_args(parser.parse_args(["--config", str(cfg_file), "--no-gpu"]))
    assert off.run.gpu is False and off.run.workers == 3
    assert config_from_args(parser.parse_args([])) == TrainConfig()  # no file, no flags: defaults

    pre = tmp_path / "pre.yaml"
    pre.write_text("input: {paths: [a.jsonl, b.jsonl]}\nplot: false\npacking: {seed: 4}\n")
    from jobs.preprocess import add_args as add_pre_args
    from jobs.preprocess import config_from_args as pre_config

    pp = argparse.ArgumentParser()
    add_pre_args(pp)
    got = pre_config(pp.parse_args(["--config", str(pre), "-S", "8"]))
    assert got.input.paths == ["a.jsonl", "b.jsonl"] and got.plot is False
    assert (got.packing.seed, got.packing.sentences_per_block) == (4, 8)
    inputs = pre_config(pp.parse_args(["--config", str(pre), "x.jsonl", "--input", "y.jsonl"]))
    assert inputs.input.paths == ["x.jsonl", "y.jsonl"]


def test_eval_reads_a_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.evaluate import add_args, config_from_args

    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(
        "checkpoints: [runs/a/export, runs/b/export]\ndata: runs/data\noutput: runs/eval\n"
        "batching: pad\nactors: 2\nstorage:\n  endpoint_url: http://127.0.0.1:8333\n"
        "  key: k\n  secret: s\n"
    )
    parser = argparse.ArgumentParser()
    add_args(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(cfg_file)]))
    assert cfg.checkpoints == ["runs/a/export", "runs/b/export"]
    assert (cfg.data, cfg.output, cfg.batching, cfg.actors) == ("runs/data", "runs/eval", "pad", 2)
    assert cfg.storage == StorageConfig(endpoint_url="http://127.0.0.1:8333", key="k", secret="s")
    assert cfg.token_budget == 1024 and cfg.split == "heldout"  # defaults stay
    one = config_from_args(parser.parse_args(["--config", str(cfg_file), "--checkpoint", "c"]))
    assert one.checkpoints == ["c"] and one.batching == "pad"
    assert main(["eval", "--checkpoint", "c", "--output", "o"]) == 2
    assert capsys.readouterr().err == "gpthf eval: error: data is required (give --data)\n"
    cfg_file.write_text("checkpoints: [a]\ndata: d\noutput: o\nbatch_size: 3\n")
    assert main(["eval", "--config", str(cfg_file)]) == 2
    assert "unknown config key(s) ['batch_size']" in capsys.readouterr().err


def test_python_m_job_runs_without_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--help"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "--optim.lr" in run.stdout and "Peak learning rate" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--placement-strategy", "SPRED"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("gpthf train: error: run.placement_strategy must be one of")
    for module in ("jobs.preprocess", "jobs.evaluate", "jobs.nightly", "jobs.generate"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and "--config FILE" in done.stdout, (module, done.stderr)


def test_generate_on_a_corrupt_export_is_one_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{not json")
    (export / "model.safetensors").write_bytes(b"not weights")
    (export / "tokenizer.json").write_text("{}")
    assert main(["generate", "--checkpoint", str(export), "--prompt", "Enter the king."]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpthf generate: error: {export}") and "export" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "path",
    [
        "pipeline.config.ConfigError",
        "pipeline.storage.StorageError",
        "pipeline.manifest.ManifestError",
        "pipeline.tokenizer.TokenizerError",
        "pipeline.preprocess.ChangedInputError",
        "pipeline.counters.StrictModeError",
        "pipeline.sample_corpus.SampleCorpusError",
        "jobs.submit.SubmitError",
        "training.train.config.TrainConfigError",
        "training.eval.config.EvalConfigError",
        "training.eval.job.EvalError",
        "training.train.checkpoint.CheckpointError",
        "training.export.ExportError",
        "training.generation.text.GenerationError",
    ],
)
def test_user_errors_share_one_base(path: str) -> None:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, UserError)


def test_one_place_maps_user_errors_to_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.entry import run_command
    from pipeline.counters import StrictModeError

    def strict(_: argparse.Namespace) -> int:
        raise StrictModeError("bad record at a.jsonl:3; run without --strict to skip it")

    def bug(_: argparse.Namespace) -> int:
        raise KeyError("a bug keeps its traceback")

    assert run_command("preprocess", strict, argparse.Namespace()) == 1
    assert capsys.readouterr().err == (
        "gpthf preprocess: error: bad record at a.jsonl:3; run without --strict to skip it\n"
    )
    with pytest.raises(KeyError):
        run_command("preprocess", bug, argparse.Namespace())


def test_settings_coerce_and_refuse_by_name(tmp_path: Path) -> None:
    cfg = settings.load_config(
        TrainConfig,
        None,
        {"optim.lr": "1e-3", "optim.total_steps": "1e3", "run.gpu": "yes", "run.max_steps": "null"},
    )
    assert (cfg.optim.lr, cfg.optim.total_steps, cfg.run.gpu, cfg.run.max_steps) == (
        1e-3,
        1000,
        True,
        None,
    )
    for overrides, message in [
        ({"run.workers": "two"}, "run.workers must be an integer, got 'two'"),
        ({"run.workers": 1.5}, "run.workers must be an integer, got 1.5"),
        ({"run.gpu": "maybe"}, "run.gpu must be true or false, got 'maybe'"),
        ({"model.overrides": "{d_model"}, "model.overrides must be a JSON object"),
        ({"optim.betas": [0.9]}, "optim.betas needs 2 values"),
        ({"run.name": ["a"]}, "run.name must be a string"),
        ({"runs.workers": 2}, "unknown config key(s) ['runs'] in the config; known: ['data', "),
    ]:
        with pytest.raises(TrainConfigError) as info:
            settings.load_config(TrainConfig, None, overrides, error=TrainConfigError)
        assert str(info.value).startswith(message), (overrides, str(info.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        settings.load_config(PreprocessConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        settings.load_config(PreprocessConfig, tmp_path / "missing.yaml")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the workers' and checkpoints' copy


def test_literal_choices_match_the_code_that_uses_them() -> None:
    from training.eval.scoring import BATCHINGS
    from training.generation.decode import MODES

    assert settings.choices_of(EvalConfig, "batching") == BATCHINGS
    modes = set(settings.choices_of(GenerateConfig, "mode"))
    assert modes == set(MODES["gpthf"]) and set(MODES["gpt"]) <= modes
