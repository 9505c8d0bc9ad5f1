"""gpthf export <-> Hugging Face folder (``gpthf export-hf``, ``gpthf import-hf``).

The folder loads with ``transformers`` alone (no gpthf installed)::

    config.json              GPTHFConfig: the gpthf ModelConfig, auto_map, special token ids
    model.safetensors        fp32 weights under ``model.`` (the tied lm_head is not stored)
    modeling_gpthf.py        self-contained: training/model + the cached decoders + hf_model
    generation_config.json   eos = end-of-document, pad
    tokenizer.json tokenizer_config.json special_tokens_map.json
    README.md                how to load it, and how a prompt marks sentence ends

``modeling_gpthf.py`` is assembled from our own source files at export time (``modeling_source``)
rather than kept as a second copy, so the exported model is the model we test.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.storage import filesystem_for
from pipeline.tokenizer import SPECIAL_TOKENS
from training.export import (
    TIED,
    ExportConfig,
    Exported,
    ExportError,
    load_export,
    model_from_weights,
    write_export,
)
from training.model import ModelConfig

HF_FORMAT = "gpthf-hf/1"
MODELING = "modeling_gpthf.py"
PREFIX = "model."
_SOURCES = (
    "model/pruning.py",
    "model/attention.py",
    "model/transformer.py",
    "generation/eviction.py",
    "generation/decoders.py",
    "generation/pruned_decoders.py",
    "generation/decode.py",
    "hf/hf_model.py",
)


class HFFormatError(ExportError):
    """A folder that is not (this version of) a gpthf Hugging Face export."""


def modeling_source() -> str:
    """``modeling_gpthf.py``: our model, decoders and HF classes as one module.

    Each source file's ``from __future__`` and ``from training...`` imports and ``__all__`` are
    dropped (the names they import are defined earlier in the same file); the rest is kept
    verbatim, in dependency order.
    """
    root = Path(__file__).resolve().parent.parent
    parts = [
        '"""GPTHF / GPT for transformers (trust_remote_code), written by `gpthf export-hf`.\n\n'
        "Generated from gpthf's training/model, training/generation (decoders) and\n"
        'training/hf/hf_model.py; needs torch and transformers only."""\n\n'
        "from __future__ import annotations\n"
    ]
    for rel in _SOURCES:
        text = (root / rel).read_text()
        lines = text.splitlines(keepends=True)
        drop: set[int] = set()
        tree = ast.parse(text)
        for node in tree.body:
            internal = isinstance(node, ast.ImportFrom) and (
                node.module == "__future__" or (node.module or "").split(".")[0] == "training"
            )
            all_ = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            )
            docstring = node is tree.body[0] and isinstance(node, ast.Expr)
            if internal or all_ or docstring:
                assert node.end_lineno is not None
                drop.update(range(node.lineno - 1, node.end_lineno))
        body = "".join(line for i, line in enumerate(lines) if i not in drop).strip("\n")
        parts.append(f"\n\n# {'-' * 88}\n# from gpthf training/{rel}\n\n{body}\n")
    return "".join(parts)


@dataclass(frozen=True)
class HFExportSummary:
    source: str
    out: str
    arch: str
    parameters: int
    files: list[str]


def _hf_config(export: ExportConfig) -> dict[str, Any]:
    m = export.model
    return {
        "model_type": "gpthf",
        "architectures": ["GPTHFForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_gpthf.GPTHFConfig",
            "AutoModelForCausalLM": "modeling_gpthf.GPTHFForCausalLM",
        },
        "gpthf": m.to_dict(),
        "gpthf_generation_mode": "kv",
        # The export's own record minus the model (under "gpthf"), in this folder's format.
        "gpthf_export": {
            **{k: v for k, v in export.to_dict().items() if k not in ("model", "format")},
            "format": HF_FORMAT,
        },
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "eos_token_id": m.eod_id,
        "pad_token_id": m.pad_id,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def _tokenizer_files(m: ModelConfig) -> dict[str, str]:
    eos_s, pad, eod = (SPECIAL_TOKENS[k] for k in ("end_of_sentence", "pad", "end_of_document"))
    special = {"eos_token": eod, "pad_token": pad, "additional_special_tokens": [eos_s]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 1_000_000,
        # One rule everywhere: text that spells a special token is text, as the data pipeline
        # encoded it for training and as `gpthf generate` encodes prompts. Sentence ends are
        # marked by id (the README's example), never by typing the token.
        "split_special_tokens": True,
    }
    return {
        "tokenizer_config.json": json.dumps(config, indent=1),
        "special_tokens_map.json": json.dumps(special, indent=1),
    }


def _readme(export: ExportConfig) -> str:
    m = export.model
    eos_s = SPECIAL_TOKENS["end_of_sentence"]
    return f"""# {m.arch} ({m.n_layers} layers, d_model {m.d_model}), exported by gpthf

Trained {export.step} steps on {export.tokens_seen} tokens (data: `{export.data or "n/a"}`).

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
sentences = ["First sentence.", "Second one is"]  # the last one stays open
ids = []
for k, s in enumerate(sentences):
    ids += tok(s).input_ids + ([{m.eos_id}] if k < len(sentences) - 1 else [])
out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, do_sample=False)
```

**Sentence ends.** The model was trained on text split into sentences, each tokenized alone and
ending with the end-of-sentence token `{eos_s}` (id {m.eos_id}); GPTHF compresses each finished
sentence into one vector, so a prompt must mark its sentence ends the same way, by id (the last
sentence may stay open). Text that spells a special token is text (`split_special_tokens`, as
in training and in `gpthf generate`): typing `{eos_s}` in a prompt does not end a sentence.
gpthf's own splitter (`training.generation.text.encode_prompt`) does all this for you.
Sentences are at most {m.max_sentence_tokens} tokens (end-of-sentence included); generation
forces `{eos_s}` at that length, as `gpthf generate` does. `eos_token` is the end-of-document
token: generation stops there. `config.gpthf_generation_mode` picks the cached decoder
("kv"; GPTHF also "sentence-cache"; "full" re-runs the whole forward).
"""


def export_hf(source: str, out: str, storage: Any = None) -> HFExportSummary:
    """Write the Hugging Face folder of a gpthf export (or of a run folder's export/)."""
    from safetensors.torch import save_file

    exported = load_export(source, storage)
    cfg = exported.config
    state = exported.model.state_dict()
    weights = {PREFIX + k: v.contiguous() for k, v in state.items() if k != TIED}
    files = {
        "config.json": json.dumps(_hf_config(cfg), indent=1, sort_keys=True),
        "generation_config.json": json.dumps(
            {"eos_token_id": cfg.model.eod_id, "pad_token_id": cfg.model.pad_id}, indent=1
        ),
        MODELING: modeling_source(),
        "tokenizer.json": exported.tokenizer_json,
        **_tokenizer_files(cfg.model),
        "README.md": _readme(cfg),
    }
    fs, root = filesystem_for(out, storage)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        fs.makedirs(root, exist_ok=True)
        names = [n for n in sorted(os.listdir(tmp)) if n != "config.json"] + ["config.json"]
        for name in names:  # config last: its presence means the folder is whole
            fs.put_file(os.path.join(tmp, name), f"{root}/{name}")
    return HFExportSummary(
        source=source,
        out=out,
        arch=cfg.model.arch,
        parameters=exported.model.num_parameters(),
        files=names,
    )


def read_hf(folder: str, storage: Any = None) -> Exported:
    """The model, export config and tokenizer of a folder ``export_hf`` wrote (weights checked
    against the config)."""
    from safetensors.torch import load as load_safetensors

    fs, root = filesystem_for(folder, storage)
    try:
        with fs.open(f"{root}/config.json", "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError as exc:
        raise HFFormatError(f"{folder}: no config.json; not a Hugging Face model folder") from exc
    except ValueError as exc:
        raise HFFormatError(f"{folder}/config.json is not JSON ({exc})") from exc
    meta = raw.get("gpthf_export") if isinstance(raw, dict) else None
    if raw.get("model_type") != "gpthf" or not isinstance(meta, dict):
        raise HFFormatError(
            f"{folder} was not written by `gpthf export-hf` (model_type "
            f"{raw.get('model_type')!r}, no gpthf_export record); only gpthf's own folders "
            "import back"
        )
    if meta.get("format") != HF_FORMAT:
        raise HFFormatError(
            f"{folder}: format {meta.get('format')!r}, this version reads {HF_FORMAT!r}"
        )
    try:
        with fs.open(f"{root}/model.safetensors", "rb") as f:
            weights = load_safetensors(f.read())
        with fs.open(f"{root}/tokenizer.json", "rb") as f:
            tokenizer_json = f.read().decode()
    except FileNotFoundError as exc:
        raise HFFormatError(f"{folder}: missing {exc.filename or exc}") from exc
    bad = [k for k in weights if not k.startswith(PREFIX)]
    if bad:
        raise HFFormatError(f"{folder}: weights outside the model ({bad[:3]})")
    config = ExportConfig.from_dict(
        {**{k: v for k, v in meta.items() if k != "format"}, "model": raw["gpthf"]},
        f"{folder}/config.json",
    )
    state = {k[len(PREFIX) :]: v for k, v in weights.items()}
    model = model_from_weights(config.model, state, folder)
    return Exported(model=model, config=config, tokenizer_json=tokenizer_json)


def import_hf(folder: str, out: str, storage: Any = None) -> ExportConfig:
    """A folder ``export_hf`` wrote, back into a gpthf export at ``out`` (identical weights)."""
    exported = read_hf(folder, storage)
    write_export(
        out, exported.model.state_dict(), exported.config, exported.tokenizer_json, storage
    )
    return exported.config
