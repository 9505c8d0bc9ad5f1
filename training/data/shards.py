"""Reading the shards a manifest lists, in order, from local or object-store filesystems: with
Ray Data (``read_shards``) or, for the paths without Ray, with pyarrow (``shard_batches``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.blocks import SCORING_COLUMNS


def arrow_filesystem(uri: str, storage: Any = None) -> tuple[Any, str]:
    """A pyarrow filesystem (wrapping our fsspec one) and the root path it takes."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def shard_batches(uri: str, storage: Any = None, batch_rows: int = 65536) -> Iterator[Any]:
    """The scoring columns of one shard as pyarrow RecordBatches of ``batch_rows`` rows (the
    last one shorter), in file order; no Ray."""
    import pyarrow.parquet as pq

    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(
            batch_size=batch_rows, columns=list(SCORING_COLUMNS)
        )


def read_shards(
    paths: list[str],
    storage: Any = None,
    columns: list[str] | None = None,
    include_paths: bool = False,
) -> Any:
    """A Ray Dataset over ``paths`` (full URIs), rows in file order. ``include_paths`` adds a
    ``path`` column: the file each row came from (as the filesystem names it)."""
    import ray.data

    if not paths:
        raise ValueError("no shards to read")
    fs, _ = arrow_filesystem(paths[0], storage)
    from pipeline.storage import filesystem_for

    stripped = [filesystem_for(p, storage)[1] for p in paths]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray Data's V2 Parquet path lists files by reading every footer on a fresh actor pool:
    # 7-10 s of actor start-up per dataset here, for files whose paths and row counts the
    # manifest already gives (it was a quarter of a small evaluation job's time). The V1
    # reader plans from the paths and samples two files (~1.5 s). The flag is read when the
    # plan is built, so it is restored at once.
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            stripped,
            filesystem=fs,
            columns=list(columns or SCORING_COLUMNS),
            shuffle=None,
            include_paths=include_paths,
            # One read task per file keeps the order trivially the file order.
            override_num_blocks=len(stripped),
        )
    finally:
        ctx.use_datasource_v2 = v2
