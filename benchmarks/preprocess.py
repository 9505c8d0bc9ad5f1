"""Preprocessing throughput: ``gpthf preprocess`` as a user runs it, against its floor and datatrove.

    .venv/bin/python benchmarks/preprocess.py [--sizes-mb 20 40 60] [--one-file-mb 66]
        [--repeats 3] [--workers 2] [--skip-datatrove] [--out FILE]
    .venv/bin/python benchmarks/preprocess.py --quick      # 4/8/12 MB, one file of 8 MB

Under the benchmark protocol (``benchmarks/protocol.py``): every timed run below is one side,
all sides run in turn within each repeat (the order rotating), each figure is a median over
the repeats with its min-max, ratios are taken per repeat, sides compared over a corpus are
asserted to have read the same bytes and documents, and the result is written with the
environment to ``benchmarks/results/preprocess[_quick].json`` (and ``.md``).

Every side runs in this one invocation on the same text: English JSONL built from the sample
corpus (Shakespeare, ``pipeline.sample_corpus``), its plays cut into paragraphs on blank lines
and grouped into records of 2-5 KB (web-document sized), ``{"text": ...}`` only. Corpora:
three multi-file sizes (``--sizes-mb``; the smallest in 48 files, the others in proportionally
more files of the same size), one small file (~0.3 MB) and one large file (``--one-file-mb``:
66 MB is four pieces of at most 16 MiB, ``input.split_bytes``, that two workers share).

- **End to end**: the ``gpthf preprocess`` command in a subprocess (Python start-up, Ray start
  and stop, commit and manifest included), a fresh output each time. The **marginal rate**
  (MB/s) and the **fixed cost** (s) are the slope and intercept of a least-squares line through
  every repeat of the three sizes, with standard errors: never the difference of two timings.
  When a size is below the command's ``local_below_bytes`` (small input is processed without
  Ray), every multi-file run gets ``--local-below-bytes 0`` so that all take the same path
  (``forced_ray``); the one-small-file run never does: it is the fixed cost a user sees. The
  one large file runs with 1 and 2 workers: the end-to-end speed-up (fixed cost included) is
  flagged as noise when it exceeds what the cores allow.
- **Floor**: the bare loop that bounds preprocessing (json.loads each line, blingfire
  ``text_to_sentences``, ``tokenizers`` ``encode_batch_fast``, nothing else), two spawned
  processes with one Rayon thread each, at the same three sizes, fitted the same way. The
  pipeline encodes a document per call (its sentences joined by the EOS-S token, each still
  tokenized alone: ``pipeline.encoding``, the same ids as a sentence per call), so the floor it
  is held to does too (``2p-documents``); a sentence per call (``2p-sentences``, the floor as
  first defined, slower on the same text) is shown beside it.
- **datatrove** (``pip install -e '.[bench]'``: datatrove 0.10.1 and orjson; ``--skip-datatrove``
  or not installed: skipped): ``JsonlReader -> DocumentTokenizer`` (the local tokenizer file, no
  hub; no shuffling, EOD after each document) under ``LocalPipelineExecutor(tasks=files,
  workers=--workers)``, one Rayon thread per worker, in a subprocess, the same sizes, fitted.
- **Per-token path inside a task**: the pipeline's own ``process_unit`` (read, normalise,
  split, tokenize, pack, write and hash shards) against the floor's loop with the same encoding,
  one spawned process each with one Rayon thread, on the same files (a third of the smallest
  corpus), timed after imports and tokenizer load: the gap to the floor with Ray, start-up and
  scheduling out of it.
- **Stage profile**: one process, a ~5 MB slice, the pipeline's own per-document functions one
  stage at a time (read + JSON parse, normalise, sentence split, tokenize, pack, held-out hash and
  counters, Parquet write, sha256), seconds, MB/s and share of their sum (one pass: shares, not
  a comparison).

The benchmark itself never starts Ray, and RAY_ADDRESS is removed from the commands' environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.protocol import (  # noqa: E402
    Run,
    Samples,
    Spread,
    bounded,
    core_bound,
    fit_line,
    interleave,
    markdown_table,
    rate_of,
    ratio,
    same_work,
    write_result,
)

FILES_PER_SIZE = 48
"""Files of the smallest multi-file corpus; the larger ones have proportionally more files of
the same size, so that only the amount of text changes along the fit."""
ONE_SMALL_FILE_MB = 0.3
PROFILE_MB = 5.0
FLOOR_DOC_BATCH = 256
GOALS = {
    "marginal_over_floor_2p_documents": 0.9,
    "marginal_over_datatrove": 0.9,
    "one_small_file_s": 8.0,
    "one_file_2w_over_1w": 1.8,
    "per_token_over_floor": 0.9,
}

# ------------------------------------------------------------------------------------- corpora


def build_records(corpus: Path, seed: int = 0) -> list[str]:
    """The sample corpus as JSONL lines: each play's paragraphs grouped into 2-5 KB records."""
    rng = random.Random(seed)
    lines = []
    for f in sorted(corpus.glob("*.txt")):
        paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", f.read_text()) if p.strip()]
        group: list[str] = []
        size, target = 0, rng.randint(2000, 5000)
        for p in paragraphs:
            group.append(p)
            size += len(p) + 2
            if size >= target:
                lines.append(json.dumps({"text": "\n\n".join(group)}, ensure_ascii=False) + "\n")
                group, size, target = [], 0, rng.randint(2000, 5000)
        if group:
            lines.append(json.dumps({"text": "\n\n".join(group)}, ensure_ascii=False) + "\n")
    return lines


def write_corpus(folder: Path, records: list[str], mb: float, n_files: int, stem: str) -> dict:
    """``n_files`` JSONL files of about ``mb / n_files`` MB each, cycling through the records."""
    folder.mkdir(parents=True)
    per_file = mb * 1e6 / n_files
    i = 0
    for k in range(n_files):
        size = 0
        with open(folder / f"{stem}-{k:03d}.jsonl", "w", encoding="utf-8") as out:
            while size < per_file:
                line = records[i % len(records)]
                i += 1
                out.write(line)
                size += len(line.encode("utf-8"))
    return describe(folder)


def describe(folder: Path) -> dict:
    files = sorted(folder.glob("*.jsonl"))
    size = sum(f.stat().st_size for f in files)
    return {"path": str(folder), "MB": round(size / 1e6, 3), "bytes": size, "files": len(files)}


# ------------------------------------------------------------------------------- the command


def clean_env(**extra: str) -> dict[str, str]:
    drop = {"RAY_ADDRESS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def local_below_bytes() -> int | None:
    """The command's default threshold for processing without Ray (None: no such option)."""
    from pipeline.config import PreprocessConfig

    for f in dataclasses.fields(PreprocessConfig):
        if f.name == "local_below_bytes" and isinstance(f.default, int):
            return f.default
    return None


def run_cli(
    gpthf: str, corpus: dict, tok: str, out: Path, workers: int | None, force_ray: bool
) -> tuple[float, str, str, int]:
    """The command as a user runs it: (wall seconds, its work-unit line, its driver line, the
    documents it read)."""
    cmd = [gpthf, "preprocess", corpus["path"], "--output", str(out), "--tokenizer", tok, "--json"]
    # The corpora cycle through the sample corpus's records (copies by design), and the peer
    # (datatrove's tokenize-and-write) removes none: the same work is without deduplication.
    # What deduplication costs is benchmarks/dedup.py's.
    cmd += ["--dedup", "none"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if force_ray:
        cmd += ["--local-below-bytes", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[preprocess]")]
    where = next((ln for ln in lines if "unit" in ln), "")
    # The command's own account of where its driver's seconds went (DriverClock).
    driver = next((ln for ln in lines if ln.startswith("[preprocess] driver:")), "")
    documents = int(json.loads(proc.stdout)["run"]["counts"]["documents"])
    return wall, where, driver, documents


def units(log: str) -> int | None:
    """Work units of a run, from the command's ``[preprocess] ... in N work unit(s)`` line."""
    m = re.search(r"in (\d+) work unit", log)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------- floor


def _one_thread() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"


FLOOR_MODES = {
    "2p-documents": (2, "documents"),
    "2p-sentences": (2, "sentences"),
}
"""The floor the pipeline is held to is ``2p-documents``: the same encoding as the pipeline (a
document per tokenizer call, its sentences joined by the EOS-S token: the same ids,
``pipeline/encoding.py``), two processes. ``2p-sentences`` (a sentence per call, the floor as
first defined) is slower on the same text, and shown only to say by how much."""


def _floor_worker(args: tuple[list[str], str, str]) -> tuple[int, int]:
    """The floor's loop over ``files``: json.loads each line, blingfire, ``encode_batch_fast``;
    ``mode`` "documents" encodes a document per call with its sentences joined by the EOS-S
    token's text (the pipeline's encoding, same ids), "sentences" a sentence per call. Returns
    (documents, tokens)."""
    import blingfire
    from tokenizers import Tokenizer

    from pipeline.tokenizer import SPECIAL_TOKENS

    files, tok_path, mode = args
    tok = Tokenizer.from_file(tok_path)
    encode = tok.encode_batch_fast
    eos = SPECIAL_TOKENS["end_of_sentence"]
    n = documents = 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            batch: list[str] = []
            docs = 0
            for line in fh:
                sentences = blingfire.text_to_sentences(json.loads(line)["text"]).split("\n")
                if mode == "documents":
                    batch.append(eos.join(sentences) + eos)
                else:
                    batch.extend(sentences)
                docs += 1
                documents += 1
                if docs == FLOOR_DOC_BATCH:
                    n += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
                    batch, docs = [], 0
            if batch:
                n += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    return documents, n


def floor_run(corpus: dict, tok_path: str, procs: int, mode: str) -> Run:
    files = sorted(str(p) for p in Path(corpus["path"]).glob("*.jsonl"))
    chunks = [files[i::procs] for i in range(procs)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, initializer=_one_thread) as pool:
        counts = pool.map(_floor_worker, [(c, tok_path, mode) for c in chunks])
    wall = time.perf_counter() - t0
    return Run(wall, {"bytes": corpus["bytes"], "documents": sum(d for d, _ in counts)})


def _per_token_worker(args: tuple[str, list[str], str]) -> tuple[float, int]:
    """Seconds one process spends on ``files`` (tokenizer loaded, imports done) and the
    documents it did: the floor's bare loop (the pipeline's encoding, a document per call), or
    the pipeline's own ``process_unit`` (read, normalise, split, tokenize, pack, write and hash
    shards) into a scratch folder."""
    kind, files, tok_path = args
    if kind == "floor":
        t0 = time.perf_counter()
        documents, _ = _floor_worker((files, tok_path, "documents"))
        return time.perf_counter() - t0, documents
    from pipeline.config import PreprocessConfig
    from pipeline.pieces import WorkUnit
    from pipeline.storage import expand_inputs
    from pipeline.tokenizer import load_tokenizer
    from pipeline.unit import UnitContext, process_unit

    cfg = PreprocessConfig()
    inputs = expand_inputs(files, cfg.storage)
    documents = 0
    with tempfile.TemporaryDirectory(prefix="gpthf-bench-unit-") as staging:
        ctx = UnitContext.for_run(cfg, load_tokenizer(tok_path), staging)
        t0 = time.perf_counter()
        for f in inputs:
            documents += process_unit(WorkUnit(f), ctx)["stats"]["counts"]["documents"]
        return time.perf_counter() - t0, documents


def per_token_run(kind: str, files: list[str], tok_path: str) -> Run:
    with mp.get_context("spawn").Pool(1, initializer=_one_thread) as pool:
        seconds, documents = pool.apply(_per_token_worker, ((kind, files, tok_path),))
    return Run(float(seconds), {"bytes": sum(Path(f).stat().st_size for f in files),
                                "documents": documents})  # fmt: skip


# --------------------------------------------------------------------------------- datatrove

_DATATROVE = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer

src, out, tok, logs, tasks, workers = sys.argv[1:7]
LocalPipelineExecutor(
    pipeline=[
        JsonlReader(src, glob_pattern="*.jsonl", text_key="text"),
        DocumentTokenizer(
            out,
            tokenizer_name_or_path=tok,
            eos_token="<|endofdoc|>",
            shuffle_documents=False,
        ),
    ],
    tasks=int(tasks),
    workers=int(workers),
    logging_dir=logs,
).run()
"""


def datatrove_run(corpus: dict, tok: str, work: Path, workers: int) -> Run:
    out, logs = work / "dt-out", work / "dt-logs"
    cmd = [sys.executable, "-c", _DATATROVE, corpus["path"], str(out), tok, str(logs)]
    cmd += [str(corpus["files"] or 2), str(workers)]
    # One Rayon thread per worker process, as the floor and the pipeline's workers; no hub.
    env = clean_env(RAYON_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Run(wall, {"bytes": corpus["bytes"]})  # its reader counts no documents we can read


def fitted(corpora: list[dict], samples: Samples | None) -> dict[str, Any] | None:
    """Marginal MB/s and fixed seconds of one side over the corpus sizes: a least-squares line
    through every repeat of every size (seconds against MB), with standard errors."""
    if samples is None:
        return None
    x = [c["MB"] for c in corpora for _ in range(len(samples.runs) // len(corpora))]
    y = samples.seconds
    fit = fit_line(x, y)
    rate, rate_se = rate_of(fit)
    return {
        "marginal_MBps": round(rate, 3),
        "marginal_MBps_se": round(rate_se, 3),
        "fixed_s": round(fit.intercept, 3),
        "fixed_s_se": round(fit.intercept_se, 3),
        "r2": round(fit.r2, 4),
        "points": [[a, round(b, 3)] for a, b in zip(x, y, strict=True)],
    }


def _over(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float] | None:
    """The ratio of two fitted marginal rates, with its first-order standard error."""
    if not a or not b:
        return None
    r = a["marginal_MBps"] / b["marginal_MBps"]
    rel = math.hypot(a["marginal_MBps_se"] / a["marginal_MBps"],
                     b["marginal_MBps_se"] / b["marginal_MBps"])  # fmt: skip
    return {"ratio": round(r, 3), "se": round(r * rel, 3)}


def _by_size(samples: dict[str, Samples], prefix: str, n_sizes: int) -> Samples | None:
    """One side's runs over every size, as one series ordered size by size (for the fit)."""
    parts = [samples.get(f"{prefix} {k}") for k in range(n_sizes)]
    if any(p is None for p in parts):
        return None
    out = Samples(prefix)
    for p in parts:
        assert p is not None
        out.runs.extend(p.runs)
    return out


def measure(args: argparse.Namespace, work: Path, corpora: dict) -> dict[str, Any]:
    """Every timed run of the report, interleaved within each repeat (``benchmarks.protocol``)."""
    threshold = local_below_bytes()
    sizes: list[dict] = corpora["sizes"]
    force_multi = threshold is not None and min(c["bytes"] for c in sizes) < threshold
    force_one = threshold is not None and corpora["one_large"]["bytes"] < threshold
    out = work / "out"
    logs: dict[str, list[tuple[str, str]]] = {}

    def cli(name: str, corpus: dict, workers: int | None, force: bool) -> Callable[[], Run]:
        def side() -> Run:
            wall, where, driver, documents = run_cli(
                args.gpthf, corpus, args.tok, out, workers, force
            )
            logs.setdefault(name, []).append((where, driver))
            return Run(wall, {"bytes": corpus["bytes"], "documents": documents})

        return side

    sides: dict[str, Callable[[], Run]] = {}
    for k, c in enumerate(sizes):
        sides[f"e2e {k}"] = cli(f"e2e {k}", c, args.workers, force_multi)
    sides["e2e one small file"] = cli("e2e one small file", corpora["one_small"], None, False)
    for n in (1, 2):
        sides[f"e2e one file {n}w"] = cli(f"e2e one file {n}w", corpora["one_large"], n, force_one)
    for name, (procs, mode) in FLOOR_MODES.items():
        for k, c in enumerate(sizes):
            sides[f"floor {name} {k}"] = functools.partial(floor_run, c, args.tok, procs, mode)
    dt_skipped = None
    if args.skip_datatrove:
        dt_skipped = "--skip-datatrove"
    elif importlib.util.find_spec("datatrove") is None:
        dt_skipped = "datatrove not installed (pip install -e '.[bench]')"
    else:
        for k, c in enumerate(sizes):
            sides[f"datatrove {k}"] = functools.partial(
                datatrove_run, c, args.tok, work, args.workers
            )
    # The per-token path inside a task: the pipeline's process_unit against the floor's loop
    # (the pipeline's own encoding), one process each, on the same files.
    files = sorted(str(p) for p in Path(sizes[0]["path"]).glob("*.jsonl"))[: FILES_PER_SIZE // 3]
    for kind in ("pipeline", "floor"):
        sides[f"per-token {kind}"] = functools.partial(per_token_run, kind, files, args.tok)
    t = interleave(sides, args.repeats)

    # Same work: every side over a corpus read the same bytes and documents as the command.
    for k in range(len(sizes)):
        same_work(t, f"e2e {k}", *(f"floor {m} {k}" for m in FLOOR_MODES))
    same_work(t, "per-token pipeline", "per-token floor")
    same_work(t, "e2e one file 1w", "e2e one file 2w")

    ours = fitted(sizes, _by_size(t, "e2e", len(sizes)))
    floors = {m: fitted(sizes, _by_size(t, f"floor {m}", len(sizes))) for m in FLOOR_MODES}
    dt_fit = None if dt_skipped else fitted(sizes, _by_size(t, "datatrove", len(sizes)))
    datatrove: dict[str, Any] = (
        {"skipped": dt_skipped}
        if dt_fit is None
        else {"version": importlib.metadata.version("datatrove"), "workers": args.workers, **dt_fit}
    )
    last = len(sizes) - 1
    whole = ratio(t, f"e2e {last}", f"floor 2p-documents {last}")
    one_2w = bounded(
        ratio(t, "e2e one file 2w", "e2e one file 1w"), core_bound(2), f"on {os.cpu_count()} cores"
    )
    per_token = ratio(t, "per-token pipeline", "per-token floor")
    return {
        "samples": {n: s.summary() for n, s in t.items()},
        "logs": logs,
        "end_to_end": {
            "local_below_bytes": threshold,
            "forced_ray": {"multi_file": force_multi, "one_file": force_one},
            "workers": args.workers,
            "multi_file": ours,
            "units": [units(logs[f"e2e {k}"][0][0]) for k in range(len(sizes))],
            "largest_over_floor_2p_documents": whole.to_dict(),
            "one_small_file_s": Spread.of(t["e2e one small file"].seconds).to_dict(),
            "one_large_file": {
                "units": units(logs["e2e one file 2w"][0][0]),
                "2w_over_1w": one_2w.to_dict(),
            },
        },
        "floor": floors,
        "datatrove": datatrove,
        "marginal_over": {
            "floor_2p_documents": _over(ours, floors["2p-documents"]),
            "floor_2p_sentences": _over(ours, floors["2p-sentences"]),
            "datatrove": _over(ours, dt_fit),
        },
        "per_token": {
            "MB": round(sum(Path(f).stat().st_size for f in files) / 1e6, 3),
            "files": len(files),
            "pipeline_MBps": t["per-token pipeline"].rate("bytes").to_dict(),
            "floor_MBps": t["per-token floor"].rate("bytes").to_dict(),
            "pipeline_over_floor": per_token.to_dict(),
        },
    }


# --------------------------------------------------------------------------- stage profile


def _profile_worker(args: tuple[str, str, str]) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.config import InputConfig, PackingConfig
    from pipeline.counters import Counters
    from pipeline.encoding import SentenceEncoder
    from pipeline.packing import BlockPacker, tokenize_batch
    from pipeline.readers import read_documents
    from pipeline.text import normalise, split_sentences
    from pipeline.tokenizer import load_tokenizer
    from pipeline.unit import DOC_BATCH, heldout_hash

    path, tok_path, out_path = args
    packing = PackingConfig()
    loaded = load_tokenizer(tok_path)
    ids = loaded.special_ids
    encoder = SentenceEncoder(
        loaded.tokenizer, eos_id=ids["end_of_sentence"], eod_id=ids["end_of_document"]
    )
    counters = Counters()
    times: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - t0
        return result

    docs = timed(
        "read + JSON parse",
        lambda: list(read_documents(LocalFileSystem(), path, path, InputConfig(), counters)),
    )
    paragraphs = timed("normalise", lambda: [normalise(d.text) for d in docs])
    sentences = timed("sentence split", lambda: [split_sentences(p) for p in paragraphs])
    pairs = [(d.doc_id, s) for d, s in zip(docs, sentences, strict=True) if s]

    def tokenize() -> list[Any]:
        return [
            tokenize_batch(
                pairs[i : i + DOC_BATCH],
                encoder,
                max_sentence_tokens=packing.max_sentence_tokens,
                counters=counters,
            )
            for i in range(0, len(pairs), DOC_BATCH)
        ]

    tokenized = timed("tokenize", tokenize)

    def bookkeeping() -> None:
        for batch in tokenized:
            for doc_id in batch.doc_ids:
                heldout_hash(doc_id, packing.seed)
            counters.add("documents_train", len(batch.doc_ids))
            for n in batch.doc_pieces.tolist():
                counters.add_document_sentences(n)

    timed("held-out hash + counters", bookkeeping)

    def pack() -> list[Any]:
        packer = BlockPacker(packing.sentences_per_block)
        blocks = [packer.add(batch) for batch in tokenized] + [packer.flush()]
        for b in blocks:
            counters.add_sentence_lengths(b.sentence_lengths)
        return blocks

    blocks = timed("pack", pack)
    timed(
        "Parquet write (zstd)",
        lambda: pq.write_table(
            pa.concat_tables([b.table() for b in blocks]),
            out_path,
            compression="zstd",
            row_group_size=packing.row_group_blocks,
        ),
    )

    def sha256() -> str:
        digest = hashlib.sha256()
        with open(out_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    timed("sha256", sha256)
    return times


def profile(args: argparse.Namespace, work: Path, corpora: dict, mb: float) -> dict[str, Any]:
    src = sorted(Path(corpora["sizes"][-1]["path"]).glob("*.jsonl"))
    folder = work / "profile"
    folder.mkdir()
    size = 0
    with open(folder / "slice.jsonl", "wb") as out:
        for f in src:
            with open(f, "rb") as fh:
                for line in fh:
                    if size >= mb * 1e6:
                        break
                    out.write(line)
                    size += len(line)
    slice_mb = size / 1e6
    job = (str(folder / "slice.jsonl"), args.tok, str(folder / "slice.parquet"))
    with mp.get_context("spawn").Pool(1, initializer=_one_thread) as pool:
        times = pool.apply(_profile_worker, (job,))
    total = sum(times.values())
    stages = {
        k: {"s": round(v, 3), "MBps": round(slice_mb / v, 1), "share": round(v / total, 3)}
        for k, v in times.items()
    }
    return {"MB": round(slice_mb, 3), "total_s": round(total, 3), "stages": stages}


# ---------------------------------------------------------------------------------- report


def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal against its median (a fit's value for marginal rates); a flagged ratio (over
    what the hardware allows) is not a value."""
    e2e, over = report["end_to_end"], report["marginal_over"]
    one = e2e["one_large_file"]["2w_over_1w"]
    values = {
        "marginal_over_floor_2p_documents": (over["floor_2p_documents"] or {}).get("ratio"),
        "marginal_over_datatrove": (over["datatrove"] or {}).get("ratio"),
        "one_small_file_s": e2e["one_small_file_s"]["median"],
        "one_file_2w_over_1w": None if one["flag"] else one["median"],
        "per_token_over_floor": report["per_token"]["pipeline_over_floor"]["median"],
    }
    out = {}
    for name, value in values.items():
        target = GOALS[name]
        upper = name.endswith("_s")  # a time: at most; a ratio: at least
        met = None if value is None else (value <= target if upper else value >= target)
        out[name] = {
            "value": None if value is None else round(value, 3),
            "goal": f"{'<=' if upper else '>='} {target}",
            "met": met,
        }
    return out


def _fit_row(name: str, f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return [name, "n/a", "n/a", "n/a"]
    return [
        name,
        f"{f['marginal_MBps']:.2f} ± {f['marginal_MBps_se']:.2f}",
        f"{f['fixed_s']:.2f} ± {f['fixed_s_se']:.2f}",
        f"{f['r2']:.3f}",
    ]


def _ratio_cell(r: dict[str, Any]) -> str:
    if r.get("flag"):
        return f"noise: {r['flag']}"
    return f"{r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f})"


def _over_cell(r: dict[str, float] | None) -> str:
    return "n/a" if r is None else f"{r['ratio']:.3f} ± {r['se']:.3f}"


def report_markdown(report: dict[str, Any]) -> str:
    c, e2e = report["corpora"], report["end_to_end"]
    sizes = " / ".join(f"{x['MB']} MB ({x['files']} files)" for x in c["sizes"])
    lines = [
        f"corpora: {sizes}; one file {c['one_large']['MB']} MB; one small file "
        f"{c['one_small']['MB']} MB. {report['repeats']} interleaved repeats, "
        f"{report['environment_cpus']} cores.",
        "",
        "Marginal rate and fixed cost: a least-squares line through every repeat of every size "
        "(± one standard error).",
        "",
    ]
    forced = " (Ray forced)" if e2e["forced_ray"]["multi_file"] else ""
    dt = report["datatrove"]
    rows = [
        _fit_row(f"gpthf preprocess, {e2e['workers']} workers{forced}", e2e["multi_file"]),
        _fit_row("floor, 2 processes, a document per call", report["floor"]["2p-documents"]),
        _fit_row("floor, 2 processes, a sentence per call", report["floor"]["2p-sentences"]),
        _fit_row(f"datatrove {dt.get('version', '')} ({dt.get('skipped', '')})".replace(" ()", ""),
                 None if "skipped" in dt else dt),
    ]  # fmt: skip
    lines.append(markdown_table(["run", "marginal MB/s", "fixed s", "r²"], rows))
    over = report["marginal_over"]
    pt = report["per_token"]
    rows2 = [
        ["marginal rate over the floor (a document per call)", _over_cell(over["floor_2p_documents"])],
        ["marginal rate over the floor (a sentence per call)", _over_cell(over["floor_2p_sentences"])],
        ["marginal rate over datatrove", _over_cell(over["datatrove"])],
        [f"whole command over the floor, {c['sizes'][-1]['MB']} MB (fixed cost included)",
         _ratio_cell(e2e["largest_over_floor_2p_documents"])],
        [f"per-token path over the floor's loop, one process, {pt['MB']} MB",
         _ratio_cell(pt["pipeline_over_floor"])],
        [f"one file of {c['one_large']['MB']} MB, 2 workers over 1 (end to end)",
         _ratio_cell(e2e["one_large_file"]["2w_over_1w"])],
        ["one small file, as the user runs it (s)",
         f"{e2e['one_small_file_s']['median']:.2f} ({e2e['one_small_file_s']['low']:.2f}-"
         f"{e2e['one_small_file_s']['high']:.2f})"],
    ]  # fmt: skip
    lines += ["", markdown_table(["ratio", "median (min-max) or fit ± se"], rows2)]
    prof = report["profile"]
    lines += ["", f"stage profile, one process, {prof['MB']} MB ({prof['total_s']} s in all):", ""]
    lines.append(
        markdown_table(
            ["stage", "s", "MB/s", "share"],
            [[n, x["s"], x["MBps"], f"{x['share']:.1%}"] for n, x in prof["stages"].items()],
        )
    )
    lines += [""]
    lines.append(
        markdown_table(
            ["goal", "value", "target", ""],
            [
                [n, g["value"], g["goal"], {True: "met", False: "missed", None: "n/a"}[g["met"]]]
                for n, g in report["goals"].items()
            ],
        )
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[20.0, 40.0, 60.0],
                    help="multi-file corpus sizes for the fits (at least three)")  # fmt: skip
    ap.add_argument("--one-file-mb", type=float, default=66.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median, min-max)")
    ap.add_argument("--workers", type=int, default=2, help="workers of the multi-file runs")
    ap.add_argument(
        "--quick", action="store_true", help="sizes 4/8/12 MB, one file 8 MB, profile 2 MB"
    )
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument(
        "--out", help="result JSON (default benchmarks/results/preprocess[_quick].json)"
    )
    args = ap.parse_args()
    profile_mb = PROFILE_MB
    if args.quick:
        args.sizes_mb, args.one_file_mb = [4.0, 8.0, 12.0], 8.0
        profile_mb = 2.0
    if len(set(args.sizes_mb)) < 3:
        sys.exit("--sizes-mb needs at least three different sizes (a fit through two has no error)")
    args.gpthf = str(Path(sys.executable).parent / "gpthf")
    if not Path(args.gpthf).exists():
        sys.exit(f"{args.gpthf} not found: install the project (pip install -e .) in this venv")

    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    sample = ensure_sample_corpus()
    work = Path(tempfile.mkdtemp(prefix="gpthf-bench-"))
    name = "preprocess_quick" if args.quick else "preprocess"
    try:
        t0 = time.perf_counter()
        args.tok = str(work / "tokenizer.json")
        train_tokenizer([str(sample)], args.tok, vocab_size=8192, sample_bytes=20_000_000)
        records = build_records(sample)
        smallest = min(args.sizes_mb)
        corpora: dict[str, Any] = {
            "sizes": [
                write_corpus(work / f"size{k}", records, mb,
                             round(FILES_PER_SIZE * mb / smallest), f"s{k}")
                for k, mb in enumerate(sorted(args.sizes_mb))
            ],
            "one_small": write_corpus(work / "one-small", records, ONE_SMALL_FILE_MB, 1, "one"),
            "one_large": write_corpus(work / "one-large", records, args.one_file_mb, 1, "big"),
        }  # fmt: skip
        print(f"tokenizer and corpora: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        report: dict[str, Any] = {
            "repeats": args.repeats,
            "quick": args.quick,
            "environment_cpus": os.cpu_count(),
            "corpora": {
                k: [{kk: vv for kk, vv in x.items() if kk != "path"} for x in v]
                if isinstance(v, list)
                else {kk: vv for kk, vv in v.items() if kk != "path"}
                for k, v in corpora.items()
            },
        }
        t0 = time.perf_counter()
        report.update(measure(args, work, corpora))
        print(f"timed runs: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        report["profile"] = profile(args, work, corpora, profile_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["goals"] = goals(report)
    md = report_markdown(report)
    report["table"] = md
    path = write_result(name, report, args.out)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"written to {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
