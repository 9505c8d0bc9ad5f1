"""The manifest: the commit record of a preprocessing output. Readers trust only it.

Layout of an output ``OUT``::

    OUT/manifest.json           current version (written last: the commit)
    OUT/manifests/v00003.json   every version, for audit and rollback
    OUT/tokenizer.json          the exact tokenizer the shards were made with
    OUT/train/<unit>.parquet    shards, deterministic names
    OUT/heldout/<unit>.parquet
    OUT/stats.json, OUT/stats.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import StorageConfig
from pipeline.storage import filesystem_for, join, storage_errors, write_bytes_atomic

FORMAT = "gpthf-blocks/1"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ShardRef:
    split: str
    path: str
    """Relative to the output root."""
    rows: int
    sentences: int
    tokens: int
    bytes: int
    sha256: str


def read_manifest(output: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    fs, root = filesystem_for(output, storage)
    path = join(root, MANIFEST)
    with storage_errors(output, "read the manifest of"):
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            raw = f.read()
    try:
        manifest: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{output}/{MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ManifestError(
            f"{output}/{MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return manifest


def write_manifest(
    output: str, manifest: dict[str, Any], storage: StorageConfig | None = None
) -> None:
    """Write the versioned copy, then ``manifest.json`` (the commit point)."""
    fs, root = filesystem_for(output, storage)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with storage_errors(output, "write the manifest of"):
        write_bytes_atomic(fs, join(root, "manifests", f"v{manifest['version']:05d}.json"), data)
        write_bytes_atomic(fs, join(root, MANIFEST), data)


def shards(manifest: dict[str, Any], split: str) -> list[ShardRef]:
    """The shards of a split, in a stable order (by path)."""
    if split not in manifest["splits"]:
        raise ManifestError(f"split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    return [
        ShardRef(
            split=split,
            path=s["path"],
            rows=s["rows"],
            sentences=s["sentences"],
            tokens=s["tokens"],
            bytes=s["bytes"],
            sha256=s["sha256"],
        )
        for s in sorted(manifest["splits"][split]["shards"], key=lambda s: s["path"])
    ]


def shard_uris(output: str, manifest: dict[str, Any], split: str) -> list[str]:
    return [join(output.rstrip("/"), s.path) for s in shards(manifest, split)]


def check_compatible(
    previous: dict[str, Any], identity: dict[str, Any], tokenizer_sha256: str, output: str
) -> None:
    """Refuse to add shards built with other settings to an existing output."""
    problems = []
    for key, value in identity.items():
        if previous["packing"].get(key) != value:
            problems.append(
                f"{key}: existing {previous['packing'].get(key)!r}, requested {value!r}"
            )
    if previous["tokenizer"]["sha256"] != tokenizer_sha256:
        problems.append(
            f"tokenizer sha256: existing {previous['tokenizer']['sha256'][:12]}..., requested "
            f"{tokenizer_sha256[:12]}..."
        )
    if problems:
        raise ManifestError(
            f"{output} was built with other settings ({'; '.join(problems)}). Mixing them would "
            "give shards that do not belong together: write to a new --output, or use the "
            f"existing settings (the tokenizer is at {output.rstrip('/')}/tokenizer.json)."
        )


def split_totals(shard_list: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("rows", "sentences", "tokens", "bytes", "words", "documents")
    return {k: sum(int(s.get(k, 0)) for s in shard_list) for k in keys}
