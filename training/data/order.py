"""Training data order: deterministic, seeded, resumable without replaying consumed blocks.

Each epoch the manifest's train shards are permuted (seeded by ``(seed, epoch)``) and dealt to
ranks by a greedy balance on row counts, so every rank reads its own shards and no block is
read twice per epoch. A rank's stream is cut into chunks of ``chunk_rows`` rows; each chunk is
permuted by ``(seed, epoch, rank, chunk)``. Every epoch runs ``min over ranks`` of
``rows // rows_per_step`` steps (the few tail rows of the fuller ranks are counted as dropped),
so all ranks step together.

The cursor is the global step. To resume at step k a rank skips whole shards before its current
chunk (using the manifest's row counts, without reading them) and re-reads at most one chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Shard:
    path: str
    rows: int


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    ranks: list[list[Shard]]
    steps: int
    """Steps every rank runs this epoch."""

    def rank_rows(self, rank: int) -> int:
        return sum(s.rows for s in self.ranks[rank])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([*key])


def epoch_plan(
    shards: list[Shard], world: int, rows_per_step: int, seed: int, epoch: int
) -> EpochPlan:
    order = [int(i) for i in _rng(seed, epoch).permutation(len(shards))]
    position = {shard: p for p, shard in enumerate(order)}
    # Largest first onto the lightest rank balances rows; each rank then reads its shards in
    # the epoch's permuted order.
    owner: dict[int, int] = {}
    load = [0] * world
    for i in sorted(order, key=lambda i: (-shards[i].rows, position[i])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += shards[i].rows
    ranks: list[list[Shard]] = [[shards[i] for i in order if owner[i] == r] for r in range(world)]
    steps = min(load) // rows_per_step
    return EpochPlan(epoch=epoch, ranks=ranks, steps=steps)


def plans_until(
    shards: list[Shard], world: int, rows_per_step: int, seed: int, total_steps: int
) -> list[EpochPlan]:
    """Epoch plans covering global steps [0, total_steps)."""
    plans: list[EpochPlan] = []
    done = 0
    while done < total_steps:
        plan = epoch_plan(shards, world, rows_per_step, seed, len(plans))
        if plan.steps == 0:
            raise ValueError(
                f"the training split is too small: a rank gets {min(plan.rank_rows(r) for r in range(world))} "
                f"blocks per epoch but one step needs {rows_per_step} (workers x micro_batch_rows x "
                "grad_accum); use fewer workers or a smaller batch, or more data"
            )
        plans.append(plan)
        done += plan.steps
    return plans


@dataclass(frozen=True)
class ResumePoint:
    """Where a rank's stream starts when resuming at a global step."""

    epoch_index: int
    """Index into the plans list."""
    step_in_epoch: int
    first_shard: int
    """Index, in the rank's shard list of that epoch, of the shard holding the chunk start."""
    skip_rows: int
    """Rows of that shard before the chunk start (read and discarded)."""
    chunk: int
    row_in_chunk: int
    """Rows of the chunk already consumed (trained on) before the resume."""


def resume_point(
    plans: list[EpochPlan], rank: int, start_step: int, rows_per_step: int, chunk_rows: int
) -> ResumePoint:
    done = 0
    for e, plan in enumerate(plans):
        if start_step < done + plan.steps:
            step = start_step - done
            consumed = step * rows_per_step
            chunk = consumed // chunk_rows
            chunk_start = chunk * chunk_rows
            cum = 0
            for i, s in enumerate(plan.ranks[rank]):
                if cum + s.rows > chunk_start:
                    return ResumePoint(e, step, i, chunk_start - cum, chunk, consumed - chunk_start)
                cum += s.rows
            raise AssertionError("chunk start beyond the rank's rows")
        done += plan.steps
    raise ValueError(f"step {start_step} is beyond the planned {done} steps")


def stream_paths(plans: list[EpochPlan], rank: int, start: ResumePoint) -> list[str]:
    """The shard files a rank reads, in order, from the resume point on."""
    paths = [s.path for s in plans[start.epoch_index].ranks[rank][start.first_shard :]]
    for plan in plans[start.epoch_index + 1 :]:
        paths.extend(s.path for s in plan.ranks[rank])
    return paths


class _Rows:
    """Exact-size takes from an iterator of Arrow tables/batches."""

    def __init__(self, batches: Iterable[pa.Table | pa.RecordBatch]) -> None:
        self._it = iter(batches)
        self._buf: list[pa.Table] = []
        self._n = 0

    def take(self, n: int) -> pa.Table | None:
        if n == 0:
            return None
        while self._n < n:
            try:
                b = next(self._it)
            except StopIteration:
                raise RuntimeError(
                    f"the shard stream ended {n - self._n} rows early: a shard has fewer rows than "
                    "its manifest says (corrupt or replaced data)"
                ) from None
            t = b if isinstance(b, pa.Table) else pa.Table.from_batches([b])
            self._buf.append(t)
            self._n += t.num_rows
        whole = pa.concat_tables(self._buf) if len(self._buf) > 1 else self._buf[0]
        out, rest = whole.slice(0, n), whole.slice(n)
        self._buf, self._n = ([rest] if rest.num_rows else []), rest.num_rows
        return out


def rank_micro_batches(
    batches: Iterable[pa.Table | pa.RecordBatch],
    plans: list[EpochPlan],
    rank: int,
    start_step: int,
    *,
    micro_rows: int,
    grad_accum: int,
    chunk_rows: int,
    seed: int,
) -> Iterator[tuple[int, list[pa.Table]]]:
    """Yield (global step, the rank's grad_accum micro-batches) from ``start_step`` on.

    ``batches`` is the rank's row stream over ``stream_paths(...)`` in order.
    """
    rows_per_step = micro_rows * grad_accum
    start = resume_point(plans, rank, start_step, rows_per_step, chunk_rows)
    rows = _Rows(batches)
    step = start_step
    for e in range(start.epoch_index, len(plans)):
        plan = plans[e]
        used = plan.steps * rows_per_step
        total = plan.rank_rows(rank)
        first = e == start.epoch_index
        if first:
            skipped = sum(s.rows for s in plan.ranks[rank][: start.first_shard])
            rows.take(start.skip_rows)
            position = skipped + start.skip_rows  # rows of this epoch behind us
            chunk = start.chunk
        else:
            position, chunk = 0, 0
        pending: list[pa.Table] = []
        pending_rows = 0
        while position < used:
            n = min(chunk_rows, used - position)
            table = rows.take(n)
            assert table is not None
            perm = _rng(seed, plan.epoch, rank, chunk).permutation(n)
            table = table.take(pa.array(perm))
            if first and chunk == start.chunk:
                table = table.slice(start.row_in_chunk)
            position += n
            chunk += 1
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= rows_per_step:
                merged = pa.concat_tables(pending)
                step_rows, rest = merged.slice(0, rows_per_step), merged.slice(rows_per_step)
                pending = [rest] if rest.num_rows else []
                pending_rows = rest.num_rows
                yield step, [step_rows.slice(i * micro_rows, micro_rows) for i in range(grad_accum)]
                step += 1
        rows.take(total - used)  # this epoch's dropped tail: read past it


def epoch_of_step(plans: list[EpochPlan], step: int) -> int:
    """The epoch that global step ``step`` (the next one to run) belongs to; past the planned
    steps, the epoch after the last."""
    done = 0
    for plan in plans:
        done += plan.steps
        if step < done:
            return plan.epoch
    return plans[-1].epoch + 1


def dropped_rows(plans: list[EpochPlan], rows_per_step: int) -> int:
    return sum(p.rank_rows(r) - p.steps * rows_per_step for p in plans for r in range(len(p.ranks)))
