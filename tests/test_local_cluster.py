"""infra/local/up.sh and down.sh on a clean machine: a fresh HOME with no Ray token in it.

Ray 2.60 with ``RAY_AUTH_MODE=token`` refuses to ``ray start`` without a token, so up.sh must
create one; a test session that ran ``ray.init()`` first leaves ``~/.ray/auth_token`` behind
and would hide that. Ports are free ones and the temp dir is the cluster's own (as in
tests/test_cluster_jobs.py), so another Ray on this machine is never touched; down.sh must stop
exactly this cluster, which a decoy process with a look-alike temp dir and port checks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment with a fresh HOME and nothing of another Ray's auth/address."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_AUTH_MODE"))
    }
    return {**env, "HOME": str(home), "VENV": str(VENV)}


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                raw = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                out[int(proc.name)] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return out


def _cluster_pids(temp: str, port: int) -> set[int]:
    """Processes of the cluster with this temp dir (as a whole path) or GCS port."""
    mine = re.compile(rf"(^|[ =]){re.escape(temp)}(/| |$)|[0-9]:{port}( |$)")
    return {pid for pid, cmd in _cmdlines().items() if mine.search(cmd) and pid != os.getpid()}


def _ray(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV / "bin" / "ray"), *args],
        env={**env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture()
def fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    assert not (home / ".ray").exists()
    return home


def test_up_refuses_a_missing_token_path_before_starting_anything(fresh_home: Path) -> None:
    env = {**_clean_env(fresh_home), "RAY_AUTH_TOKEN_PATH": str(fresh_home / "nope")}
    up = subprocess.run(
        ["bash", str(REPO / "infra/local/up.sh")],
        env={**env, "RAY_PORT": str(_free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 1
    assert "RAY_AUTH_TOKEN_PATH" in up.stderr and "missing" in up.stderr
    assert not (fresh_home / ".ray").exists()


@pytest.fixture()
def decoy() -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    """Stand-in for another local cluster whose temp dir and port start like ours will."""
    port = _free_port()
    temp = f"/tmp/ray-gpthf-{port}"
    look_alike = [f"--temp-dir={temp}0", f"--gcs-address=127.0.0.1:{port}0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", *look_alike],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, temp, port
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(600)
def test_up_creates_a_token_on_a_fresh_home_and_down_stops_only_its_cluster(
    fresh_home: Path, decoy: tuple[subprocess.Popen[bytes], str, int]
) -> None:
    decoy_proc, temp, port = decoy
    dash = _free_port()
    env = {
        **_clean_env(fresh_home),
        "RAY_PORT": str(port),
        "RAY_DASHBOARD_PORT": str(dash),
        "RAY_CLIENT_PORT": str(_free_port()),
        "HEAD_AGENT_PORT": str(_free_port()),
        "WORKER_AGENT_PORT": str(_free_port()),
        "HEAD_CPUS": "1",
        "WORKER_CPUS": "1",
    }
    scripts = REPO / "infra" / "local"
    try:
        up = subprocess.run(
            ["bash", str(scripts / "up.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        assert up.returncode == 0, up.stderr[-3000:]
        assert up.stdout.strip().splitlines()[-1] == f"RAY_ADDRESS=http://127.0.0.1:{dash}"

        # The token: created in the fresh HOME, private, and never printed.
        token_file = fresh_home / ".ray" / "auth_token"
        assert token_file.is_file(), up.stderr
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert token not in up.stdout + up.stderr
        assert "created a Ray auth token" in up.stderr

        # The cluster is up, with both nodes, and answers only with that token.
        status = _ray(env, "status", "--address", f"127.0.0.1:{port}")
        assert status.returncode == 0, status.stderr[-3000:]
        active = status.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        assert len(re.findall(r"\bnode_[0-9a-f]+", active)) == 2, status.stdout
        wrong = _ray(
            {**env, "RAY_AUTH_TOKEN": "0" * 64}, "status", "--address", f"127.0.0.1:{port}"
        )
        assert wrong.returncode != 0
        assert "Authentication" in wrong.stdout + wrong.stderr
        job = _ray(
            env,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--",
            "python",
            "-c",
            "print('hello from the fresh-home cluster')",
            timeout=300,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "hello from the fresh-home cluster" in job.stdout
        assert _cluster_pids(temp, port)

        # A second up.sh run would reuse the token; check the reuse without a second cluster.
        again = _ray(env, "get-auth-token")
        assert again.returncode == 0 and again.stdout.strip() == token

        down = subprocess.run(
            ["bash", str(scripts / "down.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stderr
        assert not _cluster_pids(temp, port), "down.sh left processes of its cluster"
        assert decoy_proc.poll() is None, "down.sh killed another cluster's process"
    finally:
        subprocess.run(["bash", str(scripts / "down.sh")], env=env, timeout=120)
        for pid in _cluster_pids(temp, port):  # only if down.sh failed: still only ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
