"""One writer per run folder: a lease that a second training run meets at once.

Two runs into one ``--output`` used to both exit 0 and leave a mix (the config of one, the
metrics and export of the other, each having pruned the other's checkpoints): the "already holds
checkpoints" check runs before either has written one. The lease closes that window: the first
thing a run does to its folder is create ``RUN/.lease.json`` *exclusively* (a hard link on local
disks, a conditional PUT on S3: ``pipeline.manifest.create_exclusive``), and it holds it until
it ends.

A run that crashed cannot release its lease, so a lease is stale, and is taken over with a
warning, when its process is gone (same host: its pid no longer exists) or when its heartbeat
(rewritten every ``heartbeat_s`` by a daemon thread) is older than ``stale_s`` (another host, or
object storage). Taking over is not atomic: two runs that find the same stale lease at the same
moment may both remove it, and then only one of them creates the new one (the other is refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.manifest import create_exclusive
from pipeline.storage import filesystem_for, join, write_bytes_atomic
from training.train.config import TrainConfigError

LEASE = ".lease.json"


class RunInUse(TrainConfigError):
    """Another live run holds this run folder."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    """A fresh id per run: what tells one holder from another."""
    host: str
    pid: int
    started: float
    heartbeat: float
    command: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LeaseInfo:
        return cls(**json.loads(raw))

    def stale_because(self, now: float, stale_s: float) -> str | None:
        """Why this lease no longer protects anything, or None while its run may be alive."""
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        if now - self.heartbeat > stale_s:
            return f"its last heartbeat was {now - self.heartbeat:.0f}s ago (> {stale_s:.0f}s)"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunLease:
    """``with RunLease(output, storage):`` holds ``output``'s lease for the block's duration."""

    def __init__(
        self, output: str, storage: Any = None, *, heartbeat_s: float = 30.0, stale_s: float = 300.0
    ) -> None:
        if stale_s <= 2 * heartbeat_s:
            raise ValueError("stale_s must exceed two heartbeats, or a live run looks stale")
        self.output, self.storage = output.rstrip("/"), storage
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.fs, root = filesystem_for(self.output, storage)
        self.path = join(root, LEASE)
        now = time.time()
        self.info = LeaseInfo(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            heartbeat=now,
            command=" ".join(sys.argv)[:500],
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None
        """Why a stale lease was taken over (None: the folder was free)."""

    def read(self) -> LeaseInfo | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return LeaseInfo.from_bytes(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # torn or foreign content: treat as no heartbeat at all
            return LeaseInfo("?", "?", -1, 0.0, 0.0, "unreadable lease")

    def acquire(self) -> RunLease:
        for _ in range(3):
            if create_exclusive(self.fs, self.path, self.info.to_bytes()):
                self._thread = threading.Thread(
                    target=self._beat, name="gpthf-run-lease", daemon=True
                )
                self._thread.start()
                return self
            other = self.read()
            if other is None:  # released between our attempt and the read
                continue
            why = other.stale_because(time.time(), self.stale_s)
            if why is None:
                age = time.time() - other.started
                raise RunInUse(
                    f"{self.output} is in use by another training run (pid {other.pid} on "
                    f"{other.host}, started {age:.0f}s ago: {other.command[:120]}). Wait for it "
                    "to finish, or train into another --output. Two runs in one folder would "
                    "overwrite each other's checkpoints, metrics and export. (A run that died on "
                    f"another machine releases it {self.stale_s:.0f}s after its last heartbeat; "
                    f"removing {self.path} takes it over now.)"
                )
            self.took_over = f"pid {other.pid} on {other.host}: {why}"
            print(
                f"[train] taking over the stale lease of {self.output} ({self.took_over})",
                flush=True,
            )
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
        raise RunInUse(f"{self.output}: could not take its lease ({self.path}); try again")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self.read()
            if current is None or current.owner != self.info.owner:
                print(
                    f"[train] warning: the lease of {self.output} is no longer this run's "
                    "(removed or taken over): another run may be writing into it",
                    flush=True,
                )
                return
            beat = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
            with contextlib.suppress(OSError):  # a missed beat is not an error; stale_s allows it
                write_bytes_atomic(self.fs, self.path, beat.to_bytes())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = self.read()
        if current is not None and current.owner == self.info.owner:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
