"""Preprocessing driver: check everything early, plan the new inputs, run them, commit."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PreprocessConfig, config_hash
from pipeline.counters import Counters
from pipeline.dedup import Deduplicator, Resolution, fingerprint_unit
from pipeline.dedup_index import Keys, compact, sweep, write_delta
from pipeline.distributed import Drops, UnitFn, init_ray, ray_map, run_units, run_units_here
from pipeline.errors import UserError
from pipeline.manifest import (
    INDEX_DIR,
    SPLITS,
    IndexFileRef,
    InputEntry,
    Manifest,
    ManifestConflict,
    ManifestError,
    ShardRef,
    SpecialToken,
    TokenizerRef,
    create_exclusive,
)
from pipeline.pieces import WorkUnit, local_map, plan_units
from pipeline.stats import build_stats, write_stats
from pipeline.steps import Drop
from pipeline.storage import (
    InputFile,
    StorageError,
    check_writable,
    expand_inputs,
    filesystem_for,
    join,
    protocol_of,
    storage_errors,
)
from pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer
from pipeline.unit import UnitContext, process_unit


class ChangedInputError(UserError):
    pass


@dataclass
class Plan:
    todo: list[InputFile] = field(default_factory=list)
    unchanged: list[InputFile] = field(default_factory=list)
    replaced: list[InputEntry] = field(default_factory=list)
    """Previous manifest entries whose file changed and is re-processed (on_changed=replace)."""


@dataclass
class PreprocessResult:
    output: str
    version: int
    """Manifest version after the run (unchanged when nothing was new)."""
    new_inputs: list[str]
    shards_added: list[str]
    run_stats: dict[str, Any]
    stats: dict[str, Any]

    @property
    def wrote_anything(self) -> bool:
        return bool(self.new_inputs)


class DriverClock:
    """Where the driver's seconds go, phase by phase: printed as one line at the end of a run
    and kept in the run summary (``stats.json``'s ``last_run.seconds``), so that a nightly
    job's fixed costs (Ray start-up, planning, commit, stats) can be told from its work."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.seconds.items())
        return f"[preprocess] driver: {self.total():.1f}s in all: {parts}"


def plan_inputs(inputs: list[InputFile], previous: Manifest | None, on_changed: str) -> Plan:
    plan = Plan()
    done = {e.uri: e for e in (previous.inputs if previous else ())}
    changed = []
    for f in inputs:
        old = done.get(f.uri)
        if old is None:
            plan.todo.append(f)
        elif old.fingerprint == f.fingerprint and old.size == f.size:
            plan.unchanged.append(f)
        else:
            changed.append((f, old))
    if changed and on_changed == "error":
        names = ", ".join(f.uri for f, _ in changed[:5])
        raise ChangedInputError(
            f"{len(changed)} input file(s) changed since they were processed ({names}). Nightly "
            "inputs are expected to be immutable; rerun with --on-changed replace to re-process "
            "them and replace their shards."
        )
    for f, old in changed:
        plan.todo.append(f)
        plan.replaced.append(old)
    return plan


def run_preprocess(cfg: PreprocessConfig, *, progress: bool = False) -> PreprocessResult:
    """Preprocess ``cfg.input.paths`` into ``cfg.output``; incremental and idempotent."""
    clock = DriverClock()
    cfg.validate_for_run()
    output = cfg.output.rstrip("/")
    # Every check that can fail does so before any work is scheduled.
    with clock.phase("checks"):
        inputs = expand_inputs(cfg.input.paths, cfg.storage)
        tok = load_tokenizer(cfg.tokenizer, cfg.storage)
        check_writable(output, cfg.storage)
        previous = Manifest.read(output, cfg.storage)
        identity = cfg.output_identity()
        if previous is not None:
            previous.check_compatible(identity, tok.sha256, output)
            if previous.dedup_index:  # index files merged away over a day ago
                sweep(output, cfg.storage, {r.path for r in previous.dedup_index}, time.time())
        plan = plan_inputs(inputs, previous, cfg.on_changed)
    if not plan.todo:
        assert previous is not None
        return PreprocessResult(output, previous.version, [], [], {}, build_stats(previous))

    run_id = dt.datetime.now(dt.UTC).strftime(_RUN_TIME) + "-" + uuid.uuid4().hex[:8]
    staging = join(output, "_staging", run_id)
    with clock.phase("checks"):
        sweep_staging(output, cfg.storage)
    ctx = UnitContext.for_run(cfg, tok, staging)
    here = _run_here(cfg, plan.todo)
    started_ray = False
    if not here and not _ray_running():
        with clock.phase("Ray start"):  # (or, with RAY_ADDRESS, joining the cluster)
            started_ray = init_ray()
    with clock.phase("plan"):
        units = plan_units(plan.todo, cfg.input, cfg.storage, local_map if here else ray_map)
    split = sum(1 for u in units if u.piece == 0 and u.pieces > 1)
    where = "in this process (small run: Ray not started)" if here else "on Ray"
    print(
        f"[preprocess] {len(plan.todo)} new file(s), {sum(f.size for f in plan.todo) / 1e6:.1f} "
        f"MB, in {len(units)} work unit(s)"
        + (f" ({split} large file(s) cut, {clock.seconds['plan']:.1f}s)" if split else "")
        + f", {where}",
        file=sys.stderr,
        flush=True,
    )

    def runner(fn: UnitFn, todo: list[WorkUnit], drops: Drops | None) -> list[dict[str, Any]]:
        if here:
            return run_units_here(todo, ctx, fn=fn, drops=drops)
        return run_units(
            todo,
            ctx,
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            progress=progress,
            fn=fn,
            drops=drops,
        )

    dedup: DedupRun | None = None
    try:
        if cfg.dedup.mode != "none":
            with clock.phase("fingerprints"):
                fingerprints = _all_records(units, runner(fingerprint_unit, units, None))
            with clock.phase("dedup"):
                dedup = DedupRun(
                    Deduplicator(cfg.dedup, fingerprints, staging, cfg.storage), units, runner
                )
                dedup.decide(output, previous, plan)
        with clock.phase("processing"):
            pieces = _all_records(
                units, runner(process_unit, units, dedup.resolution.drops if dedup else None)
            )
        if dedup is not None:
            dedup.pieces = pieces
    except StorageError as exc:
        _remove_staging(staging, cfg.storage)
        raise StorageError(
            f"{exc} (nothing of this run was committed and what it wrote is removed: the same "
            "command picks up from the last committed version)"
        ) from exc
    except BaseException:
        # Nothing of this run is committed yet: its staging is only garbage, and after a full
        # disk it is what keeps the disk full for the re-run. (Ctrl-C and SIGTERM come here
        # too; a SIGKILLed run's staging is swept by a later run after a day.) The Ray this
        # run started goes down first, so that no worker still writes there, and the scratch
        # folders of the workers it killed go with it.
        if started_ray:
            _stop_own_ray()
        _remove_staging(staging, cfg.storage)
        raise
    result = _commit(
        cfg, output, staging, run_id, tok, previous, plan, _by_file(pieces), clock, dedup
    )
    print(clock.line(), file=sys.stderr, flush=True)
    return result


def _all_records(units: list[WorkUnit], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records``, checked to hold one per unit (a unit without one would lose its data)."""
    missing = {u.key for u in units} - {r["key"] for r in records}
    if missing:
        raise RuntimeError(f"work units produced no record: {sorted(missing)}; nothing committed")
    return records


@dataclass
class DedupRun:
    """A run's deduplication: its decision, and what a rebase needs to decide again."""

    dedup: Deduplicator
    units: list[WorkUnit]
    runner: Any
    """(fn, units, drops) -> records: how this run ran its units (here or on Ray)."""
    resolution: Resolution = field(default_factory=lambda: Resolution({}, Keys.empty()))
    pieces: list[dict[str, Any]] = field(default_factory=list)
    """The processing records of every unit (per piece), as last processed."""

    def decide(
        self, output: str, manifest: Manifest | None, plan: Plan, keep: set[str] | None = None
    ) -> dict[str, dict[int, Drop]]:
        """Decide (again) against ``manifest``; returns the units whose drops changed."""
        replaced = {e.unit for e in plan.replaced}
        live = {e.unit for e in manifest.inputs} - replaced if manifest is not None else set()
        old = self.resolution.drops
        self.resolution = self.dedup.resolve(output, manifest, live, keep)
        r = self.resolution
        print(
            f"[preprocess] dedup ({self.dedup.cfg.mode}): {r.kept:,} document(s) kept, "
            f"{r.exact:,} exact and {r.near:,} near copies skipped; index lookup read "
            f"{r.lookup.row_groups_read} of {r.lookup.row_groups_total} row group(s) in "
            f"{r.lookup.files} file(s) for {r.lookup.keys_asked:,} key(s)",
            file=sys.stderr,
            flush=True,
        )
        # A unit's shards depend only on which of its documents it drops (not on where their
        # originals are), so only a change of those sets sends it back to processing.
        keys = set(old) | set(r.drops) if keep is None else keep
        return {
            k: r.drops.get(k, {}) for k in keys if set(old.get(k, ())) != set(r.drops.get(k, ()))
        }

    def rebase(
        self, output: str, manifest: Manifest, plan: Plan, uris: set[str]
    ) -> list[dict[str, Any]]:
        """Decide the units of ``uris`` again against the winner's ``manifest``; re-process the
        units whose copies changed; returns the per-file records of ``uris``."""
        keep = {u.key for u in self.units if u.file.uri in uris}
        changed = self.decide(output, manifest, plan, keep)
        if changed:
            todo = [u for u in self.units if u.key in changed]
            print(
                f"[preprocess] rebase: {len(todo)} unit(s) hold copies of what the other run "
                "committed: processing them again",
                file=sys.stderr,
                flush=True,
            )
            redone = _all_records(todo, self.runner(process_unit, todo, changed))
            self.pieces = [p for p in self.pieces if p["key"] not in changed] + redone
        return _by_file([p for p in self.pieces if p["uri"] in uris])


def _stop_own_ray() -> None:
    """Shut down the embedded Ray this run started, and remove its killed workers' scratch."""
    import ray

    from pipeline.scratch import sweep_dead

    try:
        ray.shutdown()
    finally:
        sweep_dead(wait_s=5.0)


def _run_here(cfg: PreprocessConfig, todo: list[InputFile]) -> bool:
    """Whether this run is small enough to process without Ray (see ``local_below_bytes``)."""
    if os.environ.get("RAY_ADDRESS") or _ray_running():
        return False
    return sum(f.size for f in todo) < cfg.local_below_bytes


def _ray_running() -> bool:
    """Whether this process is already connected to Ray (never imports Ray to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _by_file(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per input file: the records of its pieces merged, shards in piece order."""
    files: dict[str, dict[str, Any]] = {}
    counters: dict[str, Counters] = {}
    for r in sorted(pieces, key=lambda r: (r["uri"], r["piece"])):
        if r["uri"] not in files:
            files[r["uri"]] = {k: r[k] for k in ("uri", "size", "fingerprint", "unit")}
            files[r["uri"]]["shards"] = []
            counters[r["uri"]] = Counters()
        files[r["uri"]]["shards"].extend(r["shards"])
        counters[r["uri"]].merge(Counters.from_dict(r["stats"]))
    for uri, record in files.items():
        record["stats"] = counters[uri].to_dict()
    return list(files.values())


_RUN_TIME = "%Y%m%dT%H%M%SZ"
STALE_STAGING_S = 24 * 3600
"""A staging folder this old belongs to a run that was killed: no run of ours lasts a day
between writing its first shard and committing (a longer one would lose its staging)."""


STAGING_QUIET_S = 1.0
STAGING_SETTLE_S = 10.0
"""After a failure, a worker of a Ray this run did not start (a cluster, a shared session) may
still finish a shard it was writing while the pool is torn down: staging is removed again until
it has stayed gone for STAGING_QUIET_S, for at most STAGING_SETTLE_S (found by a full-disk test
that left one late shard)."""


def _remove_staging(staging: str, storage: Any = None) -> None:
    fs, path = filesystem_for(staging, storage)
    removed = False
    deadline = time.monotonic() + STAGING_SETTLE_S
    quiet_since = time.monotonic()
    try:
        while True:
            fs.invalidate_cache()
            if fs.exists(path):
                fs.rm(path, recursive=True)
                removed = True
                quiet_since = time.monotonic()
            now = time.monotonic()
            if now - quiet_since >= STAGING_QUIET_S or now >= deadline:
                break
            time.sleep(0.2)
        if removed:
            print(f"[preprocess] removed this run's staging {staging}", file=sys.stderr, flush=True)
    except OSError as exc:  # never hide the error that got us here
        print(f"[preprocess] could not remove {staging}: {exc}", file=sys.stderr, flush=True)


def sweep_staging(output: str, storage: Any = None, now: dt.datetime | None = None) -> list[str]:
    """Remove the staging folders of killed runs (older than ``STALE_STAGING_S``); report the
    younger ones, which may belong to a run still in progress. Returns what was removed."""
    fs, root = filesystem_for(output, storage)
    base = join(root, "_staging")
    now = now or dt.datetime.now(dt.UTC)
    removed, recent = [], []
    with storage_errors(output, "list the staging area of"):
        entries = fs.ls(base, detail=False) if fs.exists(base) else []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        try:
            started = dt.datetime.strptime(name.split("-", 1)[0], _RUN_TIME).replace(tzinfo=dt.UTC)
        except ValueError:
            continue  # not a run folder (the writability probe, a directory marker)
        if (now - started).total_seconds() > STALE_STAGING_S:
            _remove(fs, [entry])
            removed.append(name)
        else:
            recent.append(name)
    if removed:
        print(
            f"[preprocess] removed the staging of {len(removed)} killed run(s): {removed}",
            file=sys.stderr,
        )
    if recent:
        print(
            f"[preprocess] staging of {len(recent)} other run(s) started in the last day "
            f"(running now, or killed): {recent}",
            file=sys.stderr,
        )
    return removed


def _commit(
    cfg: PreprocessConfig,
    output: str,
    staging: str,
    run_id: str,
    tok: Any,
    previous: Manifest | None,
    plan: Plan,
    records: list[dict[str, Any]],
    clock: DriverClock,
    dedup: DedupRun | None = None,
) -> PreprocessResult:
    """Move the staged shards (and index files) into place and commit the next manifest version.

    Runs into one output may overlap (a nightly cron and a manual run): each version number is
    won by exactly one of them (``Manifest.commit``). The loser rebases onto the winner: inputs
    the winner already committed are dropped from its commit (their shards have the same
    deterministic names and bytes), the rest are added under the next version. With
    deduplication, the rest are first decided again against the winner's index: a unit that
    now holds copies of what the winner committed is processed again, under another shard name
    (``pipeline.unit.shard_stem``). Nothing either run processed is lost, nothing is in the
    output twice, and no shard is left on disk unlisted.
    """
    fs, root = filesystem_for(output, cfg.storage)
    _, staging_path = filesystem_for(staging, cfg.storage)
    records = sorted(records, key=lambda r: r["uri"])
    files = {f.uri: f for f in plan.todo}
    moved: set[str] = set()
    index_files: list[tuple[str, int, int, str]] = []
    merged_away: set[str] = set()
    try:
        while True:
            with clock.phase("commit shards"), storage_errors(output, "commit shards to"):
                if dedup is not None and not index_files:
                    index_files = write_delta(
                        staging,
                        cfg.storage,
                        run_id,
                        dedup.resolution.delta,
                        cfg.dedup.index_buckets,
                    )
                    # A key range over index_max_files files is merged (into this run's file).
                    live = {e.unit for e in previous.inputs} if previous else set()
                    live = live - {e.unit for e in plan.replaced} | {r["unit"] for r in records}
                    index_files, merged_away = compact(
                        output,
                        staging,
                        cfg.storage,
                        run_id,
                        previous.dedup_index if previous else (),
                        index_files,
                        live,
                        cfg.dedup.index_max_files,
                    )
                todo = [i["path"] for r in records for i in r["shards"]] + [
                    f[0] for f in index_files
                ]
                todo = [p for p in todo if p not in moved]
                _move_all(fs, staging_path, root, todo)
                moved.update(todo)
                if previous is None:
                    _write_tokenizer(fs, root, tok, output)
            with clock.phase("stats"):
                manifest = _next_manifest(
                    cfg, run_id, tok, previous, plan, records, index_files, merged_away
                )
                added = sorted(i["path"] for r in records for i in r["shards"])
                run_summary = _run_summary(run_id, manifest.version, records, added)
                if dedup is not None:
                    run_summary["dedup"] = dedup.resolution.summary()
                # What the driver spent up to here (the commit and clean-up follow in the log).
                run_summary["seconds"] = {**clock.seconds, "driver_so_far": clock.total()}
                stats = build_stats(manifest, run_summary)
                write_stats(output, stats, cfg.storage, cfg.plot)
            try:
                with clock.phase("manifest"):
                    manifest.commit(output, cfg.storage)  # the commit point
                break
            except ManifestConflict as conflict:
                previous = Manifest.require(output, cfg.storage)
                previous.check_compatible(cfg.output_identity(), tok.sha256, output)
                replan = plan_inputs([files[r["uri"]] for r in records], previous, cfg.on_changed)
                still = {f.uri for f in replan.todo}
                print(
                    f"[preprocess] another run committed manifest v{conflict.version} first; "
                    f"rebasing onto v{previous.version}: {len(records) - len(still)} of my "
                    f"{len(records)} input(s) are already in it",
                    file=sys.stderr,
                )
                records = [r for r in records if r["uri"] in still]
                plan = Plan(todo=replan.todo, replaced=replan.replaced)
                if dedup is not None and records:
                    with clock.phase("dedup"):
                        records = sorted(
                            dedup.rebase(output, previous, plan, still), key=lambda r: r["uri"]
                        )
                    index_files = []  # written again from the new decision
                # What this run moved into place that neither the winner's manifest nor this run's
                # next commit lists (shards of units decided again, the old index files) goes now.
                listed = {i["path"] for r in records for i in r["shards"]} | {
                    ref.path for refs in previous.splits.values() for ref in refs
                }
                orphans = sorted(p for p in moved if p not in listed)
                _remove(fs, [join(root, p) for p in orphans])
                moved -= set(orphans)
                if not records:
                    _remove(fs, [staging_path])
                    return PreprocessResult(
                        output, previous.version, [], [], {}, build_stats(previous)
                    )
    except BaseException:
        # Not committed: this run's index files (named by its run id, so no other run's) go,
        # as its staging does. Its shards stay: their names are deterministic, so the next run
        # that processes these inputs writes them again, and no manifest lists them until then.
        if dedup is not None:
            _remove(fs, [join(root, INDEX_DIR, run_id)])
        raise
    # The commit has happened: clean-up is best effort, and what it leaves is invisible to
    # readers (staging is never listed; replaced shards are no longer in the manifest).
    with clock.phase("clean-up"):
        _remove(
            fs,
            [staging_path]
            + [join(root, rel) for old in plan.replaced for rel in old.shards if rel not in added],
        )
    return PreprocessResult(
        output, manifest.version, [r["uri"] for r in records], added, run_summary, stats
    )


COMMIT_THREADS = 16
"""Shard moves in flight at once: an object store's move is a copy and a delete (tens of ms
each), so a run's hundreds of shards are moved in parallel, not one by one."""


def _move_all(fs: Any, staging: str, root: str, paths: list[str]) -> None:
    """Move staged shards into place; each split's folder is made once, not per shard."""
    if protocol_of(root) == "file":
        for folder in sorted({p.rsplit("/", 1)[0] for p in paths}):
            fs.makedirs(join(root, folder), exist_ok=True)
    if len(paths) <= 1 or protocol_of(root) == "file":
        # A local move is one rename: threads would only add their own cost.
        for p in paths:
            fs.mv(join(staging, p), join(root, p))
        return
    with ThreadPoolExecutor(max_workers=min(COMMIT_THREADS, len(paths))) as pool:
        list(pool.map(lambda p: fs.mv(join(staging, p), join(root, p)), paths))


def _write_tokenizer(fs: Any, root: str, tok: Any, output: str) -> None:
    """The output's first commit stores its tokenizer; a racing first run with another
    tokenizer is refused rather than overwriting it."""
    path = join(root, "tokenizer.json")
    if create_exclusive(fs, path, tok.json.encode()):
        return
    with fs.open(path, "rb") as f:
        if f.read() != tok.json.encode():
            raise ManifestError(
                f"{output}/tokenizer.json was just written by another run with another "
                "tokenizer: write to a new --output, or use that tokenizer"
            )


def _next_manifest(
    cfg: PreprocessConfig,
    run_id: str,
    tok: Any,
    previous: Manifest | None,
    plan: Plan,
    records: list[dict[str, Any]],
    index_files: list[tuple[str, int, int, str]] = (),  # type: ignore[assignment]
    merged_away: set[str] = frozenset(),  # type: ignore[assignment]
) -> Manifest:
    version = (previous.version if previous else 0) + 1
    replaced_units = {e.unit for e in plan.replaced}
    inputs = [e for e in (previous.inputs if previous else ()) if e.unit not in replaced_units]
    inputs += [
        InputEntry(
            uri=r["uri"],
            size=r["size"],
            fingerprint=r["fingerprint"],
            unit=r["unit"],
            added_in_version=version,
            shards=tuple(sorted(i["path"] for i in r["shards"])),
            stats=r["stats"],
        )
        for r in records
    ]
    replaced_shards = {rel for e in plan.replaced for rel in e.shards}
    splits: dict[str, tuple[ShardRef, ...]] = {}
    for split in SPLITS:
        kept = [
            s
            for s in (previous.splits.get(split, ()) if previous else ())
            if s.path not in replaced_shards
        ]
        new = [
            ShardRef(**{**info, "added_in_version": version})
            for r in records
            for info in r["shards"]
            if info["split"] == split
        ]
        splits[split] = tuple(sorted(kept + new, key=lambda s: s.path))
    return Manifest(
        version=version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        run_id=run_id,
        config=cfg.to_dict(redact=True),
        config_hash=config_hash(cfg.output_identity()),
        tokenizer=TokenizerRef(
            source=cfg.tokenizer,
            path="tokenizer.json",
            sha256=tok.sha256,
            vocab_size=tok.vocab_size,
        ),
        special_tokens={
            role: SpecialToken(token=SPECIAL_TOKENS[role], id=i)
            for role, i in tok.special_ids.items()
        },
        packing=cfg.output_identity(),
        inputs=tuple(sorted(inputs, key=lambda e: e.uri)),
        splits=splits,
        dedup_index=tuple(
            r for r in (previous.dedup_index if previous else ()) if r.path not in merged_away
        )
        + tuple(
            IndexFileRef(path=p, bucket=b, rows=n, sha256=h, added_in_version=version)
            for p, b, n, h in index_files
        ),
    )


def _run_summary(
    run_id: str, version: int, records: list[dict[str, Any]], added: list[str]
) -> dict[str, Any]:
    run_counters = Counters()
    for r in records:
        run_counters.merge(Counters.from_dict(r["stats"]))
    summary = {
        "run_id": run_id,
        "version": version,
        "new_inputs": [r["uri"] for r in records],
        "shards_added": added,
        **run_counters.to_dict(),
    }
    summary.pop("sentence_tokens_hist")
    summary.pop("doc_sentences_hist_log2")
    return summary


def _remove(fs: Any, paths: list[str]) -> None:
    for path in paths:
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except OSError as exc:
            print(f"[preprocess] warning: could not remove {path}: {exc}", file=sys.stderr)
