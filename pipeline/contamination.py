"""Held-out contamination: documents of the held-out split that have a copy in train.

An output built with deduplication is clean by construction (``pipeline.dedup`` judges both
splits together). This re-checks any output, one built without deduplication or with exact
deduplication only, by reading its inputs again (the manifest lists them; each must be
unchanged), fingerprinting every document (the same pass as deduplication) and comparing every
held-out document with every train document (``exact``: the same normalised text; ``near``:
any LSH band in common). ``gpthf contamination --output OUT`` reports; ``--remove`` also processes again
the inputs that hold contaminated held-out documents, without them, and commits that as a new
manifest version (the train split keeps every document; the held-out shards of those inputs
lose only the copies). The output's fingerprint index is left as it was: the keys of a removed
held-out document stay in it, so with ``--dedup near`` a later near-copy of it is still judged
a copy, which is what removing it asked for.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import settings
from pipeline.config import DedupConfig, PreprocessConfig, StorageConfig
from pipeline.dedup import Deduplicator, fingerprint_unit
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.pieces import WorkUnit, local_map, plan_units
from pipeline.settings import cli
from pipeline.steps import Drop
from pipeline.storage import InputFile, expand_inputs, filesystem_for, join, storage_errors

CONTAMINATED = "heldout_copy_of_train"
"""The skip reason of a held-out document removed as a copy of a train document."""


class ChangedInputsError(UserError):
    pass


@dataclass
class ContaminationConfig:
    """Held-out documents with a copy in train (``gpthf contamination``)."""

    output: str = field(default="", metadata=cli("--output"))
    """The output of `gpthf preprocess` to check."""
    mode: Literal["exact", "near"] = field(default="near", metadata=cli("--mode"))
    """exact (same normalised text) or near (exact, or MinHash LSH as ``--dedup near``)."""
    remove: bool = False
    """Remove the contaminated held-out documents, as a new manifest version."""
    workers: int = 0
    """Concurrent tasks on Ray (0: one per CPU); a small output is checked in this process."""
    local_below_bytes: int = 8 << 20
    """Inputs smaller than this in all are read in this process, without Ray."""
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class ContaminationReport:
    output: str
    mode: str
    version: int
    """The manifest version after the check (a new one when documents were removed)."""
    heldout_documents: int = 0
    train_documents: int = 0
    exact: int = 0
    near: int = 0
    examples: list[str] = field(default_factory=list)
    removed: bool = False

    @property
    def contaminated(self) -> int:
        return self.exact + self.near

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "contaminated": self.contaminated}

    def format(self) -> str:
        share = self.contaminated / self.heldout_documents if self.heldout_documents else 0.0
        lines = [
            f"{self.output} (manifest v{self.version}): {self.contaminated:,} of "
            f"{self.heldout_documents:,} held-out document(s) ({share:.2%}) have a copy among "
            f"{self.train_documents:,} train document(s): {self.exact:,} exact, {self.near:,} "
            f"near ({self.mode})"
        ]
        lines += [f"  {e}" for e in self.examples]
        if self.contaminated and not self.removed:
            lines.append("  (--remove processes their inputs again without them, as a new version)")
        if self.removed:
            lines.append(f"  removed: manifest v{self.version} no longer holds them")
        return "\n".join(lines)


MAX_EXAMPLES = 5


def check_contamination(cfg: ContaminationConfig) -> ContaminationReport:
    from pipeline import preprocess as pp
    from pipeline.distributed import init_ray, ray_map, run_units, run_units_here
    from pipeline.tokenizer import load_tokenizer
    from pipeline.unit import UnitContext, process_unit

    output = cfg.output.rstrip("/")
    if not output:
        raise settings.ConfigError(
            "--output is required: the output of `gpthf preprocess` to check"
        )
    m = Manifest.require(output, cfg.storage)
    m.verify_data(output, (), cfg.storage, mode="exists")  # the tokenizer's sha256
    run_cfg = settings.build(
        PreprocessConfig,
        {k: v for k, v in m.config.items() if k != "storage"},
        where=f"{output}/manifest.json config",
    )
    run_cfg.storage = cfg.storage
    run_cfg.output = output
    if "dedup" not in m.packing:  # (made without deduplication, or before it existed)
        run_cfg.dedup = DedupConfig(mode="none")
    files = [InputFile(e.uri, e.size, e.fingerprint) for e in m.inputs]
    now = {f.uri: f for f in expand_inputs([f.uri for f in files], cfg.storage)}
    changed = [f.uri for f in files if now.get(f.uri) != f]
    if changed:
        raise ChangedInputsError(
            f"{len(changed)} input(s) of {output} changed or are gone since they were processed "
            f"({', '.join(changed[:3])}): the check reads the inputs again and needs them as "
            "they were"
        )
    tok = load_tokenizer(join(output, m.tokenizer.path), cfg.storage)
    run_id = dt.datetime.now(dt.UTC).strftime(pp._RUN_TIME) + "-" + uuid.uuid4().hex[:8]
    staging = join(output, "_staging", run_id)
    ctx = UnitContext.for_run(run_cfg, tok, staging)
    # The output's own MinHash settings where it has them (the defaults otherwise).
    params = {k: v for k, v in (m.packing.get("dedup") or {}).items() if k != "mode"}
    ctx.dedup = DedupConfig(**params, mode=cfg.mode)
    here = not pp._ray_running() and sum(f.size for f in files) < cfg.local_below_bytes
    if not here:
        init_ray()

    def runner(fn: Any, todo: list[WorkUnit], drops: Any) -> list[dict[str, Any]]:
        if here:
            return run_units_here(todo, ctx, fn=fn, drops=drops)
        return run_units(todo, ctx, workers=cfg.workers, fn=fn, drops=drops)

    try:
        units = plan_units(files, run_cfg.input, cfg.storage, local_map if here else ray_map)
        dd = Deduplicator(ctx.dedup, runner(fingerprint_unit, units, None), staging, cfg.storage)
        report = ContaminationReport(output, cfg.mode, m.version)
        drops = _contaminated(dd, _present(output, m, cfg.storage), report)
        if drops and cfg.remove:
            affected = {u.file.uri for u in units if u.key in drops}
            todo = [u for u in units if u.file.uri in affected]
            records = pp._by_file(runner(process_unit, todo, drops))
            plan = pp.Plan(
                todo=[f for f in files if f.uri in affected],
                replaced=[e for e in m.inputs if e.uri in affected],
            )
            run_cfg.on_changed = "replace"
            result = pp._commit(
                run_cfg, output, staging, run_id, tok, m, plan, records, pp.DriverClock()
            )
            report.version, report.removed = result.version, True
    finally:
        pp._remove_staging(staging, cfg.storage)
    return report


def _present(output: str, m: Manifest, storage: StorageConfig) -> dict[bool, set[str]]:
    """The document ids each split's shards hold (by held-out or not): what the inputs hold
    but the output does not (copies skipped by deduplication, held-out documents removed by
    an earlier check, empty documents) is neither contaminated nor a source of contamination."""
    fs, root = filesystem_for(output, storage)
    out: dict[bool, set[str]] = {True: set(), False: set()}
    with storage_errors(output, "read the document ids of"):
        for split in m.splits:
            for ref in m.shards(split):
                with fs.open(join(root, ref.path), "rb") as f:
                    ids = pq.read_table(f, columns=["document_ids"]).column("document_ids")
                out[split == "heldout"].update(pc.list_flatten(ids).to_pylist())
    return out


def _contaminated(
    dd: Deduplicator, present: dict[bool, set[str]], report: ContaminationReport
) -> dict[str, dict[int, Drop]]:
    """Held-out documents with a train copy: (unit key -> ordinal -> why), counted in
    ``report``."""
    train_exact: dict[tuple[int, int], str] = {}
    train_band: dict[int, str] = {}
    for u in dd.units:
        for _, hi, lo, bands, held, doc_id in u.rows():
            if doc_id not in present[held]:
                continue
            if not held:
                report.train_documents += 1
                train_exact.setdefault((hi, lo), u.uri)
                for b in bands:
                    train_band.setdefault(b, u.uri)
    drops: dict[str, dict[int, Drop]] = {}
    for u in dd.units:
        for ordinal, hi, lo, bands, held, doc_id in u.rows():
            if not held or doc_id not in present[True]:
                continue
            report.heldout_documents += 1
            orig = train_exact.get((hi, lo))
            if orig is not None:
                report.exact += 1
            else:
                orig = next((train_band[b] for b in bands if b in train_band), None)
                if orig is None:
                    continue
                report.near += 1
            drops.setdefault(u.key, {})[ordinal] = Drop(CONTAMINATED, orig)
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(f"{doc_id} ({u.uri}): a copy of a train document of {orig}")
    return drops
