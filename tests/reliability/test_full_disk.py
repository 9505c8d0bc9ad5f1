"""A disk that fills up during preprocessing: one clear message, and the disk given back.

Before: the message was clear, but the failed run left its own staging behind, which kept the
disk full; the next run then failed without saying why and left a probe file. Here the output
is a real, small tmpfs (mounted by the test; skipped where mounting is not allowed), so the
writes really fail with ENOSPC; the test asserts the failure came from the full disk (the fault
landed) before asserting what is left on it.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
from pipeline.errors import UserError
from pipeline.preprocess import run_preprocess
from tests.conftest import make_document

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): no real full disk")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_fails_clearly_and_leaves_the_disk_as_it_was(
    small_disk: Path, tmp_path: Path, tokenizer_path: Path
) -> None:
    rng = random.Random(3)
    src = tmp_path / "raw"
    src.mkdir()
    for k in range(3):  # ~2 MB of text: its shards do not fit in 32 KiB
        (src / f"part-{k}.txt").write_text("\n\n".join(make_document(rng) for _ in range(600)))
    cfg = PreprocessConfig(
        input=InputConfig(paths=[str(src)]),
        output=str(small_disk / "out"),
        tokenizer=str(tokenizer_path),
        packing=PackingConfig(sentences_per_block=8, max_sentence_tokens=16),
        plot=False,
    )
    free_before = shutil.disk_usage(small_disk).free

    for attempt in range(2):  # the re-run meets the same disk: the same clear story
        with pytest.raises(UserError) as caught:
            run_preprocess(cfg)
        message = str(caught.value)
        assert "no space left" in message, message  # the fault landed: ENOSPC, attempt 1 and 2
        assert "cannot write shards" in message  # ... while writing shards, not at the probe
        assert "B free of" in message and "re-run the same command" in message
        out = small_disk / "out"
        leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert leftovers == [], (attempt, leftovers)  # no staging, no probe, no half shard
        assert not (out / "manifest.json").exists()
        assert shutil.disk_usage(small_disk).free >= free_before - 64 * 1024  # given back
