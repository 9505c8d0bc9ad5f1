"""The nightly run: incremental preprocessing plus a dated summary in ``OUT/nightly/<date>.json``.

Preprocessing is incremental and idempotent, so a nightly run processes only the input files
that arrived since the last one; the summary records what it added.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ConfigError, PreprocessConfig


@dataclass(frozen=True)
class NightlySummary:
    date: str
    """The nightly date (YYYY-MM-DD, UTC)."""
    manifest_version: int
    new_inputs: list[str]
    shards_added: list[str]
    counts: dict[str, int]
    """Documents, sentences, tokens, ... added by this run."""
    skipped: dict[str, int]
    """Records skipped by reason."""

    def format(self) -> str:
        c = self.counts
        return (
            f"[nightly {self.date}] {len(self.new_inputs)} new input file(s), "
            f"{len(self.shards_added)} shard(s), {c.get('documents', 0):,} documents, "
            f"{c.get('tokens', 0):,} tokens added; manifest v{self.manifest_version}"
        )


def nightly_date(date: str | None) -> str:
    """``date`` checked (YYYY-MM-DD), or today in UTC."""
    if date is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    try:
        return dt.date.fromisoformat(date).isoformat()
    except ValueError:
        raise ConfigError(f"--date must be YYYY-MM-DD, got {date!r}") from None


def run_nightly(cfg: PreprocessConfig, date: str | None = None) -> NightlySummary:
    """Preprocess what is new and write the summary to ``OUT/nightly/<date>.json``."""
    from pipeline.preprocess import run_preprocess
    from pipeline.storage import filesystem_for, write_bytes_atomic

    day = nightly_date(date)
    result = run_preprocess(cfg)
    run: dict[str, Any] = result.run_stats
    summary = NightlySummary(
        date=day,
        manifest_version=result.version,
        new_inputs=result.new_inputs,
        shards_added=result.shards_added,
        counts=dict(run.get("counts", {})),
        skipped=dict(run.get("skipped", {})),
    )
    fs, root = filesystem_for(cfg.output, cfg.storage)
    write_bytes_atomic(
        fs, f"{root}/nightly/{day}.json", json.dumps(asdict(summary), indent=1).encode()
    )
    return summary
