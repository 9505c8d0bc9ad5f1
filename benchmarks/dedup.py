"""What deduplication costs and what it reads, under the benchmark protocol.

    python benchmarks/dedup.py [--quick]

Three measurements, one run, written to ``benchmarks/results/dedup[_quick].json`` (+ a table):

1. **MinHash libraries** side by side: rensa (what the pipeline uses) and datasketch, on the
   same shingles of the same documents with the same number of permutations (14 x 8),
   interleaved repeats; documents/s and MB/s of each.
2. **Cost on the preprocessing rate**: ``gpthf preprocess`` with ``--dedup none``, ``exact``
   and ``near`` over corpora of three sizes with no copies in them (so every side tokenizes
   the same documents: asserted), interleaved; the marginal rate of each side is the slope of
   a least-squares fit over the sizes, and the cost is ``1 - rate(side) / rate(none)`` with its
   standard error. Then one corpus with planted copies (exact, and near: a changed date line)
   says how many each mode finds of what was planted, and what the run costs there.
3. **Index reads against the data set's size**: an output of ``small`` documents and one of
   ``8 x small`` (one night each, one key range so the files are large), then one night of the
   same ``night`` documents into each; the run's ``dedup.lookup`` counts (row groups read of
   those in the index, rows read) show the reads follow the night, not the output.

The corpora are the sample corpus's records (benchmarks/preprocess.py) less those the pipeline
would call copies of earlier ones (``distinct``: some plays come in two editions), made distinct per
repetition by a permutation of the words within bands of similar frequency (copies of the
sample corpus are what the pipeline would remove, and would make the sides unequal); ``--quick``
runs in this process without Ray on one core (one tokenizer thread, as a Ray worker of one CPU
runs), the default on Ray with two workers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.preprocess import build_records, clean_env
from benchmarks.protocol import (
    ROOT,
    Run,
    fit_line,
    interleave,
    markdown_table,
    rate_of,
    same_work,
    timed,
    write_result,
)

GOALS = {"exact_cost": 0.05, "near_cost": 0.35}
MODES = ("none", "exact", "near")
_WORD = re.compile(r"[A-Za-z]+")


class Disguise:
    """Rewrites text so that each repetition of the sample corpus is a different corpus:
    every word is mapped to another of similar frequency (bands of 64 ranks), one permutation
    per repetition. Tokenizing it costs about what the original does; no shingle survives."""

    def __init__(self, records: list[str]) -> None:
        counts: Counter[str] = Counter()
        for line in records:
            counts.update(w.lower() for w in _WORD.findall(json.loads(line)["text"]))
        self.ranked = [w for w, _ in counts.most_common()]

    def mapping(self, rep: int) -> dict[str, str]:
        if rep == 0:
            return {}
        rng = random.Random(rep)
        out = {}
        for lo in range(0, len(self.ranked), 64):
            band = self.ranked[lo : lo + 64]
            shuffled = band[:]
            rng.shuffle(shuffled)
            out.update(zip(band, shuffled, strict=True))
        return out

    @staticmethod
    def apply(text: str, m: dict[str, str]) -> str:
        if not m:
            return text
        return _WORD.sub(lambda w: m.get(w.group().lower(), w.group()), text)


def distinct(records: list[str]) -> list[str]:
    """The records without those the pipeline would call a copy of an earlier one (exact or
    near: the sample corpus holds two editions of some plays), so that a corpus built from
    them has no copies and every side of the cost comparison keeps every document."""
    from pipeline.config import DedupConfig
    from pipeline.fingerprints import Fingerprinter
    from pipeline.text import normalise

    fp = Fingerprinter.from_config(DedupConfig(mode="near"))
    paragraphs = [normalise(json.loads(r)["text"]) for r in records]
    bands = fp.band_keys(["\n".join(p) for p in paragraphs])
    seen_exact: set[tuple[int, int]] = set()
    seen_band: set[int] = set()
    out = []
    for r, p, b in zip(records, paragraphs, bands, strict=True):
        e, keys = fp.exact(p), set(b.tolist())
        if e in seen_exact or keys & seen_band:
            continue
        seen_exact.add(e)
        seen_band |= keys
        out.append(r)
    return out


def write_corpus(folder: Path, records: list[str], d: Disguise, mb: float, files: int) -> dict:
    """``files`` JSONL files of ``mb`` MB in all, with no copy of any document in them."""
    folder.mkdir(parents=True)
    per_file, i, n_docs = mb * 1e6 / files, 0, 0
    maps: dict[int, dict[str, str]] = {}
    texts = [json.loads(r)["text"] for r in records]
    for k in range(files):
        size = 0
        with open(folder / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as out:
            while size < per_file:
                rep = i // len(texts)
                m = maps.setdefault(rep, d.mapping(rep))
                line = json.dumps({"text": d.apply(texts[i % len(texts)], m)}) + "\n"
                out.write(line)
                size += len(line.encode())
                i += 1
                n_docs += 1
    size = sum(p.stat().st_size for p in folder.glob("*.jsonl"))
    return {"path": str(folder), "MB": round(size / 1e6, 3), "bytes": size, "documents": n_docs}


def plant_copies(src: dict, folder: Path, fraction: float) -> dict:
    """``src`` plus a file of copies: ``fraction`` of its documents again, half of them exact
    and half with a date line added (a near copy)."""
    shutil.copytree(src["path"], folder)
    rng = random.Random(7)
    texts = [json.loads(line)["text"] for p in sorted(folder.glob("*.jsonl")) for line in p.open()]
    picked = rng.sample(range(len(texts)), int(len(texts) * fraction))
    half = len(picked) // 2
    with open(folder / "zz-copies.jsonl", "w", encoding="utf-8") as out:
        for n, k in enumerate(picked):
            text = texts[k] if n < half else f"Fetched on 2026-12-{n % 28 + 1:02d}.\n\n{texts[k]}"
            out.write(json.dumps({"text": text}) + "\n")
    return {"path": str(folder), "planted_exact": half, "planted_near": len(picked) - half}


def preprocess(gpthf: str, src: str, out: Path, tok: str, mode: str, ray: bool,
               extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    cmd = [gpthf, "preprocess", src, "--output", str(out), "--tokenizer", tok, "--json",
           "--no-plot", "--dedup", mode, *(extra or [])]  # fmt: skip
    cmd += (
        ["--local-below-bytes", "0", "--workers", "2"]
        if ray
        else ["--local-below-bytes", str(1 << 40)]
    )
    # In this process (--quick), one core as a Ray worker of one CPU has it: the tokenizer's
    # threads would otherwise take the second core for processing only, and the fingerprint
    # pass (Python, one thread) would be compared with two cores' work.
    env = clean_env() if ray else clean_env(RAYON_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)["run"]


def minhash_libraries(records: list[str], repeats: int) -> dict[str, Any]:
    from pipeline.config import DedupConfig
    from pipeline.fingerprints import Fingerprinter
    from pipeline.text import normalise

    fp = Fingerprinter.from_config(DedupConfig(mode="near"))
    docs = [fp.shingles(normalise(json.loads(r)["text"])) for r in records]
    docs = [d for d in docs if d]
    n_bytes = sum(len(json.loads(r)["text"].encode()) for r in records)
    perms = fp.bands * fp.rows

    def rensa() -> dict[str, int]:
        from rensa import RMinHash

        for d in docs:
            m = RMinHash(num_perm=perms, seed=fp.seed)
            m.update(d)
            m.digest()
        return {"documents": len(docs), "shingles": sum(map(len, docs))}

    sides = {"rensa": timed(rensa)}
    try:
        import datasketch

        def sketch() -> dict[str, int]:
            for d in docs:
                m = datasketch.MinHash(num_perm=perms, seed=fp.seed)
                m.update_batch([s.encode() for s in d])
                _ = m.hashvalues
            return {"documents": len(docs), "shingles": sum(map(len, docs))}

        sides["datasketch"] = timed(sketch)
    except ImportError:
        print("datasketch not installed (pip install -e '.[bench]'): rensa only", file=sys.stderr)
    samples = interleave(sides, repeats, warmup=True)
    if len(samples) > 1:
        same_work(samples, *samples)
    out: dict[str, Any] = {"bytes": n_bytes, "permutations": perms}
    for name, s in samples.items():
        out[name] = {**s.summary(), "MBps": s.rate("documents").median * n_bytes / len(docs) / 1e6,
                     "docs_per_s": s.rate("documents").to_dict()}  # fmt: skip
    if "datasketch" in samples:
        r = [
            b / a
            for a, b in zip(samples["rensa"].seconds, samples["datasketch"].seconds, strict=True)
        ]
        out["rensa_over_datasketch"] = {
            "median": sorted(r)[len(r) // 2],
            "low": min(r),
            "high": max(r),
        }
    return out


def cost(args: argparse.Namespace, work: Path, records: list[str], d: Disguise) -> dict[str, Any]:
    corpora = [write_corpus(work / f"size{k}", records, d, mb, 2 * (k + 1))
               for k, mb in enumerate(args.sizes_mb)]  # fmt: skip
    sides = {}
    for k, c in enumerate(corpora):
        for mode in MODES:

            def side(c: dict = c, mode: str = mode, k: int = k) -> Run:
                out = work / f"out-{mode}-{k}"
                t0 = time.perf_counter()
                run = preprocess(args.gpthf, c["path"], out, args.tok, mode, args.ray)
                wall = time.perf_counter() - t0
                shutil.rmtree(out)
                counts = run["counts"]
                return Run(wall, {"documents": counts["documents"], "tokens": counts["tokens"]},
                           {"skipped": run.get("skipped", {})})  # fmt: skip

            sides[f"{mode} {k}"] = side
    samples = interleave(sides, args.repeats, log=lambda s: print(s, file=sys.stderr))
    for k in range(len(corpora)):
        same_work(samples, *(f"{m} {k}" for m in MODES))
    fits = {}
    for mode in MODES:
        x = [c["MB"] for c in corpora for _ in range(args.repeats)]
        y = [s for k in range(len(corpora)) for s in samples[f"{mode} {k}"].seconds]
        f = fit_line(x, y)
        rate, se = rate_of(f)
        fits[mode] = {"marginal_MBps": rate, "marginal_MBps_se": se, "fixed_s": f.intercept,
                      "fixed_s_se": f.intercept_se, "r2": f.r2}  # fmt: skip
    base = fits["none"]
    for mode in ("exact", "near"):
        r = fits[mode]["marginal_MBps"] / base["marginal_MBps"]
        rel = ((fits[mode]["marginal_MBps_se"] / fits[mode]["marginal_MBps"]) ** 2
               + (base["marginal_MBps_se"] / base["marginal_MBps"]) ** 2) ** 0.5  # fmt: skip
        fits[mode]["cost"] = 1 - r
        fits[mode]["cost_se"] = r * rel
    planted = plant_copies(corpora[-1], work / "planted", args.planted)
    found: dict[str, Any] = {}
    psamples = interleave(
        {m: timed(lambda m=m: _planted_run(args, planted, work, m, found)) for m in MODES},
        args.repeats,
    )
    for m in MODES:
        found[m]["seconds"] = psamples[m].summary()["seconds"]
    return {"corpora": corpora, "samples": {k: s.summary() for k, s in samples.items()},
            "fits": fits, "planted": {**planted, "runs": found}}  # fmt: skip


def _planted_run(args: argparse.Namespace, planted: dict, work: Path, mode: str,
                 found: dict) -> dict[str, int]:  # fmt: skip
    out = work / f"planted-{mode}"
    run = preprocess(args.gpthf, planted["path"], out, args.tok, mode, args.ray)
    shutil.rmtree(out)
    skipped = run.get("skipped", {})
    found[mode] = {"documents": run["counts"]["documents"],
                   "duplicate_exact": skipped.get("duplicate_exact", 0),
                   "duplicate_near": skipped.get("duplicate_near", 0)}  # fmt: skip
    return {}


def index_reads(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One night of ``night`` one-sentence documents into outputs of two sizes."""
    rng = random.Random(3)

    def doc() -> str:
        return " ".join(f"w{rng.randrange(10**9)}" for _ in range(12)) + "."

    night = work / "night.jsonl"
    night.write_text("".join(json.dumps({"text": doc()}) + "\n" for _ in range(args.night)))
    out: dict[str, Any] = {"night_documents": args.night}
    for name, n in (("small", args.small), ("large", 8 * args.small)):
        base = work / f"base-{name}"
        base.mkdir()
        (base / "base.jsonl").write_text(
            "".join(json.dumps({"text": doc()}) + "\n" for _ in range(n))
        )
        dest = work / f"index-{name}"
        extra = ["--dedup.index_buckets", "1"]
        preprocess(args.gpthf, str(base), dest, args.tok, "exact", False, extra)
        shutil.copy(night, base / "night.jsonl")
        run = preprocess(args.gpthf, str(base), dest, args.tok, "exact", False, extra)
        out[name] = {"output_documents": n, **run["dedup"]["lookup"]}
        shutil.rmtree(dest)
    return out


def report_markdown(r: dict[str, Any]) -> str:
    lines = ["# Deduplication", ""]
    mh = r["minhash"]
    rows = [[name, f"{mh[name]['docs_per_s']['median']:,.0f}", f"{mh[name]['MBps']:.1f}"]
            for name in ("rensa", "datasketch") if name in mh]  # fmt: skip
    lines += ["MinHash (14 x 8 permutations, same shingles):", "",
              markdown_table(["library", "documents/s", "MB/s of text"], rows), ""]  # fmt: skip
    if "rensa_over_datasketch" in mh:
        q = mh["rensa_over_datasketch"]
        lines += [f"rensa / datasketch: {q['median']:.1f}x ({q['low']:.1f}-{q['high']:.1f})", ""]
    fits = r["cost"]["fits"]
    rows = []
    for m in MODES:
        f = fits[m]
        c = f"{100 * f['cost']:.1f}% ± {100 * f['cost_se']:.1f}%" if "cost" in f else "-"
        goal = f"<= {100 * GOALS[m + '_cost']:.0f}%" if m != "none" else ""
        rows.append([m, f"{f['marginal_MBps']:.2f} ± {f['marginal_MBps_se']:.2f}",
                     f"{f['fixed_s']:.1f}", c, goal])  # fmt: skip
    lines += ["Marginal preprocessing rate (fit over " + ", ".join(
        f"{c['MB']:.0f}" for c in r["cost"]["corpora"]) + " MB, no copies):", "",
        markdown_table(["dedup", "MB/s", "fixed s", "cost", "goal"], rows), ""]  # fmt: skip
    p = r["cost"]["planted"]
    rows = [[m, p["runs"][m]["documents"], p["runs"][m]["duplicate_exact"],
             p["runs"][m]["duplicate_near"], f"{p['runs'][m]['seconds']['median']:.1f}"]
            for m in MODES]  # fmt: skip
    lines += [f"Planted copies: {p['planted_exact']} exact, {p['planted_near']} near (a date line):",
              "", markdown_table(["dedup", "documents kept", "exact found", "near found", "s"], rows),
              ""]  # fmt: skip
    ix = r["index"]
    rows = [[n, f"{ix[n]['output_documents']:,}", f"{ix[n]['index_rows']:,}",
             f"{ix[n]['row_groups_read']} / {ix[n]['row_groups_total']}", f"{ix[n]['rows_read']:,}"]
            for n in ("small", "large")]  # fmt: skip
    lines += [f"Index reads of a night of {ix['night_documents']} documents:", "",
              markdown_table(["output", "documents", "index rows", "row groups read", "rows read"],
                             rows)]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[20.0, 40.0, 60.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--planted", type=float, default=0.1, help="fraction of copies planted")
    ap.add_argument("--small", type=int, default=20_000, help="documents of the small output")
    ap.add_argument("--night", type=int, default=20, help="documents of the night added")
    ap.add_argument("--quick", action="store_true",
                    help="sizes 2/4/6 MB in one process without Ray; outputs of 10k and 80k documents, a night of 10")  # fmt: skip
    ap.add_argument("--out", help="result JSON (default benchmarks/results/dedup[_quick].json)")
    args = ap.parse_args()
    args.ray = not args.quick
    if args.quick:
        args.sizes_mb, args.small, args.night = [2.0, 4.0, 6.0], 10_000, 10
    args.gpthf = str(Path(sys.executable).parent / "gpthf")
    from pipeline.sample_corpus import ensure_sample_corpus
    from pipeline.tokenizer import train_tokenizer

    sample = ensure_sample_corpus()
    work = Path(tempfile.mkdtemp(prefix="gpthf-dedup-bench-"))
    try:
        args.tok = str(work / "tokenizer.json")
        train_tokenizer([str(sample)], args.tok, vocab_size=8192, sample_bytes=20_000_000)
        records = distinct(build_records(sample))
        d = Disguise(records)
        report = {"quick": args.quick, "repeats": args.repeats, "on_ray": args.ray,
                  "goals": GOALS}  # fmt: skip
        report["minhash"] = minhash_libraries(records, args.repeats)
        report["cost"] = cost(args, work, records, d)
        report["index"] = index_reads(args, work)
        fits = report["cost"]["fits"]
        report["goals_met"] = {m: fits[m]["cost"] <= GOALS[f"{m}_cost"] for m in ("exact", "near")}
        name = "dedup_quick" if args.quick else "dedup"
        path = write_result(name, report, args.out)
        table = report_markdown(report)
        path.with_suffix(".md").write_text(table)
        print(table)
        print(f"wrote {path}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
