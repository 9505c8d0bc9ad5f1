"""Work units' scratch folders: a dead process's folder is removed, a live one's never."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.scratch import PREFIX, sweep_dead, unit_scratch


def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_the_folders_of_ended_processes(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f"{PREFIX}{_ended_pid()}-ab12_x"
        alive = tmp_path / f"{PREFIX}{live.pid}-cd34"
        mine = tmp_path / f"{PREFIX}{os.getpid()}-ef56"
        other = tmp_path / f"{PREFIX}notapid"  # the old, pid-less name: not ours to judge
        for d in (dead, alive, mine, other):
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "train.parquet").write_bytes(b"x" * 100)
        assert sweep_dead(str(tmp_path)) == [dead.name]
        assert not dead.exists() and alive.exists() and mine.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
    # Once it has ended, waiting for it finds it gone and removes its folder.
    assert sweep_dead(str(tmp_path), wait_s=5) == [alive.name]


def test_a_unit_folder_carries_its_pid_and_is_never_swept_by_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with unit_scratch() as d:
        assert Path(d).parent == tmp_path and Path(d).name.startswith(f"{PREFIX}{os.getpid()}-")
        assert sweep_dead() == [] and Path(d).exists()
