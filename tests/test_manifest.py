"""The typed manifest: round trip, derived ids, and shard paths that must stay inside the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.manifest import MANIFEST, Manifest, ManifestError


def _raw(paths: list[str]) -> dict:
    return {
        "format": "gpthf-blocks/1",
        "version": 3,
        "tokenizer": {"source": "t.json", "path": "tokenizer.json", "sha256": "ab" * 32, "vocab_size": 300},
        "special_tokens": {
            "end_of_sentence": {"token": "<|endofsentence|>", "id": 7},
            "end_of_document": {"token": "<|endofdoc|>", "id": 8},
            "pad": {"token": "<|pad|>", "id": 9},
        },
        "packing": {"sentences_per_block": 4, "max_sentence_tokens": 16, "heldout_fraction": 0.1, "seed": 0},
        "inputs": [],
        "splits": {
            "train": {
                "shards": [
                    {"path": p, "rows": 2, "sentences": 8, "tokens": 40, "bytes": 100, "sha256": "0"}
                    for p in paths
                ]
            }
        },
    }  # fmt: skip


def test_round_trip_and_derived_fields(tmp_path: Path) -> None:
    m = Manifest.from_dict(_raw(["train/b.parquet", "train/a.parquet"]))
    assert (m.eos_id, m.eod_id, m.pad_id, m.vocab_size) == (7, 8, 9, 300)
    assert m.max_sentence_tokens == 16 and m.sentences_per_block == 4
    assert [s.path for s in m.shards("train")] == ["train/a.parquet", "train/b.parquet"]
    assert m.totals("train")["tokens"] == 80
    m.commit(str(tmp_path))
    again = Manifest.require(str(tmp_path))
    assert again == m
    assert (tmp_path / "manifests" / "v00003.json").read_bytes() == (
        tmp_path / MANIFEST
    ).read_bytes()
    with pytest.raises(ManifestError, match="split 'heldout' not in manifest"):
        m.shards("heldout")


@pytest.mark.parametrize(
    "path",
    [
        "../../../somewhere/x.parquet",
        "train/../../x.parquet",
        "/etc/passwd",
        "s3://other-bucket/x.parquet",
        "train/./x.parquet",
        "elsewhere/x.parquet",
        "",
    ],
)
def test_a_shard_path_outside_the_output_is_refused_on_read(tmp_path: Path, path: str) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(_raw(["train/ok.parquet", path])))
    with pytest.raises(ManifestError, match="not a relative path inside the output"):
        Manifest.read(str(tmp_path))


def test_a_malformed_manifest_names_itself(tmp_path: Path) -> None:
    raw = _raw(["train/a.parquet"])
    del raw["tokenizer"]
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"manifest\.json is not a valid manifest"):
        Manifest.read(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(str(tmp_path))
    with pytest.raises(ManifestError, match=r"has no manifest\.json"):
        Manifest.require(str(tmp_path / "empty"))
