"""Filesystems for local paths and fsspec URLs (s3:// and friends), with errors that say what to do."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import logging
import os
import posixpath
import random
import shutil
import time
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
_log = logging.getLogger(__name__)


class StorageError(UserError):
    """Object storage or a path cannot be used; the message names it and the fix."""


class StorageUnavailable(OSError):
    """A storage request kept failing transiently until the retry policy gave up.

    An OSError, so best-effort clean-up code that tolerates OSError still does; readers must
    re-raise it (:func:`is_transient`), never count it as a bad input file.
    """


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


# ------------------------------------------------------------------ retries of transient faults
#
# One retry loop, ours, around every S3 request (``_call_s3``, the choke point of s3fs through
# which every list, HEAD, GET, PUT, copy and delete goes), so the preprocessing unit's reads and
# shard uploads, the commit (moves, stats, manifest) and every other user of filesystem_for get
# the same policy from StorageConfig. The client's own retry layers are reduced to one attempt
# per request: botocore's (``total_max_attempts=1``) and s3fs's per-call loop (replaced). They
# multiply otherwise: s3fs retries a read 5 x 5 times around botocore's 5 attempts, which is why
# a dead endpoint used to take ~2 minutes per file to be reported. s3fs keeps one extra try of
# a range read whose *body* broke mid-stream (``retries = 2`` below); that re-request goes
# through our loop again, so a read can take at most twice the budget, and only then.

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",
        "InternalError",
        "ServiceUnavailable",
    }
)
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# Class names (anywhere in the MRO) of transient network failures in botocore, aiohttp and
# fsspec, matched by name so this module does not import them. SSL errors are excluded: a bad
# certificate does not heal by waiting.
_TRANSIENT_CLASSES = frozenset(
    {
        "ConnectionError",  # builtin (resets, refusals) and botocore's (EndpointConnectionError, ConnectTimeoutError)
        "TimeoutError",
        "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
        "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientConnectorError, ClientOSError
        "ClientPayloadError",
        "FSTimeoutError",
        "IncompleteRead",
        "ResponseParserError",  # throttling responses with invalid XML (s3fs issue 484)
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient storage faults (see StorageConfig)."""

    retries: int = 5
    base_s: float = 0.5
    budget_s: float = 30.0

    @classmethod
    def of(cls, storage: StorageConfig) -> RetryPolicy:
        return cls(storage.retries, storage.retry_base_s, storage.retry_budget_s)

    def delay(self, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``; None: give up.

        ``base_s * 2**attempt`` times a jitter in [0.5, 1) (unseeded: it spreads the workers'
        retries apart and never touches the data). Gives up after ``retries`` retries, or when
        the wait would take the request past ``budget_s`` since its first attempt (an attempt
        in flight can overrun the budget by one client timeout).
        """
        if attempt >= self.retries:
            return None
        wait = self.base_s * 2**attempt * (0.5 + random.random() / 2)
        return None if elapsed + wait > self.budget_s else wait


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, connection resets/refusals and timeouts (in the exception's chain)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, StorageUnavailable):
            return True
        names = {k.__name__ for k in type(cur).__mro__}
        if "SSLError" not in names and names & _TRANSIENT_CLASSES:
            return True
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
                return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


_GAVE_UP: contextvars.ContextVar[StorageUnavailable | None] = contextvars.ContextVar(
    "gpthf_storage_gave_up", default=None
)
"""Set when a request exhausted the policy, for the rest of that one filesystem call (fsspec
runs each call as its own asyncio task, with a fresh context). Later requests of the same call
fail at once, and probes that swallow errors (s3fs's ``exists`` on a bucket, fsspec's
``isfile``) re-raise it instead of answering "does not exist" about a dead endpoint."""


def _target(kwargs: dict[str, Any]) -> str:
    bucket, key = kwargs.get("Bucket"), kwargs.get("Key") or kwargs.get("Prefix")
    if not bucket:
        return "(no bucket)"
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


@functools.cache
def _retrying_s3_class() -> type:
    """s3fs.S3FileSystem with our retry loop in ``_call_s3`` (built lazily: s3fs and botocore
    are imported only when an s3:// location is used)."""
    import s3fs
    from s3fs.errors import translate_boto_error

    class RetryingS3FileSystem(s3fs.S3FileSystem):
        retries = 2  # s3fs's outer loop: only around range reads whose body broke mid-stream

        def __init__(self, *args: Any, retry_policy: RetryPolicy | None = None, **kwargs: Any):
            self.retry_policy = retry_policy or RetryPolicy()
            super().__init__(*args, **kwargs)

        def __reduce__(self) -> Any:
            return _make_retrying_s3, (self.storage_args, self.storage_options)

        async def _exists(self, path: str, **kwargs: Any) -> bool:
            return await self._no_false_negative(super()._exists(path, **kwargs))

        async def _isfile(self, path: str) -> bool:
            return await self._no_false_negative(super()._isfile(path))

        async def _no_false_negative(self, probe: Any) -> bool:
            token = _GAVE_UP.set(None)
            try:
                found = bool(await probe)
                gave_up = _GAVE_UP.get()
            finally:
                _GAVE_UP.reset(token)
            if not found and gave_up is not None:
                raise gave_up
            return found

        async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
            # s3fs 2026.9's _call_s3, with our loop in place of its _error_wrapper.
            await self.set_session()
            s3 = await self.get_s3(kwargs.get("Bucket"))
            call = getattr(s3, method)
            call_kwargs = self._get_s3_method_kwargs(call, *akwarglist, **kwargs)
            policy: RetryPolicy = self.retry_policy
            gave_up = _GAVE_UP.get()
            if gave_up is not None:
                raise gave_up  # this call already waited out the budget once
            start = time.monotonic()
            attempt = 0
            while True:
                try:
                    return await call(**call_kwargs)
                except Exception as exc:
                    if not is_transient(exc):
                        raise translate_boto_error(exc) from exc
                    elapsed = time.monotonic() - start
                    wait = policy.delay(attempt, elapsed)
                    what = f"{method} {_target(kwargs)}"
                    if wait is None:
                        err = StorageUnavailable(
                            f"{what} at {self.client_kwargs.get('endpoint_url') or 'AWS'} still "
                            f"failing after {attempt + 1} attempt(s) over {elapsed:.1f} s "
                            f"(storage.retries={policy.retries}, "
                            f"storage.retry_budget_s={policy.budget_s:g}): {_describe(exc)}"
                        )
                        _GAVE_UP.set(err)
                        raise err from exc
                    _log.warning(
                        "storage: %s: %s; retry %d/%d in %.2f s",
                        what,
                        _describe(exc),
                        attempt + 1,
                        policy.retries,
                        wait,
                    )
                    await asyncio.sleep(wait)
                    attempt += 1

    return RetryingS3FileSystem


def _make_retrying_s3(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _retrying_s3_class()(*args, **kwargs)


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[Any, str]:
    """Return ``(fs, path)`` for a URI; path is what the filesystem's own methods take.

    On s3:// every request is retried by ``storage``'s retry policy (see RetryPolicy).
    """
    storage = storage or StorageConfig()
    proto = protocol_of(uri)
    if proto in ("s3", "s3a"):
        kwargs: dict[str, Any] = {
            "use_listings_cache": False,
            "skip_instance_cache": True,
            "retry_policy": RetryPolicy.of(storage),
            # One attempt per request inside botocore: the retries are ours.
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}},
        }
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
        fs = _retrying_s3_class()(**kwargs)
    else:
        fs = fsspec.filesystem(proto)
    path = fs._strip_protocol(uri)
    if proto == "file":
        path = os.path.abspath(path)
    return fs, path


def absolute_uri(uri: str) -> str:
    """A relative local path made absolute, for URIs that other processes open: Ray Train
    workers run in their own directory, where a relative path names nothing. Other URIs (and
    ``file://`` ones, absolute by definition) are returned unchanged."""
    if not uri or split_protocol(uri)[0] is not None:
        return uri
    return os.path.abspath(uri)


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
    except StorageUnavailable as exc:
        raise StorageError(
            f"cannot {action} {uri}: {exc}. The storage service is down, unreachable or "
            "overloaded: check that it runs and answers at that endpoint (or raise "
            "storage.retry_budget_s), then re-run the same command."
        ) from exc
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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(
                f"cannot {action} {uri}: no space left on that disk ({_free_space(uri)}). "
                "Free space there, or choose another location, and run the command again"
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


def _free_space(uri: str) -> str:
    """Free space of the local disk holding ``uri`` (or its nearest existing parent)."""
    if protocol_of(uri) != "file":
        return "the server's quota or disk"
    path = os.path.abspath(split_protocol(uri)[1])
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path or "/")
    except OSError:
        return "free space unknown"
    return f"{_bytes(usage.free)} free of {_bytes(usage.total)}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


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
        try:
            with fs.open(probe, "wb") as f:
                f.write(b"ok")
        finally:  # also when the write fails (a full disk): leave nothing behind
            with contextlib.suppress(OSError):
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
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, say: the old file stands, no half copy beside it
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        # A single PUT is atomic on S3-protocol stores.
        fs.pipe_file(path, data)
