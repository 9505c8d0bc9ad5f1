"""The preprocessing job against a real S3-protocol server (SeaweedFS on loopback, with credentials)."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig, StorageConfig
from pipeline.manifest import read_manifest
from pipeline.preprocess import run_preprocess
from pipeline.storage import StorageError, filesystem_for
from tests.conftest import make_document

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.s3]


def storage(server: Any, secret: str | None = None) -> StorageConfig:
    return StorageConfig(
        endpoint_url=server.endpoint, key=server.key, secret=secret or server.secret
    )


def client(server: Any) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        key=server.key,
        secret=server.secret,
        client_kwargs={"endpoint_url": server.endpoint},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def put_jsonl(fs: s3fs.S3FileSystem, path: str, docs: list[str]) -> None:
    fs.pipe(path, "".join(json.dumps({"text": t}) + "\n" for t in docs).encode())


def listing(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, tuple[str, str]]:
    return {
        k: (str(v.get("ETag")), str(v.get("LastModified")))
        for k, v in fs.find(prefix, detail=True).items()
    }


def cfg_for(
    server: Any, src: str, out: str, tok: str, secret: str | None = None
) -> PreprocessConfig:
    return PreprocessConfig(
        input=InputConfig(paths=[src]),
        output=out,
        tokenizer=tok,
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16, heldout_fraction=0.2),
        storage=storage(server, secret),
        workers=2,
        plot=False,
    )


@pytest.fixture()
def prefix() -> str:
    return uuid.uuid4().hex[:10]


def test_s3_full_run_rerun_and_incremental(
    s3_server: Any, tokenizer_path: Any, prefix: str
) -> None:
    fs = client(s3_server)
    rng = random.Random(11)
    for k in range(2):
        put_jsonl(fs, f"corpus/{prefix}/part-{k}.jsonl", [make_document(rng) for _ in range(20)])
    # The tokenizer itself is read from object storage too.
    fs.put_file(str(tokenizer_path), f"corpus/{prefix}/tokenizer.json")
    src, out = f"s3://corpus/{prefix}/*.jsonl", f"s3://shards/{prefix}/out"
    tok = f"s3://corpus/{prefix}/tokenizer.json"

    first = run_preprocess(cfg_for(s3_server, src, out, tok))
    assert first.version == 1 and len(first.new_inputs) == 2
    manifest = read_manifest(out, storage(s3_server))
    assert manifest is not None
    rows = 0
    for split in ("train", "heldout"):
        for s, uri in zip(manifest.shards(split), manifest.shard_uris(out, split), strict=True):
            with fs.open(uri, "rb") as f:
                assert pq.read_table(f).num_rows == s.rows
            rows += s.rows
    assert rows == sum(manifest.totals(s)["rows"] for s in ("train", "heldout"))
    assert fs.exists(f"shards/{prefix}/out/tokenizer.json")
    # (SeaweedFS keeps empty directories; what matters is that no staged object is left.)
    staged = fs.find(f"shards/{prefix}/out/_staging/{first.run_stats['run_id']}", detail=True)
    assert [k for k, v in staged.items() if v.get("size")] == [], staged

    before = listing(fs, f"shards/{prefix}/out")
    again = run_preprocess(cfg_for(s3_server, src, out, tok))
    assert not again.wrote_anything
    assert listing(fs, f"shards/{prefix}/out") == before, "re-run wrote to the bucket"

    put_jsonl(fs, f"corpus/{prefix}/part-2.jsonl", [make_document(rng) for _ in range(5)])
    third = run_preprocess(cfg_for(s3_server, src, out, tok))
    assert third.version == 2
    assert third.new_inputs == [f"s3://corpus/{prefix}/part-2.jsonl"]
    after = listing(fs, f"shards/{prefix}/out")
    unchanged = {k for k in before if after.get(k) == before[k]}
    assert set(before) - unchanged <= {
        f"shards/{prefix}/out/manifest.json",
        f"shards/{prefix}/out/stats.json",
    }
    assert all("part-2-" in p for p in third.shards_added)


def test_s3_hostile_file_is_counted_and_skipped(
    s3_server: Any, tokenizer_path: Any, prefix: str
) -> None:
    fs = client(s3_server)
    put_jsonl(fs, f"corpus/{prefix}/good.jsonl", ["One fine sentence. And another."])
    fs.pipe(f"corpus/{prefix}/evil.jsonl", b"\x00\x01\x02" * 1000)
    fs.pipe(f"corpus/{prefix}/mixed.jsonl", b'{"text": "Ok here."}\n{nope\n')
    out = f"s3://shards/{prefix}/hostile"
    res = run_preprocess(cfg_for(s3_server, f"s3://corpus/{prefix}/", out, str(tokenizer_path)))
    assert len(res.new_inputs) == 3
    assert res.stats["skipped"] == {"binary_file": 1, "malformed_json": 1}
    assert res.stats["documents"] == 2


def test_s3_wrong_secret_fails_clearly_before_any_work(
    s3_server: Any, tokenizer_path: Any, prefix: str
) -> None:
    fs = client(s3_server)
    put_jsonl(fs, f"corpus/{prefix}/a.jsonl", ["Hello there."])
    cfg = cfg_for(
        s3_server,
        f"s3://corpus/{prefix}/",
        f"s3://shards/{prefix}/x",
        str(tokenizer_path),
        secret="wrong",
    )
    with pytest.raises(StorageError, match=r"(credentials|access denied).*AWS_SECRET_ACCESS_KEY"):
        run_preprocess(cfg)
    assert not fs.exists(f"shards/{prefix}/x")


def test_s3_missing_buckets_fail_clearly(s3_server: Any, tokenizer_path: Any, prefix: str) -> None:
    fs = client(s3_server)
    put_jsonl(fs, f"corpus/{prefix}/a.jsonl", ["Hello there."])
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        run_preprocess(
            cfg_for(s3_server, "s3://no-such-bucket/x/", "s3://shards/y", str(tokenizer_path))
        )
    with pytest.raises(StorageError, match=r"bucket 'no-such-out' does not exist"):
        run_preprocess(
            cfg_for(s3_server, f"s3://corpus/{prefix}/", "s3://no-such-out/y", str(tokenizer_path))
        )
    fs_, _ = filesystem_for("s3://no-such-out/y", storage(s3_server))
    assert not fs_.exists("no-such-out/y/manifest.json")
