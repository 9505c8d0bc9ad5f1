"""Storage faults: transient ones are retried with backoff under the policy in StorageConfig; an
outage fails the run fast, naming the object, commits nothing, and the re-run after the storage
is back gives exactly the output of an uninterrupted run. All against a real SeaweedFS server."""

from __future__ import annotations

import errno
import json
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import s3fs

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig, StorageConfig
from pipeline.manifest import read_manifest
from pipeline.preprocess import run_preprocess
from pipeline.storage import (
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    filesystem_for,
    is_transient,
    storage_errors,
)
from tests.conftest import make_document
from tests.reliability._weed import FaultProxy, RestartableWeed, iter_objects

pytestmark = pytest.mark.s3


def _client(endpoint: str, key: str, secret: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        key=key,
        secret=secret,
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


# ----------------------------------------------------------------- classification and policy


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_what_counts_as_transient() -> None:
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError, SSLError

    transient = [
        _client_error("SlowDown", 503),
        _client_error("Throttling", 400),
        _client_error("InternalError", 500),
        _client_error("Whatever", 502),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        aiohttp.ServerDisconnectedError(),
        StorageUnavailable("gave up"),
    ]
    wrapped = OSError(errno.EBUSY, "SlowDown")  # what s3fs's translation makes of it
    wrapped.__cause__ = _client_error("SlowDown", 503)
    transient.append(wrapped)
    permanent = [
        _client_error("NoSuchKey", 404),
        _client_error("AccessDenied", 403),
        _client_error("SignatureDoesNotMatch", 403),
        SSLError(endpoint_url="http://x", error="bad certificate"),
        FileNotFoundError("gone"),
        EOFError("truncated gzip"),
        ValueError("bad"),
        OSError("Not a gzipped file"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retry_policy_backoff_and_budget() -> None:
    p = RetryPolicy(retries=4, base_s=0.5, budget_s=10.0)
    for attempt in range(4):
        wait = p.delay(attempt, elapsed=0.0)
        assert wait is not None and 0.5 * 0.5 * 2**attempt <= wait < 0.5 * 2**attempt
    assert p.delay(4, elapsed=0.0) is None  # retries used up
    assert p.delay(3, elapsed=9.0) is None  # the wait (>= 2 s) would pass the budget
    assert RetryPolicy.of(StorageConfig()) == RetryPolicy(5, 0.5, 30.0)


def test_transient_faults_are_retried_and_exhaustion_names_the_object(
    s3_server: Any,
) -> None:
    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), [])
    try:

        def storage(**kw: Any) -> StorageConfig:
            return StorageConfig(
                endpoint_url=proxy.endpoint, key=s3_server.key, secret=s3_server.secret, **kw
            )

        uri = f"s3://corpus/faults-{random.randrange(1 << 30)}/a.txt"
        # A PUT and a GET through throttling, a reset connection and a 500.
        proxy.faults = ["slowdown", "reset", "internal"]
        fs, path = filesystem_for(uri, storage(retry_base_s=0.05))
        fs.pipe_file(path, b"hello")
        proxy.faults = ["internal", "slowdown"]
        fs, path = filesystem_for(uri, storage(retry_base_s=0.05))
        assert fs.cat_file(path) == b"hello"
        assert proxy.seen[:3] == ["slowdown", "reset", "internal"]
        assert "internal" in proxy.seen[3:] and "slowdown" in proxy.seen[3:]

        # Throttled for good: the policy gives up after its retries, naming the object.
        proxy.faults = ["slowdown"] * 50
        fs, path = filesystem_for(uri, storage(retries=3, retry_base_s=0.05))
        start = time.monotonic()
        with pytest.raises(StorageError) as err, storage_errors(uri, "read"):
            fs.cat_file(path)
        took = time.monotonic() - start
        msg = str(err.value)
        assert f"cannot read {uri}" in msg and "still failing after 4 attempt(s)" in msg
        assert "storage.retries=3" in msg and ("SlowDown" in msg or "503" in msg)
        assert took < 0.05 * (1 + 2 + 4) + 5.0  # backoff sum + connection set-up

        # Not transient: no retry at all.
        proxy.faults = []
        fs, path = filesystem_for(uri + ".missing", storage(retry_base_s=5.0))
        start = time.monotonic()
        with pytest.raises(FileNotFoundError):
            fs.cat_file(path)
        assert time.monotonic() - start < 4.0
    finally:
        proxy.close()


# ------------------------------------------------------------------------- outage mid-run

N_FILES = 12
OUTAGE_POLICY = {"retries": 4, "retry_base_s": 0.25, "retry_budget_s": 4.0}
"""Worst-case backoff 0.25 + 0.5 + 1 + 2 = 3.75 s <= the 4 s budget."""
FAIL_MARGIN_S = 12.0
"""On top of the budget: the file a task is in the middle of when the server dies (it meets
the outage at its next request), Ray cancelling the other tasks, and a loaded 2-core machine."""


def run_outage_scenario(
    tmp: Path, tokenizer: Path, storage_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Clean run; run killed mid-way (server SIGKILLed by PID); restart; re-run. Returns the
    timings, the error and both manifests (also used to measure the code before the fix)."""
    server = RestartableWeed(tmp / "weed", buckets=["corpus", "shards"])
    server.start()
    try:
        fs = _client(server.endpoint, server.key, server.secret)
        rng = random.Random(5)
        for k in range(N_FILES):
            # Enough text per file that the workers are still reading and writing when the
            # server dies: with each worker's next group already queued, 20 documents a file
            # were all processed before the kill and the outage hit only the commit.
            docs = [make_document(rng) for _ in range(120)]
            fs.pipe(
                f"corpus/raw/part-{k:02d}.jsonl",
                "".join(json.dumps({"text": t}) + "\n" for t in docs).encode(),
            )

        def cfg(out: str) -> PreprocessConfig:
            return PreprocessConfig(
                input=InputConfig(paths=["s3://corpus/raw/"]),
                output=out,
                tokenizer=str(tokenizer),
                packing=PackingConfig(
                    sentences_per_block=8, max_sentence_tokens=16, heldout_fraction=0.2
                ),
                storage=StorageConfig(
                    endpoint_url=server.endpoint,
                    key=server.key,
                    secret=server.secret,
                    **storage_kwargs,
                ),
                workers=2,
                plot=False,
            )

        t0 = time.monotonic()
        run_preprocess(cfg("s3://shards/clean"))
        clean_s = time.monotonic() - t0

        killed: dict[str, float] = {}

        def kill_when_a_shard_is_staged() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                # A shard (not the fingerprints deduplication stages first): the outage then
                # meets the workers while they process, as it did before deduplication.
                staged = iter_objects(fs, "shards/out/_staging/")
                if any("/train/" in k or "/heldout/" in k for k in staged):
                    server.kill()
                    killed["at"] = time.monotonic()
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_when_a_shard_is_staged, daemon=True)
        killer.start()
        error: BaseException | None = None
        try:
            run_preprocess(cfg("s3://shards/out"))
        except Exception as exc:
            error = exc
        failed_at = time.monotonic()
        killer.join(timeout=5)

        server.start()  # same data dir, same ports
        fs = _client(server.endpoint, server.key, server.secret)
        left_manifest = sorted(
            k for k in iter_objects(fs, "shards/out/") if "manifest" in k.rsplit("/", 1)[-1]
        ) + sorted(iter_objects(fs, "shards/out/manifests/"))
        t0 = time.monotonic()
        run_preprocess(cfg("s3://shards/out"))
        rerun_s = time.monotonic() - t0
        storage = cfg("").storage
        clean = read_manifest("s3://shards/clean", storage)
        rerun = read_manifest("s3://shards/out", storage)
        return {
            "clean_s": clean_s,
            "rerun_s": rerun_s,
            "killed": "at" in killed,
            "time_to_fail_s": failed_at - killed["at"] if "at" in killed else None,
            "error": error,
            "left_manifest": left_manifest,
            "clean": clean,
            "rerun": rerun,
        }
    finally:
        server.stop()


def _shards(manifest: Any) -> dict[str, list[tuple[str, int, str]]]:
    return {
        split: [(s.path, s.rows, s.sha256) for s in manifest.shards(split)]
        for split in ("train", "heldout")
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("ray_session")
def test_storage_outage_mid_run_fails_fast_and_the_rerun_matches_a_clean_run(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    r = run_outage_scenario(tmp_path, tokenizer_path, OUTAGE_POLICY)
    assert r["killed"], "the run ended before a shard was staged: give it more input"
    err = r["error"]
    assert isinstance(err, StorageError), repr(err)
    msg = str(err)
    # Names the object and what was tried. (The outage may meet the workers' reads and writes,
    # or, when the last group is done first, the driver's manifest read before the commit.)
    assert re.search(
        r"cannot (read|write shards to|read the manifest of) s3://(corpus|shards)/\S+", msg
    ), msg
    assert re.search(r"s3://(corpus|shards)/\S+ at http://127\.0\.0\.1:\d+ still failing", msg)
    assert "storage.retry_budget_s=4" in msg
    budget = OUTAGE_POLICY["retry_budget_s"]
    assert r["time_to_fail_s"] < budget + FAIL_MARGIN_S, r["time_to_fail_s"]
    # Nothing committed: no manifest, no manifest version.
    assert r["left_manifest"] == []
    # The re-run after the restart is the uninterrupted run.
    clean, rerun = r["clean"], r["rerun"]
    assert clean is not None and rerun is not None and rerun.version == 1
    assert _shards(rerun) == _shards(clean)
    assert len(_shards(clean)["train"]) == N_FILES
    assert [(e.uri, e.unit, e.shards) for e in rerun.inputs] == [
        (e.uri, e.unit, e.shards) for e in clean.inputs
    ]
