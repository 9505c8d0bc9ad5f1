"""A real two-node Ray cluster on loopback (token auth), driven only through `gpthf submit`.

preprocess -> train (2 workers, one per node) -> evaluate, then the nightly job submitted twice
for the same date runs once. Brought up and torn down with infra/local/up.sh and down.sh.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from jobs.submit import client, submit
from tests.conftest import make_document

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parent.parent),
        "RAY_PORT": str(_free_port()),
        "RAY_DASHBOARD_PORT": str(_free_port()),
        "RAY_CLIENT_PORT": str(_free_port()),
        "HEAD_AGENT_PORT": str(_free_port()),
        "WORKER_AGENT_PORT": str(_free_port()),
        "HEAD_CPUS": "2",
        "WORKER_CPUS": "2",
    }
    up = subprocess.run(
        ["bash", str(REPO / "infra/local/up.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        address = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        yield address
    finally:
        subprocess.run(["bash", str(REPO / "infra/local/down.sh")], env=env, timeout=120)


def _ok(address: str, command: str, args: list[str]) -> str:
    sid, status = submit(command, args, address=address, cpu_cluster=True, wait=True, timeout=600)
    if status != "SUCCEEDED":
        pytest.fail(f"{command} job {sid} {status}:\n{client(address).get_job_logs(sid)[-4000:]}")
    return sid


@pytest.mark.timeout(720)  # four real jobs on a two-node cluster: ~4 min alone on 2 cores
def test_submit_preprocess_train_evaluate_and_nightly_once(
    cluster: str, tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(5)
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in range(4):
        docs = [make_document(rng) for _ in range(30)]
        (raw / f"p{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data, run, report = tmp_path / "data", tmp_path / "run", tmp_path / "eval"
    c = client(cluster)

    _ok(cluster, "preprocess", [str(raw), "--output", str(data), "--tokenizer", str(tokenizer_path),
                                "-S", "8", "--heldout-fraction", "0.15", "--no-plot"])  # fmt: skip
    assert json.loads((data / "manifest.json").read_text())["version"] == 1

    tiny = json.dumps(
        {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 3, "n_encoder_layers": 2}
    )
    sid = _ok(cluster, "train", ["--data", str(data), "--output", str(run), "--model", "gpthf-tiny",
                                 "--model-overrides", tiny, "--workers", "2", "--cpus-per-worker", "0.5",
                                 "--placement-strategy", "STRICT_SPREAD", "--zero-stage", "2",
                                 "--micro-batch", "2", "--total-steps", "6", "--warmup-steps", "1",
                                 "--checkpoint-every", "6", "--eval-every", "6"])  # fmt: skip
    assert (run / "export" / "model.safetensors").exists()
    logs = c.get_job_logs(sid)
    assert "2 worker(s)" in logs
    # STRICT_SPREAD: the two training workers ran on the two nodes.
    nodes = {
        line.split(" on node ")[1].split()[0] for line in logs.splitlines() if " on node " in line
    }
    assert len(nodes) == 2, logs[-3000:]

    _ok(
        cluster,
        "eval",
        ["--checkpoint", str(run / "export"), "--data", str(data), "--output", str(report)],
    )
    rep = json.loads((report / "report.json").read_text())
    manifest = json.loads((data / "manifest.json").read_text())
    assert rep["checkpoints"][0]["total"]["rows"] == manifest["splits"]["heldout"]["rows"]

    nightly_out = tmp_path / "nightly"
    args = [
        str(raw),
        "--output",
        str(nightly_out),
        "--tokenizer",
        str(tokenizer_path),
        "--date",
        "2026-11-23",
    ]
    sid1, status1 = submit(
        "nightly", args, address=cluster, cpu_cluster=True, wait=True, timeout=600
    )
    sid2, status2 = submit(
        "nightly", args, address=cluster, cpu_cluster=True, wait=True, timeout=600
    )
    assert sid1 == sid2 and status1 == status2 == "SUCCEEDED"
    assert sid1.startswith("nightly-2026-11-23-")
    assert [j.submission_id for j in c.list_jobs()].count(sid1) == 1, "the nightly job ran once"
    summary = json.loads((nightly_out / "nightly" / "2026-11-23.json").read_text())
    assert len(summary["new_inputs"]) == 4

    # `gpthf jobs` reads the same cluster.
    capsys.readouterr()
    assert cli_main(["jobs", "--address", cluster, "status", sid1]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert cli_main(["jobs", "--address", cluster, "list"]) == 0
    listed = capsys.readouterr().out
    assert sid1 in listed and "jobs.train" in listed
    assert cli_main(["jobs", "--address", cluster, "logs", sid1]) == 0
    assert "[nightly 2026-11-23] 4 new input file(s)" in capsys.readouterr().out
