"""Checkpoint integrity: checksums written with every checkpoint, verified before anything in it
is loaded, and loads that cannot run code.

Checkpoints live on shared storage; anyone who can write there must not be able to run code on
the training nodes, and a truncated upload must not stop a nightly resume. So:

* every rank writes ``_checksums/rank{r}.json`` (sha256 and size of each file it contributed;
  rank 0's list includes the trainer state) after everything else it saves;
* ``verify`` checks that every rank's list is there, every listed file matches, and no unlisted
  file sits beside them; ``--resume`` uses the newest checkpoint that verifies and warns about
  the newer ones that do not;
* ``no_code_execution`` makes every ``torch.load`` inside it (ours and DeepSpeed's, which passes
  ``weights_only=False``) a weights-only load that accepts tensors, containers and the few
  DeepSpeed types its checkpoints hold: a pickle payload is refused, never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.storage import filesystem_for
from training.train.checkpoint import CheckpointError

CHECKSUMS = "_checksums"
FORMAT = 1
_CHUNK = 1 << 20


def _sha256(f: Any) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def write_checksums(directory: str | Path, rank: int) -> None:
    """List every file under ``directory`` (what this rank contributes), written last."""
    root = Path(directory)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(f"{CHECKSUMS}/"):
            with open(p, "rb") as f:
                sha, size = _sha256(f)
            files[rel] = {"sha256": sha, "bytes": size}
    out = root / CHECKSUMS / f"rank{rank}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"format": FORMAT, "rank": rank, "files": files}, indent=1))


def verify(checkpoint_uri: str, world_size: int, storage: Any = None) -> list[str]:
    """What is wrong with a checkpoint (local or s3://), by file; empty if it is intact."""
    fs, root = filesystem_for(checkpoint_uri, storage)
    root = root.rstrip("/")
    listed: dict[str, dict[str, Any]] = {}
    problems = []
    for rank in range(world_size):
        path = f"{root}/{CHECKSUMS}/rank{rank}.json"
        try:
            with fs.open(path, "rb") as f:
                entry = json.loads(f.read())
            listed.update(entry["files"])
        except FileNotFoundError:
            problems.append(f"{CHECKSUMS}/rank{rank}.json is missing (rank {rank} never finished)")
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{CHECKSUMS}/rank{rank}.json is unreadable ({exc})")
    present = {
        p[len(root) + 1 :]
        for p in fs.find(root)
        if not p[len(root) + 1 :].startswith(f"{CHECKSUMS}/")
    }
    for rel, want in sorted(listed.items()):
        if rel not in present:
            problems.append(f"{rel} is missing")
            continue
        with fs.open(f"{root}/{rel}", "rb") as f:
            sha, size = _sha256(f)
        if size != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, {want['bytes']} were written (truncated?)")
        elif sha != want["sha256"]:
            problems.append(f"{rel} differs from what was written (sha256 mismatch)")
    if not problems:
        problems += [f"{rel} was not written by the run" for rel in sorted(present - set(listed))]
    if not problems:
        problems += _unsafe_pickles(fs, root, sorted(present))
    return problems


ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The non-tensor types DeepSpeed's ZeRO checkpoints hold (read off their pickles)."""


def _unsafe_pickles(fs: Any, root: str, files: list[str]) -> list[str]:
    """Files whose pickle names a global beyond tensors and ALLOWED_GLOBALS (nothing is run:
    torch lists the globals without unpickling)."""
    import torch

    problems = []
    for rel in files:
        if not rel.endswith((".pt", ".pth", ".bin", ".pkl")):
            continue
        with fs.open(f"{root}/{rel}", "rb") as f:
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            except Exception as exc:  # not a torch zip file at all
                problems.append(f"{rel} is not a torch checkpoint file ({type(exc).__name__})")
                continue
        unsafe = sorted(set(found) - set(ALLOWED_GLOBALS))
        if unsafe:
            problems.append(f"{rel} would run code when loaded (it names {unsafe[:3]})")
    return problems


def has_checksums(checkpoint_uri: str, storage: Any = None) -> bool:
    """Checkpoints written before checksums existed have none (they still load weights-only)."""
    fs, root = filesystem_for(checkpoint_uri, storage)
    return bool(fs.exists(f"{root.rstrip('/')}/{CHECKSUMS}"))


def inspect(checkpoint_uri: str, world_size: int, storage: Any = None) -> list[str]:
    """``verify``; for a checkpoint written before checksums existed, only the pickle scan."""
    if has_checksums(checkpoint_uri, storage):
        return verify(checkpoint_uri, world_size, storage)
    fs, root = filesystem_for(checkpoint_uri, storage)
    root = root.rstrip("/")
    return _unsafe_pickles(fs, root, sorted(p[len(root) + 1 :] for p in fs.find(root)))


def require_intact(checkpoint_uri: str, world_size: int, storage: Any = None) -> None:
    problems = inspect(checkpoint_uri, world_size, storage)
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint_uri} is damaged or was tampered with: "
            + "; ".join(problems[:5])
            + ". Resume from an earlier checkpoint (delete this folder) or start a new --output."
        )


def _allowed_globals() -> list[Any]:
    import importlib

    out = []
    for name in ALLOWED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


@contextlib.contextmanager
def no_code_execution(what: str = "the checkpoint") -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, whatever the caller asked for."""
    import torch

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()]
        raise CheckpointError(
            f"refused to load {what}: a file in it holds more than tensors and DeepSpeed's own "
            f"state, and unpickling it could run code ({lines[0] if lines else exc}). Do not "
            "resume from it; check who can write to the checkpoint storage."
        ) from exc
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
