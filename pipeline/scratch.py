"""Work units' scratch folders, named by the process that made them.

A work unit writes its shards to a local temporary folder first (Parquet needs a seekable file),
and removes it when done. A process that is killed (a worker Ray kills when the driver is
interrupted, an OOM kill) cannot: its folder stays, megabytes each. The folder's name carries
its process id, so that whoever finds the folder of a process that no longer exists removes
it: every worker once when it starts its first unit, and an interrupted driver once the Ray it
started is down. A folder whose process still runs is never touched (a pid reused by another
process keeps its folder until that one ends: conservative, never wrong).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time

PREFIX = "gpthf-unit-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9_]+$")


def unit_scratch() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for one unit, in this host's temporary folder, named by this pid."""
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_dead(root: str | None = None, wait_s: float = 0.0) -> list[str]:
    """Remove the unit folders in ``root`` (the temporary folder) whose process has ended;
    wait up to ``wait_s`` for processes that are ending (workers of a Ray being shut down).
    Returns the removed folders' names."""
    base = root or tempfile.gettempdir()
    deadline = time.monotonic() + wait_s
    removed: list[str] = []
    while True:
        try:
            names = os.listdir(base)
        except OSError:
            return removed
        waiting = False
        for name in names:
            m = _NAME.match(name)
            if m is None or int(m.group(1)) == os.getpid():
                continue
            if _alive(int(m.group(1))):
                waiting = True
                continue
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
        if not waiting or time.monotonic() >= deadline:
            return removed
        time.sleep(0.1)


_swept = False


def sweep_once() -> None:
    """``sweep_dead()`` the first time this process calls it (a worker, at its first unit)."""
    global _swept
    if _swept:
        return
    _swept = True
    removed = sweep_dead()
    if removed:
        print(
            f"[preprocess] removed {len(removed)} scratch folder(s) of ended processes: "
            f"{removed[:5]}",
            file=sys.stderr,
            flush=True,
        )
