"""Filesystems for local paths and fsspec URLs (s3:// and friends), with errors that say what to do."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import split_protocol

from pipeline.config import StorageConfig
from pipeline.errors import UserError

# Spark/Hadoop convention: names starting with these are bookkeeping, not data.
_HIDDEN_PREFIXES = (".", "_")
_GLOB_CHARS = "*?["


class StorageError(UserError):
    """Object storage or a path cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    """Full URL (``s3://bucket/key``) or absolute local path."""
    size: int
    fingerprint: str
    """``etag:...`` on object stores, ``mtime:...`` on local disks: changes when the file does."""


def protocol_of(uri: str) -> str:
    proto = split_protocol(uri)[0]
    return "file" if proto in (None, "file", "local") else proto


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[Any, str]:
    """Return ``(fs, path)`` for a URI; path is what the filesystem's own methods take."""
    storage = storage or StorageConfig()
    proto = protocol_of(uri)
    if proto in ("s3", "s3a"):
        kwargs: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = storage.region or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        if storage.key:
            kwargs["key"] = storage.key
        if storage.secret:
            kwargs["secret"] = storage.secret
        fs = fsspec.filesystem("s3", **kwargs)
    else:
        fs = fsspec.filesystem(proto)
    path = fs._strip_protocol(uri)
    if proto == "file":
        path = os.path.abspath(path)
    return fs, path


def full_uri(fs: Any, path: str) -> str:
    """Inverse of :func:`filesystem_for`: a URI other processes can open."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Turn low-level filesystem errors into one StorageError naming the location and the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        msg = str(exc)
        if protocol_of(uri) != "file" and ("NoSuchBucket" in msg or "bucket" in msg.lower()):
            bucket = split_protocol(uri)[1].split("/", 1)[0]
            raise StorageError(
                f"cannot {action} {uri}: bucket {bucket!r} does not exist at this endpoint "
                f"({_endpoint()}). Create it or correct the URL."
            ) from exc
        raise StorageError(f"cannot {action} {uri}: not found ({msg})") from exc
    except PermissionError as exc:
        raise StorageError(
            f"cannot {action} {uri}: access denied ({exc}). Check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or storage.key / storage.secret in the "
            "config) and the bucket policy."
        ) from exc
    except OSError as exc:
        text = str(exc)
        if any(s in text for s in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")):
            raise StorageError(
                f"cannot {action} {uri}: the storage server rejected the credentials ({text}). "
                "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or storage.key / storage.secret)."
            ) from exc
        raise StorageError(f"cannot {action} {uri}: {_describe(exc)}") from exc
    except Exception as exc:
        name = type(exc).__name__
        if "EndpointConnectionError" in name or "ConnectError" in name or "ClientConnector" in name:
            raise StorageError(
                f"cannot {action} {uri}: storage endpoint {_endpoint()} is unreachable ({exc}). "
                "Check AWS_ENDPOINT_URL / storage.endpoint_url and that the server is running."
            ) from exc
        if "NoCredentials" in name:
            raise StorageError(
                f"cannot {action} {uri}: no credentials found. Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or storage.key / storage.secret in the config)."
            ) from exc
        raise


def _endpoint(storage: StorageConfig | None = None) -> str:
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")


def _is_hidden(path: str) -> bool:
    return any(part.startswith(_HIDDEN_PREFIXES) for part in path.split("/") if part)


def _fingerprint(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "ETAG"):
        if info.get(key):
            return "etag:" + str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            value = info[key]
            if hasattr(value, "timestamp"):
                value = value.timestamp()
            return f"mtime:{value}"
    return "size-only"


def expand_inputs(paths: list[str], storage: StorageConfig | None = None) -> list[InputFile]:
    """Resolve files, prefixes and globs into a sorted, de-duplicated list of input files.

    Raises StorageError before any work is scheduled when a location is missing, unreadable,
    or the whole set is empty.
    """
    found: dict[str, InputFile] = {}
    for spec in paths:
        fs, path = filesystem_for(spec, storage)
        with storage_errors(spec, "list"):
            if any(c in path for c in _GLOB_CHARS):
                matches = fs.glob(path, detail=True)
                infos = [i for i in matches.values() if i.get("type") == "file"]
                if not infos:
                    raise StorageError(f"input {spec!r} matches no files")
            elif fs.isdir(path):
                infos = list(fs.find(path, detail=True).values())
            elif fs.isfile(path):
                infos = [fs.info(path)]
            else:
                if protocol_of(spec) != "file":
                    bucket = path.split("/", 1)[0]
                    if not fs.exists(bucket):
                        raise StorageError(
                            f"input {spec!r}: bucket {bucket!r} does not exist (or is not "
                            "visible with these credentials). Create it or correct the URL."
                        )
                raise StorageError(f"input {spec!r} does not exist")
        for info in infos:
            name = info["name"]
            rel = name[len(path) :] if name.startswith(path) else posixpath.basename(name)
            if info.get("type") != "file" or name.endswith("/") or _is_hidden(rel):
                continue
            uri = full_uri(fs, name)
            found[uri] = InputFile(
                uri=uri, size=int(info.get("size") or 0), fingerprint=_fingerprint(info)
            )
    if not found:
        raise StorageError(f"no input files found under {paths}")
    return [found[k] for k in sorted(found)]


def check_writable(uri: str, storage: StorageConfig | None = None) -> None:
    """Probe an output location with a tiny write, so a bad bucket or secret fails before work."""
    fs, root = filesystem_for(uri, storage)
    probe = join(root, "_staging", f".probe-{os.getpid()}")
    with storage_errors(uri, "write to"):
        if protocol_of(uri) == "file":
            fs.makedirs(posixpath.dirname(probe), exist_ok=True)
        else:
            # Some servers create a bucket on first write; a missing bucket is a mistake here.
            bucket = root.split("/", 1)[0]
            try:
                fs.ls(bucket, detail=False)
            except FileNotFoundError as exc:
                raise StorageError(
                    f"cannot write to {uri}: bucket {bucket!r} does not exist at {_endpoint()}. "
                    "Create it first or correct the URL."
                ) from exc
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem_for(uri, storage)
    with storage_errors(uri, "read"), fs.open(path, "rb") as f:
        data: bytes = f.read()
    return data


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    if protocol_of(full_uri(fs, path)) == "file":
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # A single PUT is atomic on S3-protocol stores.
        fs.pipe_file(path, data)
