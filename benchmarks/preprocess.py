"""Preprocessing throughput: ``gpthf preprocess`` as a user runs it, against its floor and datatrove.

    .venv/bin/python benchmarks/preprocess.py [--small-mb 30] [--large-mb 60] [--one-file-mb 66]
        [--repeats 2] [--workers 2] [--skip-datatrove] [--out benchmarks/results/preprocess.json]
    .venv/bin/python benchmarks/preprocess.py --quick      # 6/12 MB, one file of 8 MB, 1 repeat

Every side of every ratio runs in this one invocation on the same text: English JSONL built
from the sample corpus (Shakespeare, ``pipeline.sample_corpus``), its plays cut into paragraphs
on blank lines and grouped into records of 2-5 KB (web-document sized), ``{"text": ...}`` only.
Four corpora: "small" (``--small-mb`` over 48 files), "large" (``--large-mb`` over 96 files,
so both have files of one size), one small file (~0.3 MB) and one large file
(``--one-file-mb``, plus its first half). The one file is 66 MB by default: four pieces of at
most 16 MiB (``input.split_bytes``) and its half two, so that 2 workers share whole rounds of
pieces in both runs and the marginal rate measures scaling; at 40 MB (three pieces, the last a
remainder) it measured mostly where the remainder fell.

- **End to end**: the ``gpthf preprocess`` command in a subprocess (Python start-up, Ray start
  and stop, commit and manifest included), a fresh output each time, best of ``--repeats``.
  Two corpus sizes give a **marginal rate** (extra MB / extra seconds) and the **fixed cost**
  (what the small run spends beyond its MB at that rate). When a pair straddles the command's
  ``local_below_bytes`` (small input is processed without Ray), both runs of the pair get
  ``--local-below-bytes 0`` so that they take the same path (reported as ``forced_ray``); the
  one-small-file run never does: it is the fixed cost a user sees. The work units of each run
  are read from the command's own ``[preprocess]`` line: a file no larger than
  ``input.split_bytes`` is one unit, which a second worker cannot speed up (the ``--quick``
  one-file sizes are below the default).
- **Floor**: the bare loop that bounds preprocessing (json.loads each line, blingfire
  ``text_to_sentences``, ``tokenizers`` ``encode_batch_fast`` without special tokens, nothing
  else), in 1 and 2 spawned processes with one Rayon thread each, on the same small and large
  corpora. ``encode_batch_fast`` (no character offsets) is what the pipeline calls; the floor
  as the issue first measured it (``encode_batch``, 2 processes) is reported beside it as
  ``2p-offsets``. The pipeline encodes a document per call (its sentences joined by the EOS-S
  token, each still tokenized alone: ``pipeline.encoding``), which the sentence-per-call floor
  does not; ``2p-documents`` is the floor with that encoding too, the stricter bound.
- **datatrove** (``pip install datatrove==0.10.1 orjson==3.13.0``: its JsonlReader needs
  orjson; ``--skip-datatrove`` or not installed: skipped): ``JsonlReader -> DocumentTokenizer``
  (the local tokenizer file, no hub; no shuffling, EOD after each document) under
  ``LocalPipelineExecutor(tasks=files, workers=--workers)``, one Rayon thread per worker, in a
  subprocess, same corpora.
- **Per-token path inside a task**: the pipeline's own ``process_unit`` (read, normalise,
  split, tokenize, pack, write and hash shards) against the floor's loop, one spawned process
  each with one Rayon thread, on the same files (a third of the small corpus), timed after
  imports and tokenizer load: the gap to the floor with Ray, start-up and scheduling out of it.
- **Interleaved**: every timed run above is taken in turn within each repeat (end to end,
  floors, datatrove, per-token, then again), best of ``--repeats`` each, so that a slow spell
  on a shared machine costs every side of a ratio alike.
- **Stage profile**: one process, a ~5 MB slice, the pipeline's own per-document functions one
  stage at a time (read + JSON parse, normalise, sentence split, tokenize, pack, held-out hash and
  counters, Parquet write, sha256), seconds, MB/s and share of their sum.

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
import multiprocessing as mp
import os
import platform
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

SMALL_FILES, LARGE_FILES = 48, 96
ONE_SMALL_FILE_MB = 0.3
PROFILE_MB = 5.0
FLOOR_DOC_BATCH = 256
GOALS = {
    "marginal_vs_floor_2p": 0.9,
    "marginal_vs_floor_2p_offsets": 0.9,
    "marginal_vs_floor_2p_documents": 0.9,
    "marginal_vs_datatrove": 0.9,
    "one_small_file_s": 8.0,
    "one_file_2w_over_1w": 1.8,
    "per_token_vs_floor_1p": 0.9,
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
    return {
        "path": str(folder),
        "MB": round(sum(f.stat().st_size for f in files) / 1e6, 3),
        "files": len(files),
    }


def half_of(src: Path, dst_folder: Path) -> dict:
    """The first half (by bytes, whole lines) of a one-file corpus."""
    dst_folder.mkdir(parents=True)
    target, size = src.stat().st_size / 2, 0
    with open(src, "rb") as f, open(dst_folder / f"half-{src.name}", "wb") as out:
        for line in f:
            if size >= target:
                break
            out.write(line)
            size += len(line)
    return describe(dst_folder)


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
) -> tuple[float, str, str]:
    cmd = [gpthf, "preprocess", corpus["path"], "--output", str(out), "--tokenizer", tok]
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
    return wall, where, driver


def units(log: str) -> int | None:
    """Work units of a run, from the command's ``[preprocess] ... in N work unit(s)`` line."""
    m = re.search(r"in (\d+) work unit", log)
    return int(m.group(1)) if m else None


def pair(small: dict, large: dict, t_small: float, t_large: float) -> dict[str, Any]:
    """Marginal rate and fixed cost from two sizes of the same text."""
    d_mb, d_t = large["MB"] - small["MB"], t_large - t_small
    marginal = d_mb / d_t if d_t > 0 else float("inf")
    fixed = t_small - small["MB"] / marginal if d_t > 0 else t_small
    return {
        "small_MB": small["MB"],
        "large_MB": large["MB"],
        "small_s": round(t_small, 3),
        "large_s": round(t_large, 3),
        "marginal_MBps": round(marginal, 3),
        "fixed_s": round(fixed, 3),
        "large_MBps": round(large["MB"] / t_large, 3),
    }


# ------------------------------------------------------------------------------------- floor


def _one_thread() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"


FLOOR_MODES = {
    "1p": (1, "sentences"),
    "2p": (2, "sentences"),
    "2p-offsets": (2, "offsets"),
    "2p-documents": (2, "documents"),
}


def _floor_worker(args: tuple[list[str], str, str]) -> int:
    """The floor's loop over ``files``: ``mode`` "sentences" encodes each sentence (what the
    issue defines), "offsets" the same with ``encode_batch``, "documents" a document per call
    with its sentences joined by the EOS-S token's text (the pipeline's encoding, same ids)."""
    import blingfire
    from tokenizers import Tokenizer

    from pipeline.tokenizer import SPECIAL_TOKENS

    files, tok_path, mode = args
    tok = Tokenizer.from_file(tok_path)
    encode = tok.encode_batch if mode == "offsets" else tok.encode_batch_fast
    eos = SPECIAL_TOKENS["end_of_sentence"]
    n = 0
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
                if docs == FLOOR_DOC_BATCH:
                    n += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
                    batch, docs = [], 0
            if batch:
                n += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    return n


def floor_time(corpus: dict, tok_path: str, procs: int, mode: str = "sentences") -> float:
    files = sorted(str(p) for p in Path(corpus["path"]).glob("*.jsonl"))
    chunks = [files[i::procs] for i in range(procs)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, initializer=_one_thread) as pool:
        pool.map(_floor_worker, [(c, tok_path, mode) for c in chunks])
    return time.perf_counter() - t0


def _per_token_worker(args: tuple[str, list[str], str]) -> float:
    """Seconds one process spends on ``files`` (tokenizer loaded, imports done): the floor's
    bare loop, or the pipeline's own ``process_unit`` (read, normalise, split, tokenize, pack,
    write and hash shards) into a scratch folder."""
    kind, files, tok_path = args
    if kind == "floor":
        t0 = time.perf_counter()
        _floor_worker((files, tok_path, "sentences"))
        return time.perf_counter() - t0
    from pipeline.config import PreprocessConfig
    from pipeline.pieces import WorkUnit
    from pipeline.storage import expand_inputs
    from pipeline.tokenizer import load_tokenizer
    from pipeline.unit import UnitContext, process_unit

    cfg = PreprocessConfig()
    inputs = expand_inputs(files, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="gpthf-bench-unit-") as staging:
        ctx = UnitContext.for_run(cfg, load_tokenizer(tok_path), staging)
        t0 = time.perf_counter()
        for f in inputs:
            process_unit(WorkUnit(f), ctx)
        return time.perf_counter() - t0


def per_token_time(kind: str, files: list[str], tok_path: str) -> float:
    with mp.get_context("spawn").Pool(1, initializer=_one_thread) as pool:
        return float(pool.apply(_per_token_worker, ((kind, files, tok_path),)))


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


def datatrove_time(corpus: dict, tok: str, work: Path, workers: int) -> float:
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
    return wall


def _seconds(result: Any) -> float:
    return float(result[0] if isinstance(result, tuple) else result)


def interleaved(
    runs: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Best of ``repeats`` of every measurement, taken in turn within each repeat (A, B, C, A,
    B, C, ...): a slow spell on a shared machine then costs every side of a ratio alike, where
    measuring one side after the other put whole minutes between them. A measurement returns
    its seconds (or a tuple starting with them). Returns the best results, and the first error
    of each measurement that failed (it is not tried again)."""
    best: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for r in range(repeats):
        for name, fn in runs.items():
            if name in failed:
                continue
            try:
                result = fn()
            except RuntimeError as exc:  # keep the other measurements of this run
                print(exc, file=sys.stderr)
                failed[name] = str(exc).splitlines()[0]
                continue
            if name not in best or _seconds(result) < _seconds(best[name]):
                best[name] = result
            print(f"  repeat {r + 1}/{repeats} {name}: {_seconds(result):.2f}s", file=sys.stderr)
    return best, failed


def measure(args: argparse.Namespace, work: Path, corpora: dict) -> dict[str, Any]:
    """Every timed run of the report, interleaved (see :func:`interleaved`)."""
    threshold = local_below_bytes()

    def forced(*cs: dict) -> bool:
        return threshold is not None and min(c["MB"] * 1e6 for c in cs) < threshold

    small, large = corpora["small"], corpora["large"]
    half, full = corpora["one_half"], corpora["one_large"]
    force_multi, force_one = forced(small, large), forced(half, full)
    out = work / "out"

    def cli(corpus: dict, workers: int | None, force: bool) -> Callable[[], Any]:
        return lambda: run_cli(args.gpthf, corpus, args.tok, out, workers, force)

    runs: dict[str, Callable[[], Any]] = {
        "e2e small": cli(small, args.workers, force_multi),
        "e2e large": cli(large, args.workers, force_multi),
        "e2e one small file": cli(corpora["one_small"], None, False),
    }
    for n in (1, 2):
        runs[f"e2e half {n}w"] = cli(half, n, force_one)
        runs[f"e2e full {n}w"] = cli(full, n, force_one)
    for name, (procs, mode) in FLOOR_MODES.items():
        for size, c in (("small", small), ("large", large)):
            runs[f"floor {name} {size}"] = functools.partial(floor_time, c, args.tok, procs, mode)
    dt_skipped = None
    if args.skip_datatrove:
        dt_skipped = "--skip-datatrove"
    elif importlib.util.find_spec("datatrove") is None:
        dt_skipped = "datatrove not installed"
    else:
        for size, c in (("small", small), ("large", large)):
            runs[f"datatrove {size}"] = functools.partial(
                datatrove_time, c, args.tok, work, args.workers
            )
    # The per-token path inside a task: the pipeline's process_unit against the floor's loop,
    # one process each, on the same files (the small corpus's first third).
    files = sorted(str(p) for p in Path(small["path"]).glob("*.jsonl"))[: SMALL_FILES // 3]
    for kind in ("pipeline", "floor"):
        runs[f"per-token {kind}"] = functools.partial(per_token_time, kind, files, args.tok)
    t, failed = interleaved(runs, args.repeats)

    e2e: dict[str, Any] = {"local_below_bytes": threshold}
    (ts, ws, ds), (tl, wl, dl) = t["e2e small"], t["e2e large"]
    e2e["multi_file"] = {
        **pair(small, large, ts, tl),
        "workers": args.workers,
        "forced_ray": force_multi,
        "units": [units(ws), units(wl)],
        "log": [ws, wl],
        "driver": [ds, dl],
    }
    t1, w1, d1 = t["e2e one small file"]
    e2e["one_small_file"] = {
        "MB": corpora["one_small"]["MB"],
        "s": round(t1, 3),
        "log": w1,
        "driver": d1,
    }
    per_workers = {}
    for n in (1, 2):
        (th, wh, _), (tf, wf, _) = t[f"e2e half {n}w"], t[f"e2e full {n}w"]
        per_workers[str(n)] = {
            **pair(half, full, th, tf),
            "units": [units(wh), units(wf)],
            "log": [wh, wf],
        }
    m1, m2 = (per_workers[k]["marginal_MBps"] for k in ("1", "2"))
    e2e["one_large_file"] = {
        "forced_ray": force_one,
        "workers": per_workers,
        "marginal_2w_over_1w": round(m2 / m1, 3),
    }
    floors = {
        name: pair(small, large, t[f"floor {name} small"], t[f"floor {name} large"])
        for name in FLOOR_MODES
    }
    if dt_skipped is None and "datatrove small" in t and "datatrove large" in t:
        dt: dict[str, Any] = {
            "version": importlib.metadata.version("datatrove"),
            "workers": args.workers,
            **pair(small, large, t["datatrove small"], t["datatrove large"]),
        }
    else:
        failure = failed.get("datatrove small") or failed.get("datatrove large")
        dt = {"skipped": dt_skipped or f"datatrove failed: {failure}"}
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    tp, tf_ = t["per-token pipeline"], t["per-token floor"]
    per_token = {
        "MB": round(mb, 3),
        "files": len(files),
        "pipeline_s": round(tp, 3),
        "floor_s": round(tf_, 3),
        "pipeline_MBps": round(mb / tp, 3),
        "floor_MBps": round(mb / tf_, 3),
        "pipeline_over_floor": round(tf_ / tp, 3),
    }
    return {"end_to_end": e2e, "floor": floors, "datatrove": dt, "per_token": per_token}


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
    src = sorted(Path(corpora["large"]["path"]).glob("*.jsonl"))
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
    e2e = report["end_to_end"]
    ours = e2e["multi_file"]["marginal_MBps"]
    dt = report["datatrove"].get("marginal_MBps")
    values = {
        "marginal_vs_floor_2p": ours / report["floor"]["2p"]["marginal_MBps"],
        "marginal_vs_floor_2p_offsets": ours / report["floor"]["2p-offsets"]["marginal_MBps"],
        "marginal_vs_floor_2p_documents": ours / report["floor"]["2p-documents"]["marginal_MBps"],
        "marginal_vs_datatrove": None if dt is None else ours / dt,
        "one_small_file_s": e2e["one_small_file"]["s"],
        "one_file_2w_over_1w": e2e["one_large_file"]["marginal_2w_over_1w"],
        "per_token_vs_floor_1p": report["per_token"]["pipeline_over_floor"],
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


def print_report(report: dict[str, Any]) -> None:
    c, e2e = report["corpora"], report["end_to_end"]
    print(
        f"corpora: small {c['small']['MB']} MB / {c['small']['files']} files, large "
        f"{c['large']['MB']} MB / {c['large']['files']} files, one file {c['one_large']['MB']} "
        f"MB (and half), one small file {c['one_small']['MB']} MB; {report['cpus']} cores\n"
    )
    print("| run | small s | large s | marginal MB/s | fixed s | large-run MB/s | work units |")
    print("|---|---|---|---|---|---|---|")

    def row(name: str, p: dict[str, Any]) -> None:
        print(
            f"| {name} | {p['small_s']} | {p['large_s']} | {p['marginal_MBps']} | "
            f"{p['fixed_s']} | {p['large_MBps']} | {'/'.join(map(str, p.get('units', [])))} |"
        )

    mf = e2e["multi_file"]
    row(f"gpthf preprocess, {mf['workers']} workers" + (" (Ray forced)" * mf["forced_ray"]), mf)
    for n, p in e2e["one_large_file"]["workers"].items():
        forced = " (Ray forced)" * e2e["one_large_file"]["forced_ray"]
        row(f"gpthf preprocess, one file (half/full), {n} worker(s){forced}", p)
    for n, p in report["floor"].items():
        procs, _, kind = n.partition("-")
        what = {"": "", "offsets": " (encode_batch)", "documents": " (a document per call)"}[kind]
        row(f"floor, {procs[:-1]} process(es){what}", p)
    dt = report["datatrove"]
    if "skipped" in dt:
        print(f"| datatrove | {dt['skipped']} | | | | | |")
    else:
        row(f"datatrove {dt['version']}, {dt['workers']} workers", dt)
    print(f"\none small file ({e2e['one_small_file']['MB']} MB): {e2e['one_small_file']['s']} s")
    print("\nwhere the command's seconds went (its own `[preprocess] driver:` line; the rest of")
    print("the wall time is Python start-up and Ray's shutdown at exit):")
    print(f"- one small file: {e2e['one_small_file']['driver'] or '(no line)'}")
    for mb, line in zip((c["small"]["MB"], c["large"]["MB"]), mf["driver"], strict=True):
        print(f"- {mb} MB, {mf['workers']} workers: {line or '(no line)'}")

    pt = report["per_token"]
    print(
        f"\nper-token path, one process, {pt['MB']} MB in {pt['files']} files: the pipeline's "
        f"process_unit {pt['pipeline_s']} s ({pt['pipeline_MBps']} MB/s), the floor's loop "
        f"{pt['floor_s']} s ({pt['floor_MBps']} MB/s): {pt['pipeline_over_floor']} of the floor"
    )

    prof = report["profile"]
    print(f"\nstage profile, one process, {prof['MB']} MB ({prof['total_s']} s in all):\n")
    print("| stage | s | MB/s | share |")
    print("|---|---|---|---|")
    for name, s in prof["stages"].items():
        print(f"| {name} | {s['s']} | {s['MBps']} | {s['share']:.1%} |")

    print("\n| goal | value | target | |")
    print("|---|---|---|---|")
    for name, g in report["goals"].items():
        met = {True: "met", False: "missed", None: "n/a"}[g["met"]]
        print(f"| {name} | {g['value']} | {g['goal']} | {met} |")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small-mb", type=float, default=30.0)
    ap.add_argument("--large-mb", type=float, default=60.0)
    ap.add_argument("--one-file-mb", type=float, default=66.0)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every measurement")
    ap.add_argument("--workers", type=int, default=2, help="workers of the multi-file runs")
    ap.add_argument("--quick", action="store_true", help="6/12 MB, one file 8 MB, 1 repeat")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = ap.parse_args()
    profile_mb = PROFILE_MB
    if args.quick:
        args.small_mb, args.large_mb, args.one_file_mb, args.repeats = 6.0, 12.0, 8.0, 1
        profile_mb = 2.0
    args.gpthf = str(Path(sys.executable).parent / "gpthf")
    if not Path(args.gpthf).exists():
        sys.exit(f"{args.gpthf} not found: install the project (pip install -e .) in this venv")

    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    sample = ensure_sample_corpus()
    work = Path(tempfile.mkdtemp(prefix="gpthf-bench-"))
    try:
        t0 = time.perf_counter()
        args.tok = str(work / "tokenizer.json")
        train_tokenizer([str(sample)], args.tok, vocab_size=8192, sample_bytes=20_000_000)
        records = build_records(sample)
        corpora = {
            "small": write_corpus(work / "small", records, args.small_mb, SMALL_FILES, "small"),
            "large": write_corpus(work / "large", records, args.large_mb, LARGE_FILES, "large"),
            "one_small": write_corpus(work / "one-small", records, ONE_SMALL_FILE_MB, 1, "one"),
            "one_large": write_corpus(work / "one-large", records, args.one_file_mb, 1, "big"),
        }
        corpora["one_half"] = half_of(
            next(Path(corpora["one_large"]["path"]).glob("*.jsonl")), work / "one-half"
        )
        print(f"tokenizer and corpora: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        report: dict[str, Any] = {
            "benchmark": "preprocess",
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "repeats": args.repeats,
            "quick": args.quick,
            "corpora": {
                k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in corpora.items()
            },
        }
        t0 = time.perf_counter()
        report.update(measure(args, work, corpora))
        print(f"timed runs: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        report["profile"] = profile(args, work, corpora, profile_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["goals"] = goals(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
