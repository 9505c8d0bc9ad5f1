"""No secret anywhere it can leak: credentials given in a config file or in the environment must
not appear in anything a run writes (shards, manifest, stats, checkpoints, exports, metrics,
reports, logs, Ray's session files) nor in its output and error messages.

Real parts: SeaweedFS checks the signatures (a wrong secret is refused), the jobs run as
`gpthf` subprocesses with their own Ray temp dir, and everything they wrote is read back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_document
from tests.test_preprocess_s3 import client

pytestmark = [pytest.mark.slow, pytest.mark.s3]
REPO = Path(__file__).resolve().parents[2]


def _gpthf(args: list[str], env: dict[str, str], expect: int = 0) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def _leaks(blob: bytes, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s.encode() in blob]


def _storage_config(path: Path, s3_server: Any, secret: str) -> list[str]:
    path.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "endpoint_url": s3_server.endpoint,
                    "key": s3_server.key,
                    "secret": secret,
                    "region": "us-east-1",
                }
            }
        )
    )
    return ["--config", str(path)]


@pytest.mark.timeout(900)
def test_credentials_never_leave_the_process(
    s3_server: Any, tokenizer_path: Path, tmp_path: Path
) -> None:
    """The jobs run once with the credentials in a config file *and* in the environment: a leak
    through either (the config objects the jobs write and ship to Ray, or an environment Ray
    or a log copies) puts the same secret string somewhere this test reads. Each source then
    gets a refused run of its own."""
    fs = client(s3_server)
    prefix = f"leak-{uuid.uuid4().hex[:6]}"
    rng = random.Random(3)
    for k in range(2):
        fs.pipe(
            f"corpus/{prefix}/raw/p{k}.jsonl",
            "".join(json.dumps({"text": make_document(rng)}) + "\n" for _ in range(30)).encode(),
        )
    secrets = [s3_server.key, s3_server.secret]
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    ray_tmp = Path("/tmp") / f"gl-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), TOKENIZERS_PARALLELISM="false")
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID=s3_server.key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret,
        AWS_DEFAULT_REGION="us-east-1",
    )
    config_args = _storage_config(tmp_path / "storage.yaml", s3_server, s3_server.secret)
    data, run, report = (f"s3://shards/{prefix}/{p}" for p in ("data", "run", "eval"))
    said = [
        _gpthf(
            ["preprocess", f"s3://corpus/{prefix}/raw/", "--output", data, "--tokenizer",
             str(tokenizer_path), "-S", "8", "-M", "16", "--heldout-fraction", "0.3",
             *config_args],
            env,
        ),
        _gpthf(
            ["train", "--data", data, "--output", run, "--model", "gpthf-tiny", "--total-steps",
             "2", "--warmup-steps", "0", "--micro-batch", "2", "--checkpoint-every", "1",
             "--eval-every", "1", *config_args],
            env,
        ),
        _gpthf(["eval", "--checkpoint", run, "--data", data, "--output", report, *config_args], env),
    ]  # fmt: skip
    # Refused runs, one per source: the error names the problem, never the secret tried.
    wrong = f"wrong-secret-{uuid.uuid4().hex}"
    refusals = {
        "config file": (env, _storage_config(tmp_path / "bad.yaml", s3_server, wrong)),
        "environment": ({**env, "AWS_SECRET_ACCESS_KEY": wrong}, []),
    }
    for source, (bad_env, bad_args) in refusals.items():
        refused = _gpthf(
            ["preprocess", f"s3://corpus/{prefix}/raw/", "--output", f"s3://shards/{prefix}/x",
             "--tokenizer", str(tokenizer_path), *bad_args],
            bad_env,
            expect=2,
        )  # fmt: skip
        assert "error" in refused and wrong not in refused, source
        said.append(refused)

    written = fs.find(f"shards/{prefix}/")
    assert any(p.endswith("manifest.json") for p in written)
    assert any("/checkpoint_" in p and p.endswith("train_config.json") for p in written)
    assert any(p.endswith("export/config.json") for p in written)
    assert any(p.endswith("report.json") for p in written)
    found = {p: _leaks(fs.cat(p), secrets) for p in written}
    found.update({f"output of {i}": _leaks(s.encode(), secrets) for i, s in enumerate(said)})
    logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
    assert logs, "the jobs' Ray session files are checked too"
    for p in logs:
        try:
            found[str(p)] = _leaks(p.read_bytes(), secrets)
        except OSError:
            continue
    shutil.rmtree(ray_tmp, ignore_errors=True)
    leaked = {where: what for where, what in found.items() if what}
    assert not leaked, f"credentials found in: {leaked}"
