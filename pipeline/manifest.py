"""The manifest: the commit record of a preprocessing output. Readers trust only it.

Layout of an output ``OUT``::

    OUT/manifest.json           current version (written last: the commit)
    OUT/manifests/v00003.json   every version, for audit and rollback
    OUT/tokenizer.json          the exact tokenizer the shards were made with
    OUT/train/<unit>.parquet    shards, deterministic names
    OUT/heldout/<unit>.parquet
    OUT/dedup/<run>/b0017.parquet  the fingerprint index (``pipeline.dedup_index``), by key range
    OUT/stats.json, OUT/stats.png

``Manifest`` is the typed form every reader uses (preprocessing, training, evaluation,
benchmarks): special ids, tokenizer, packing identity and the shards of each split. Shard paths
are relative to the output and checked when a manifest is read: a path that leaves the output
(``..``, absolute, another scheme) is refused, so a tampered manifest cannot make a job read
files outside the data set.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.blocks import COLUMN_DOCS
from pipeline.config import StorageConfig
from pipeline.errors import UserError
from pipeline.storage import (
    filesystem_for,
    full_uri,
    join,
    protocol_of,
    storage_errors,
    write_bytes_atomic,
)

VERIFY_MODES = ("sha256", "exists")
"""How the shards are checked before a run reads them (``Manifest.verify_data``)."""


@dataclass(frozen=True)
class DataCheck:
    """What ``Manifest.verify_data`` checked."""

    shards: int
    hashed_bytes: int
    seconds: float
    mode: str

    def describe(self) -> str:
        what = (
            f"sha256 of {self.shards} shard(s), {self.hashed_bytes / 1e6:,.1f} MB"
            if self.mode == "sha256"
            else f"{self.shards} shard(s) present"
        )
        return f"data verified against its manifest: tokenizer sha256, {what} ({self.seconds:.1f}s)"


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


FORMAT = "gpthf-blocks/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
TOTAL_KEYS = ("rows", "sentences", "tokens", "bytes", "words", "documents")


class ManifestError(UserError):
    """A manifest that is missing, malformed, unsafe, or does not fit the request."""


class ManifestConflict(Exception):
    """Another run committed this version first (not a user error: the writer rebases)."""

    def __init__(self, output: str, version: int) -> None:
        super().__init__(f"{output}: manifest version {version} was committed by another run")
        self.version = version


@dataclass(frozen=True)
class ShardRef:
    split: str
    path: str
    """Relative to the output root, inside it (checked on read)."""
    rows: int
    sentences: int
    tokens: int
    bytes: int
    sha256: str
    words: int = 0
    documents: int = 0
    added_in_version: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("split")
        return out


INDEX_DIR = "dedup"


@dataclass(frozen=True)
class IndexFileRef:
    """One file of the deduplication index: the fingerprints one run added in one key range."""

    path: str
    """Relative to the output root, under ``dedup/`` (checked on read)."""
    bucket: int
    rows: int
    sha256: str
    added_in_version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_index_path(path: str, where: str) -> str:
    """``path`` if it names a file inside the output's index folder; otherwise a ManifestError."""
    norm = posixpath.normpath(path) if path else ""
    if (
        not path
        or "://" in path
        or "\\" in path
        or norm != path
        or norm.split("/", 1)[0] != INDEX_DIR
        or ".." in norm.split("/")
    ):
        raise ManifestError(
            f"{where}: index path {path!r} is not a relative path inside the output's "
            f"{INDEX_DIR}/ folder; the manifest is damaged or was tampered with. Restore it from "
            "manifests/vNNNNN.json or re-run preprocessing into a new output."
        )
    return path


@dataclass(frozen=True)
class SpecialToken:
    token: str
    id: int


@dataclass(frozen=True)
class TokenizerRef:
    source: str
    """Where the tokenizer was read from when the output was created."""
    path: str
    """Its copy inside the output (relative)."""
    sha256: str
    vocab_size: int


@dataclass(frozen=True)
class InputEntry:
    """One processed input file: what it was, and which shards it produced."""

    uri: str
    size: int
    fingerprint: str
    unit: str
    added_in_version: int
    shards: tuple[str, ...]
    stats: dict[str, Any]
    """Its stage counters (``pipeline.counters.Counters.to_dict``)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = list(self.shards)
        return out


def safe_relative_path(path: str, where: str) -> str:
    """``path`` if it names a file inside the output; otherwise a ManifestError."""
    norm = posixpath.normpath(path) if path else ""
    if (
        not path
        or "://" in path
        or "\\" in path
        or path.startswith("/")
        or norm.startswith("..")
        or norm != path
        or norm.split("/", 1)[0] not in SPLITS
    ):
        raise ManifestError(
            f"{where}: shard path {path!r} is not a relative path inside the output's "
            f"{'/'.join(SPLITS)} folders; the manifest is damaged or was tampered with. Restore it "
            "from manifests/vNNNNN.json or re-run preprocessing into a new output."
        )
    return path


@dataclass(frozen=True)
class Manifest:
    version: int
    tokenizer: TokenizerRef
    special_tokens: dict[str, SpecialToken]
    """Role (end_of_sentence, end_of_document, pad) -> token and id."""
    packing: dict[str, Any]
    """The output's identity: S, M, held-out fraction, seed (changing any is refused)."""
    splits: dict[str, tuple[ShardRef, ...]]
    """Split -> its shards, sorted by path."""
    inputs: tuple[InputEntry, ...] = ()
    created: str = ""
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved preprocessing config of the run that wrote this version (secrets redacted)."""
    config_hash: str = ""
    dedup_index: tuple[IndexFileRef, ...] = ()
    """The fingerprint index's files (committed with the shards they describe)."""
    format: str = FORMAT

    # ---- what consumers need ----------------------------------------------------------------
    @property
    def special_ids(self) -> dict[str, int]:
        return {role: t.id for role, t in self.special_tokens.items()}

    @property
    def eos_id(self) -> int:
        return self.special_tokens["end_of_sentence"].id

    @property
    def eod_id(self) -> int:
        return self.special_tokens["end_of_document"].id

    @property
    def pad_id(self) -> int:
        return self.special_tokens["pad"].id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_sentence_tokens(self) -> int:
        return int(self.packing["max_sentence_tokens"])

    @property
    def sentences_per_block(self) -> int:
        return int(self.packing["sentences_per_block"])

    def has_split(self, split: str) -> bool:
        return bool(self.splits.get(split))

    def shards(self, split: str) -> list[ShardRef]:
        """The shards of a split, in a stable order (by path)."""
        if split not in self.splits:
            raise ManifestError(f"split {split!r} not in manifest (has {sorted(self.splits)})")
        return list(self.splits[split])

    def shard_uris(self, output: str, split: str) -> list[str]:
        return [join(output.rstrip("/"), s.path) for s in self.shards(split)]

    def totals(self, split: str) -> dict[str, int]:
        return split_totals(self.shards(split))

    def verify_data(
        self,
        output: str,
        splits: Sequence[str],
        storage: StorageConfig | None = None,
        mode: str = "sha256",
        threads: int = 8,
    ) -> DataCheck:
        """The data folder as this manifest describes it, before anything reads it.

        Always: the tokenizer file's sha256 (a swapped ``tokenizer.json`` would otherwise train,
        evaluate and export silently with another vocabulary than the shards'), and that every
        shard of ``splits`` exists. ``mode="sha256"`` also hashes every shard against the
        manifest (read in full, ``threads`` at a time: about the cost of reading the data once;
        ``"exists"`` skips that, for a corpus too large to hash at every start). Raises a
        ManifestError naming every file that does not match, and what to do.
        """
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
        fs, root = filesystem_for(output, storage)
        problems = []
        tok = join(root, self.tokenizer.path)
        with storage_errors(output, "read the tokenizer of"):
            tok_sha = _sha256(fs, tok) if fs.exists(tok) else None
        if tok_sha is None:
            problems.append(f"{self.tokenizer.path}: missing")
        elif tok_sha != self.tokenizer.sha256:
            problems.append(
                f"{self.tokenizer.path}: sha256 {tok_sha[:12]}... but the shards were made with "
                f"{self.tokenizer.sha256[:12]}... (the file was replaced: put back the tokenizer "
                "the shards were made with, or preprocess again into a new --output)"
            )
        refs = [r for split in splits if self.has_split(split) for r in self.shards(split)]

        def check(ref: ShardRef) -> tuple[str | None, int]:
            path = join(root, ref.path)
            if not fs.exists(path):
                return f"{ref.path}: missing", 0
            if mode == "exists":
                return None, 0
            digest = _sha256(fs, path)
            if digest != ref.sha256:
                return (
                    f"{ref.path}: sha256 {digest[:12]}... differs from the manifest's "
                    f"{ref.sha256[:12]}... (damaged or changed since it was written)"
                ), 0
            return None, int(fs.size(path) or 0)

        t0 = time.perf_counter()
        with storage_errors(output, "check the shards of"), ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(check, refs))
        problems += [p for p, _ in results if p]
        if problems:
            missing = sum("missing" in p for p in problems)
            raise ManifestError(
                f"{output} does not match its {MANIFEST} ({len(problems)} problem(s)): "
                + "; ".join(problems[:8])
                + ("; ..." if len(problems) > 8 else "")
                + ". Restore the files from where they were copied from, or preprocess again "
                "into a new --output"
                + (
                    " (a missing shard is never skipped: the run would see other data)"
                    if missing
                    else ""
                )
            )
        return DataCheck(
            shards=len(refs),
            hashed_bytes=sum(n for _, n in results),
            seconds=time.perf_counter() - t0,
            mode=mode,
        )

    def check_compatible(
        self, identity: dict[str, Any], tokenizer_sha256: str, output: str
    ) -> None:
        """Refuse to add shards built with other settings to this output."""
        keys = sorted(set(identity) | set(self.packing))
        problems = [
            f"{key}: existing {self.packing.get(key)!r}, requested {identity.get(key)!r}"
            for key in keys
            if self.packing.get(key) != identity.get(key)
        ]
        if self.packing.get("dedup") != identity.get("dedup"):
            problems.append(
                "(the deduplication index holds the fingerprints of the documents already in "
                "the output, made with its dedup settings; pass those (`--dedup "
                f"{(self.packing.get('dedup') or {}).get('mode', 'none')}`) or start a new "
                "output)"
            )
        if self.tokenizer.sha256 != tokenizer_sha256:
            problems.append(
                f"tokenizer sha256: existing {self.tokenizer.sha256[:12]}..., requested "
                f"{tokenizer_sha256[:12]}..."
            )
        if problems:
            raise ManifestError(
                f"{output} was built with other settings ({'; '.join(problems)}). Mixing them "
                "would give shards that do not belong together: write to a new --output, or use "
                f"the existing settings (the tokenizer is at {output.rstrip('/')}/tokenizer.json)."
            )

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "run_id": self.run_id,
            "config": self.config,
            "config_hash": self.config_hash,
            "tokenizer": asdict(self.tokenizer),
            "special_tokens": {k: asdict(v) for k, v in self.special_tokens.items()},
            "packing": self.packing,
            "block_schema": COLUMN_DOCS,
            "inputs": [e.to_dict() for e in self.inputs],
            "dedup_index": [r.to_dict() for r in self.dedup_index],
            "splits": {
                name: {"shards": [s.to_dict() for s in refs], **split_totals(list(refs))}
                for name, refs in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where} has format {d.get('format')!r}, expected {FORMAT!r}")
        try:
            splits = {
                name: tuple(
                    sorted(
                        (
                            ShardRef(
                                split=name,
                                path=safe_relative_path(str(s["path"]), where),
                                rows=int(s["rows"]),
                                sentences=int(s["sentences"]),
                                tokens=int(s["tokens"]),
                                bytes=int(s["bytes"]),
                                sha256=str(s["sha256"]),
                                words=int(s.get("words", 0)),
                                documents=int(s.get("documents", 0)),
                                added_in_version=int(s.get("added_in_version", 0)),
                            )
                            for s in body["shards"]
                        ),
                        key=lambda r: r.path,
                    )
                )
                for name, body in d["splits"].items()
            }
            return cls(
                version=int(d["version"]),
                tokenizer=TokenizerRef(**d["tokenizer"]),
                special_tokens={k: SpecialToken(**v) for k, v in d["special_tokens"].items()},
                packing=dict(d["packing"]),
                splits=splits,
                inputs=tuple(
                    InputEntry(**{**e, "shards": tuple(e.get("shards", ()))})
                    for e in d.get("inputs", [])
                ),
                created=str(d.get("created", "")),
                run_id=str(d.get("run_id", "")),
                config=dict(d.get("config", {})),
                config_hash=str(d.get("config_hash", "")),
                dedup_index=tuple(
                    IndexFileRef(
                        path=safe_index_path(str(r["path"]), where),
                        bucket=int(r["bucket"]),
                        rows=int(r["rows"]),
                        sha256=str(r["sha256"]),
                        added_in_version=int(r.get("added_in_version", 0)),
                    )
                    for r in d.get("dedup_index", [])
                ),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(
                f"{where} is not a valid manifest ({type(exc).__name__}: {exc}); restore it from "
                "manifests/vNNNNN.json or re-run preprocessing into a new output"
            ) from exc

    @classmethod
    def read(cls, output: str, storage: StorageConfig | None = None) -> Manifest | None:
        """The committed manifest of ``output``, or None if nothing was committed there."""
        fs, root = filesystem_for(output, storage)
        path = join(root, MANIFEST)
        with storage_errors(output, "read the manifest of"):
            if not fs.exists(path):
                return None
            with fs.open(path, "rb") as f:
                raw = f.read()
        where = f"{output.rstrip('/')}/{MANIFEST}"
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, where)

    @classmethod
    def require(cls, output: str, storage: StorageConfig | None = None) -> Manifest:
        """Like ``read``, but a missing manifest is an error that says what to do."""
        manifest = cls.read(output, storage)
        if manifest is None:
            raise ManifestError(
                f"{output} has no {MANIFEST}: point at the output of `gpthf preprocess` "
                "(readers trust only the manifest, never a listing)"
            )
        return manifest

    def commit(self, output: str, storage: StorageConfig | None = None) -> None:
        """Commit this version: one writer wins each version number.

        ``manifests/vNNNNN.json`` is created exclusively (a hard link on local disks, a PUT with
        ``If-None-Match: *`` on S3): a run that finds its version taken gets ``ManifestConflict``
        and rebases onto the winner instead of overwriting it. ``manifest.json`` is then pointed
        at the newest committed version; a writer that finds a newer version after writing it
        re-points it, so concurrent commits converge on the newest, never an older one.
        """
        fs, root = filesystem_for(output, storage)
        data = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()
        with storage_errors(output, "write the manifest of"):
            if not create_exclusive(fs, _version_path(root, self.version), data):
                raise ManifestConflict(output, self.version)
            write_bytes_atomic(fs, join(root, MANIFEST), data)
            version = self.version
            while fs.exists(_version_path(root, version + 1)):
                version += 1
            if version != self.version:
                with fs.open(_version_path(root, version), "rb") as f:
                    write_bytes_atomic(fs, join(root, MANIFEST), f.read())


def split_totals(refs: list[ShardRef]) -> dict[str, int]:
    return {k: sum(int(getattr(s, k)) for s in refs) for k in TOTAL_KEYS}


def read_manifest(output: str, storage: StorageConfig | None = None) -> Manifest | None:
    return Manifest.read(output, storage)


def _version_path(root: str, version: int) -> str:
    return join(root, "manifests", f"v{version:05d}.json")


def create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if nothing is there; False if something already was.

    Readers never see a partial file: locally the content is written aside and hard-linked into
    place (``link`` fails if the name exists); on S3 a single conditional PUT does both.
    """
    if protocol_of(full_uri(fs, path)) == "file":
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        # s3fs reports a failed If-None-Match as PreconditionFailed (EINVAL) on some servers.
        if exc.errno == errno.EINVAL and "condition" in str(exc).lower():
            return False
        raise
