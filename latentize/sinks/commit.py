"""Exactly-once output: staged parts, a driver-side tracker, and per-shard commits.

Ray Data gives no hook for "all rows of input shard S have been written" (its Datasink sees
arbitrary blocks, and in 2.60 a FilenameProvider no longer sees the block), so latentize runs
the classic two-phase protocol itself:

1. **Stage** (Ray tasks, :func:`stage_batch`): each batch of encoded rows is written, per shard,
   to ``OUT/_staging/<shard>/part-....parquet`` under a name derived from the rows' indices, so a
   retried task rewrites the same part. Each part reports ``(shard, part, indices)``.
2. **Track** (driver, :class:`ShardTracker`): a shard is complete once the set of indices seen
   equals ``range(total)``, ``total`` coming from the shard's end-of-shard sentinel row.
3. **Commit** (Ray task, :func:`commit_shard`): read the shard's parts, keep each index once,
   sort by index, write the data file and errors file atomically, write the marker last, drop
   the staging folder.

A crash at any point leaves either a marker (the shard is done) or no marker (the shard is
redone from scratch after :meth:`OutputLayout.discard_shard`); nothing is duplicated.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentize.columns import text_column
from latentize.errors import LatentizeError
from latentize.sinks.base import SINKS, tensor_array
from latentize.sinks.layout import OutputLayout

__all__ = ["ERROR_SCHEMA", "Committer", "ShardTracker", "commit_shard", "stage_batch"]

logger = logging.getLogger(__name__)

#: Per-sample columns carried from the source/preprocess stages into the output.
_PASSTHROUGH: dict[str, pa.DataType] = {
    "key": pa.string(),
    "index": pa.int64(),
    "caption": pa.string(),
    "json": pa.string(),
    # Non-fatal findings (bad sidecar, upscaled image), "; "-joined; None when clean.
    "notes": pa.string(),
    "error": pa.string(),
    "stage": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "crop_top": pa.int32(),
    "crop_left": pa.int32(),
}

#: Schema of ``OUT/_errors/*.parquet``.
ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)


def _column(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    if pa.types.is_string(dtype):
        return pa.array(text_column(values, len(values)), type=dtype)
    return pa.array(np.asarray(values).astype(dtype.to_pandas_dtype()), type=dtype)


def stage_batch(
    batch: dict[str, np.ndarray],
    *,
    layout: OutputLayout,
    tensor_columns: list[str],
) -> pa.Table:
    """Ray map_batches function: stage encoded rows per shard; report parts and sentinels.

    Args:
        batch: numpy batch with ``shard``, ``index``, ``total`` (>= 0 on end-of-shard sentinel
            rows), the passthrough columns and the encoder's tensor columns (N, *shape).

    Returns:
        An Arrow table, one row per part or sentinel: ``shard`` (str), ``part`` (str, empty
        for sentinels), ``indices`` (list<int64>: the part's row indices), ``total`` (int64, -1 for parts),
        ``shard_error`` (str or None: why reading the shard stopped early).
    """
    shards = np.asarray(batch["shard"], dtype=object)
    totals = np.asarray(batch["total"])
    out: dict[str, list[Any]] = {"shard": [], "part": [], "indices": [], "total": [], "shard_error": []}
    sentinel = totals >= 0
    for i in np.flatnonzero(sentinel):
        out["shard"].append(shards[i])
        out["part"].append("")
        out["indices"].append(np.zeros(0, dtype=np.int64))
        out["total"].append(int(totals[i]))
        out["shard_error"].append(text_column(batch["error"][i : i + 1], 1)[0])
    rows = ~sentinel
    for shard in sorted(set(shards[rows].tolist())):
        sel = np.flatnonzero(rows & (shards == shard))
        indices = np.asarray(batch["index"])[sel].astype(np.int64)
        columns = {name: _column(np.asarray(batch[name])[sel], dtype) for name, dtype in _PASSTHROUGH.items()}
        for name in tensor_columns:
            columns[name] = tensor_array(np.asarray(batch[name])[sel])
        buf = io.BytesIO()
        pq.write_table(pa.table(columns), buf, compression="zstd")
        # Named by content (its indices) so a retried task overwrites instead of adding a part.
        digest = hashlib.sha1(indices.tobytes()).hexdigest()[:12]
        part = f"{layout.staging_dir(shard)}/part-{int(indices.min()):09d}-{digest}.parquet"
        layout.write_bytes(part, buf.getvalue())
        out["shard"].append(shard)
        out["part"].append(part)
        out["indices"].append(indices)
        out["total"].append(-1)
        out["shard_error"].append(None)
    # An explicit schema: left to Ray, equal-length index lists would become a tensor column in
    # one block and objects in another, which Ray cannot concatenate.
    return pa.table(
        {
            "shard": pa.array(out["shard"], pa.string()),
            "part": pa.array(out["part"], pa.string()),
            "indices": pa.array([i.tolist() for i in out["indices"]], pa.list_(pa.int64())),
            "total": pa.array(out["total"], pa.int64()),
            "shard_error": pa.array(out["shard_error"], pa.string()),
        }
    )


@dataclass
class _ShardState:
    parts: set[str] = field(default_factory=set)
    indices: set[int] = field(default_factory=set)
    total: int | None = None
    error: str | None = None


class ShardTracker:
    """Driver-side bookkeeping: which shards have all their rows staged.

    Duplicated reports (a retried task or actor) are harmless: indices form a set.
    """

    def __init__(self) -> None:
        self._shards: dict[str, _ShardState] = {}
        self._done: set[str] = set()

    def add(self, *, shard: str, part: str, indices: np.ndarray, total: int, shard_error: str | None) -> bool:
        """Records one report; returns True when ``shard`` has just become complete."""
        if shard in self._done:
            # A late duplicate (retried task) of a shard already handed to its commit.
            return False
        state = self._shards.setdefault(shard, _ShardState())
        if part:
            state.parts.add(part)
            state.indices.update(int(i) for i in indices)
        if total >= 0:
            state.total = total
            state.error = shard_error
        return self.complete(shard)

    def complete(self, shard: str) -> bool:
        state = self._shards.get(shard)
        if state is None or state.total is None:
            return False
        return len(state.indices) == state.total and all(0 <= i < state.total for i in state.indices)

    def pop(self, shard: str) -> tuple[list[str], int, str | None]:
        """Removes a complete shard's state; returns ``(parts, total, shard_error)``."""
        state = self._shards.pop(shard)
        self._done.add(shard)
        assert state.total is not None
        return sorted(state.parts), state.total, state.error

    def incomplete(self) -> dict[str, tuple[int, int | None]]:
        """Shards still open: ``shard -> (rows seen, total or None)``."""
        return {s: (len(st.indices), st.total) for s, st in self._shards.items()}


def commit_shard(
    *,
    layout: OutputLayout,
    shard: str,
    url: str,
    parts: list[str],
    total: int,
    shard_error: str | None,
    tensor_columns: list[str],
    folder: str,
    sink_name: str,
    compression: str,
    fingerprint: str,
) -> dict[str, Any]:
    """Merges a complete shard's staged parts into its final files, then writes its marker.

    Returns:
        The marker: shard, source URL, status (``ok``, or ``failed`` when reading the shard
        stopped early), samples / ok / failed counts, files written, config fingerprint.
    """
    started = time.time()
    tables = []
    for part in parts:
        tables.append(pq.read_table(pa.BufferReader(layout.read_bytes(part))))
    files: list[str] = []
    n_ok = n_err = reencoded = 0
    by_stage: dict[str, int] = {}
    if tables:
        table = pa.concat_tables(tables)
        # Keep each index once (a redone batch may have been staged twice), in input order.
        order = np.argsort(table.column("index").to_numpy(), kind="stable")
        table = table.take(pa.array(order))
        idx = table.column("index").to_numpy()
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        table = table.filter(pa.array(keep))
        if table.num_rows != total:
            raise RuntimeError(f"shard {shard}: {table.num_rows} staged rows, expected {total}")
        failed = pc.is_valid(table.column("error"))
        ok = table.filter(pc.invert(failed))
        err = table.filter(failed)
        n_ok, n_err = ok.num_rows, err.num_rows
        for stage in err.column("stage").to_pylist():
            by_stage[stage] = by_stage.get(stage, 0) + 1
        reencoded = sum(1 for note in ok.column("notes").to_pylist() if note and "re-encoded in float32" in note)
        if n_ok:
            sink = SINKS.get(sink_name)
            path = layout.data_path(folder, shard, sink.extension)
            layout.write_bytes(path, sink.serialize(ok, tensor_columns=tensor_columns, compression=compression))
            files.append(path)
        if n_err:
            errors = pa.table(
                {
                    "key": err.column("key"),
                    "shard": pa.array([shard] * n_err, pa.string()),
                    "index": err.column("index"),
                    "stage": err.column("stage"),
                    "error": err.column("error"),
                },
                schema=ERROR_SCHEMA,
            )
            buf = io.BytesIO()
            pq.write_table(errors, buf, compression="zstd")
            path = layout.errors_path(shard)
            layout.write_bytes(path, buf.getvalue())
            files.append(path)
    marker = {
        "shard": shard,
        "url": url,
        "status": "failed" if shard_error else "ok",
        "error": shard_error,
        "samples": total,
        "ok": n_ok,
        "failed": n_err,
        "failed_by_stage": by_stage,
        "reencoded_fp32": reencoded,
        "files": [p[len(layout.root) + 1 :] for p in files],
        "fingerprint": fingerprint,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    layout.write_json(layout.marker_path(shard), marker)
    layout.remove([layout.staging_dir(shard)])
    logger.debug("committed %s (%d ok, %d failed) in %.2fs", shard, n_ok, n_err, time.time() - started)
    return marker


class Committer:
    """The driver's commit loop: feeds stage reports to a :class:`ShardTracker` and commits each
    shard (a :func:`commit_shard` Ray task) as soon as its last row is staged.

    At most ``parallelism`` commits are in flight; the loop waits for one to finish before it
    starts another. Commits are idempotent (same files, marker last), so Ray may retry them.

    Args:
        layout: the output root.
        urls: shard id -> source URL of every shard this run encodes.
        parallelism: commit tasks in flight at most.
        options: the remaining keyword arguments of :func:`commit_shard` (tensor columns,
            folder, sink name, compression, fingerprint).
    """

    def __init__(self, *, layout: OutputLayout, urls: dict[str, str], parallelism: int, **options: Any) -> None:
        import ray

        self._layout = layout
        self._urls = urls
        self._parallelism = max(1, parallelism)
        self._options = options
        # Ray's stubs type only positional remote functions; commit_shard is keyword-only.
        remote: Any = ray.remote(num_cpus=0, max_retries=3, retry_exceptions=True)
        self._task = remote(commit_shard)
        self._tracker = ShardTracker()
        self._in_flight: list[Any] = []
        #: Shards committed and samples they hold, this run.
        self.shards_done = 0
        self.samples_done = 0

    def add(self, reports: dict[str, np.ndarray]) -> None:
        """Takes one batch of :func:`stage_batch` reports (numpy columns)."""
        import ray

        n = len(reports["shard"])
        shard_errors = text_column(reports["shard_error"], n)
        for i in range(n):
            shard = str(reports["shard"][i])
            complete = self._tracker.add(
                shard=shard,
                part=str(reports["part"][i]),
                indices=np.asarray(reports["indices"][i]),
                total=int(reports["total"][i]),
                shard_error=shard_errors[i],
            )
            if not complete:
                continue
            parts, total, shard_error = self._tracker.pop(shard)
            self._in_flight.append(
                self._task.remote(
                    layout=self._layout,
                    shard=shard,
                    url=self._urls[shard],
                    parts=parts,
                    total=total,
                    shard_error=shard_error,
                    **self._options,
                )
            )
            if len(self._in_flight) >= self._parallelism:
                ready, self._in_flight = ray.wait(self._in_flight, num_returns=1)
                self._record(ready)

    def finish(self) -> None:
        """Waits for the commits in flight.

        Raises:
            LatentizeError: a shard never saw all its rows (rows lost inside Ray): it is not
                committed, and a rerun redoes it.
        """
        self._record(self._in_flight)
        self._in_flight = []
        left = self._tracker.incomplete()
        if left:
            raise LatentizeError(
                f"the pipeline ended with incomplete shards (rows seen, total): {left}; rerun to redo them"
            )

    def _record(self, refs: list[Any]) -> None:
        import ray

        for marker in ray.get(refs):
            self.shards_done += 1
            self.samples_done += marker["samples"]
            if marker["status"] != "ok":
                logger.warning("shard %s failed: %s", marker["shard"], marker["error"])
