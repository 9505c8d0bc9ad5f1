"""The Hugging Face format: export-hf / import-hf, loading with transformers alone, generate().

Real transformers (the ``.[hf]`` extra): the exported folder is loaded by
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` in a subprocess where
every gpthf package is made unimportable, so the folder proves it is self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.tokenizer import load_tokenizer
from tests.conftest import make_sentence
from training.export import ExportConfig, load_export, write_export
from training.generation.decode import generate, sentence_ids_for
from training.hf.folder import HFFormatError, export_hf, import_hf, read_hf
from training.model import ModelConfig, build_model

TINY = dict(d_model=64, n_heads=4, n_layers=4, ffn_dim=128)


def _export(tokenizer_path: Path, out: Path, arch: str, seed: int) -> str:
    """An export of a random model; arch "gpthf+prune" / "gpt+prune": with pruning gates that
    drop part of the context (the HF folder must carry them and the evicting caches)."""
    arch, _, prune = arch.partition("+")
    tok = load_tokenizer(str(tokenizer_path))
    ids = tok.special_ids
    mc = ModelConfig.preset(
        "gpthf-tiny",
        vocab_size=tok.tokenizer.get_vocab_size(),
        eos_id=ids["end_of_sentence"],
        pad_id=ids["pad"],
        eod_id=ids["end_of_document"],
        max_sentence_tokens=24,
        **{**TINY, "n_encoder_layers": 2},
    )
    if arch == "gpt":
        mc = mc.baseline()
    if prune:
        mc = dataclasses.replace(mc, prune=True, prune_dim=16)
    torch.manual_seed(seed)
    model = build_model(mc)
    with torch.no_grad():  # a random init is too flat to tell tokens apart: sharpen it
        model.embed.weight.mul_(8.0)
        for block in model.blocks:
            if block.pruner is not None:
                block.pruner.gate_bias.fill_(0.1)
                block.pruner.interaction.weight.normal_(0.0, 0.1)
    cfg = ExportConfig(
        model=mc,
        step=7,
        tokens_seen=123,
        tokenizer_sha256=tok.sha256,
        special_ids=ids,
        data="test",
        schedule_hash="h",
        extra={"train": {"lr": 0.001}},  # provenance must survive the round trip too
    )
    write_export(str(out), model.state_dict(), cfg, tok.json)
    return str(out)


@pytest.fixture(scope="module", params=["gpthf", "gpt", "gpthf+prune", "gpt+prune"])
def folders(
    request: pytest.FixtureRequest, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    root = tmp_path_factory.mktemp(f"hf-{request.param.replace('+', '-')}")
    src = _export(tokenizer_path, root / "export", request.param, seed=3)
    _cli("export-hf", src, str(root / "hf"))
    return src, str(root / "hf")


def _cli(*args: str) -> str:
    """``gpthf ARGS`` as a user runs it; returns stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _prompts(tokenizer_path: Path, eos: int, n: int = 4) -> list[list[int]]:
    """Ragged prompts of whole sentences, the last of each left open."""
    tok = load_tokenizer(str(tokenizer_path)).tokenizer
    rng = random.Random(5)
    out = []
    for i in range(n):
        ids: list[int] = []
        for _ in range(1 + i):
            ids += [*tok.encode(make_sentence(rng, rng.randint(2, 5))).ids, eos]
        ids += tok.encode(make_sentence(rng, 2)).ids[: 1 + i]  # an open sentence
        out.append(ids)
    return out


# The subprocess: gpthf's packages cannot be imported, only torch and transformers.
_ISOLATED = """
import importlib.abc, sys, json, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("training", "pipeline", "jobs", "tests"):
            raise ImportError(f"gpthf module {name} imported by the HF folder")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder)
assert tok.pad_token_id == model.config.pad_token_id
width = max(map(len, prompts))
ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True)
torch.save({"logits": logits, "mask": mask, "greedy": greedy[:, width:], "sampled": sampled}, out)
spelled = tok("He wrote <|endofsentence|> and <|endofdoc|> on it.").input_ids
print(json.dumps({"eos_s": tok.convert_tokens_to_ids("<|endofsentence|>"), "class": type(model).__name__, "spelled": spelled}))
"""


def test_folder_loads_without_gpthf_and_matches_our_model(
    folders: tuple[str, str], tokenizer_path: Path, tmp_path: Path
) -> None:
    src, hf = folders
    exported = load_export(src)
    c = exported.model_config
    prompts = _prompts(tokenizer_path, c.eos_id)
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _ISOLATED, hf, json.dumps(prompts), str(out)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # AutoTokenizer asks about AutoConfig's remote code; EOF = no
        cwd=tmp_path,  # not the repo: nothing of gpthf on the path but what is blocked
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1].rsplit("[y/N] ", 1)[-1])
    spelled = info.pop("spelled")
    assert info == {"eos_s": c.eos_id, "class": "GPTHFForCausalLM"}
    # One rule for text that spells a special token: text, in the HF folder's tokenizer as in
    # `gpthf generate` (encode_prompt) and in the data pipeline.
    from tokenizers import Tokenizer

    from training.generation.text import encode_prompt

    ours = encode_prompt(
        Tokenizer.from_file(str(Path(src, "tokenizer.json"))),
        "He wrote <|endofsentence|> and <|endofdoc|> on it.",
        eos_id=c.eos_id,
        max_sentence_tokens=10_000,
        close_last_sentence=False,
    )
    assert spelled == ours and not {c.eos_id, c.eod_id, c.pad_id} & set(spelled), spelled
    res = torch.load(out)
    width = res["mask"].shape[1]
    model = exported.model
    with torch.no_grad():
        for b, p in enumerate(prompts):  # each prompt alone, unpadded: our model's logits
            ids = torch.tensor([p])
            ours = model(ids, sentence_ids_for(ids, torch.tensor([len(p)]), c.eos_id))[0]
            theirs = res["logits"][b, width - len(p) :]
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # generate() through transformers = gpthf generate (greedy, EOS-S forcing, EOD stop).
    ref = generate(model, prompts, max_new_tokens=30, mode="kv")
    for b, toks in enumerate(ref.tokens):
        got = res["greedy"][b].tolist()
        assert got[: len(toks)] == toks
        assert all(t == c.pad_id for t in got[len(toks) :])  # stopped at end-of-document
    # Sampling follows the same rules: pad is never sampled before a row ends its document.
    for row in res["sampled"][:, width:].tolist():
        ended = row.index(c.eod_id) if c.eod_id in row else len(row)
        assert c.pad_id not in row[:ended], row


def test_every_generation_mode_matches_gpthf_generate(
    folders: tuple[str, str], tokenizer_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    src, hf = folders
    exported = load_export(src)
    c = exported.model_config
    prompts = _prompts(tokenizer_path, c.eos_id, n=3)
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[c.pad_id] * (width - len(p)) + p for p in prompts])
    mask = (
        torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    ).long()
    modes = ("full", "sentence-cache", "kv") if c.arch == "gpthf" else ("full", "kv")
    ref = generate(exported.model, prompts, max_new_tokens=40, mode="full", stop_at_eod=False)
    for mode in modes:
        model.config.gpthf_generation_mode = mode
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                eos_token_id=None,
            )  # fmt: skip
        assert out[:, width:].tolist() == ref.tokens, mode


def test_round_trip_gives_identical_weights(folders: tuple[str, str], tmp_path: Path) -> None:
    src, hf = folders
    back = tmp_path / "back"
    assert "[import-hf]" in _cli("import-hf", hf, str(back))
    a, b = load_export(src), load_export(str(back))
    assert a.config == b.config
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tokenizer_json == b.tokenizer_json


def test_bad_folders_and_prompts_are_refused(folders: tuple[str, str], tmp_path: Path) -> None:
    src, hf = folders
    raw = json.loads(Path(hf, "config.json").read_text())
    # Not ours: a Llama-style folder.
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFFormatError, match="not written by `gpthf export-hf`"):
        read_hf(str(other))
    # An unknown format version.
    future = tmp_path / "future"
    future.mkdir()
    for f in Path(hf).iterdir():
        (future / f.name).write_bytes(f.read_bytes())
    raw["gpthf_export"]["format"] = "gpthf-hf/9"
    (future / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFFormatError, match="gpthf-hf/9"):
        import_hf(str(future), str(tmp_path / "x"))
    # An export of an unknown version.
    exp = json.loads(Path(src, "config.json").read_text())
    exp["format"] = "gpthf-export/9"
    bad = tmp_path / "bad-export"
    bad.mkdir()
    for f in Path(src).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(exp))
    with pytest.raises(UserError, match="gpthf-export/9"):
        export_hf(str(bad), str(tmp_path / "y"))
    # A prompt whose sentence is longer than the model supports (GPTHF).
    if raw["gpthf"]["arch"] == "gpthf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
        M = raw["gpthf"]["max_sentence_tokens"]
        with pytest.raises(ValueError, match="longer than this GPTHF model supports"):
            model(input_ids=torch.full((1, M + 1), 10))
