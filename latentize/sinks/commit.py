"""Exactly-once output: staged parts, a driver-side tracker, and per-shard commits.

Ray Data gives no hook for "all rows of input shard S have been written" (its Datasink sees
arbitrary blocks, and since Ray 2.60 a FilenameProvider no longer sees the block), so latentize
runs a two-phase protocol itself (docs/architecture.md, "Commit protocol"):

1. **Stage** (Ray tasks, :func:`stage_batch`): the encoded rows of a batch are written, per
   shard and data folder, as a part in the final file format under
   ``OUT/_staging/<shard>/<folder>/part-<first>-<digest>.<ext>``; the name derives from the
   rows' indices, so a retried task rewrites the same part. Only the ok rows go into parts;
   error rows and the end-of-shard sentinel travel to the driver in the stage report.
2. **Track** (driver, :class:`ShardTracker`): a shard is complete once every index in
   ``range(total)`` is covered by a staged part or an error row, ``total`` coming from the
   shard's end-of-shard sentinel row.
3. **Commit** (Ray task, :func:`commit_shard`): each chosen part is *published* under its final
   name (a hard link on local disks, a server-side copy on object stores: no latent byte is
   read back or uploaded twice), the errors table is written from the reported error rows,
   and the marker last. The driver deletes committed shards' staging in bulk.

A crash at any point leaves either a marker (the shard is done) or no marker (the shard is
redone after :meth:`OutputLayout.discard`, which finds its leftovers from the staging area).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentize.columns import ENCODE_STARTED, FLIGHT_TYPES, REENCODED, flight_array, prompt_values, text_column
from latentize.errors import LatentizeError
from latentize.sinks.base import FIXED_SHAPE_TENSOR, SINKS, prompt_array, tensor_array
from latentize.sinks.contract import ERROR_SCHEMA, WHOLE_SAMPLE, ErrorRow, Marker, errors_table
from latentize.sinks.layout import OutputLayout

__all__ = [
    "ENCODE_STARTED",
    "ERROR_SCHEMA",
    "REPORT_SCHEMA",
    "Committer",
    "Part",
    "ShardTracker",
    "commit_shard",
    "stage_batch",
]

logger = logging.getLogger(__name__)

#: Per-sample columns carried from the source/preprocess stages into the output; ``notes``
#: holds the non-fatal findings (bad sidecar, upscaled image), "; "-joined, None when clean.
_PASSTHROUGH: dict[str, pa.DataType] = {
    name: FLIGHT_TYPES[name]
    for name in ("key", "index", "caption", "json", "notes", "width", "height", "crop_top", "crop_left")
}

_PART_TYPE = pa.struct(
    [
        ("folder", pa.string()),
        ("path", pa.string()),
        ("indices", pa.list_(pa.int64())),
        ("bytes", pa.int64()),
        ("reencoded", pa.int64()),
        # The resolution (position in preprocess.resolutions) of the part's rows.
        ("slot", pa.int32()),
    ]
)
_ERROR_TYPE = pa.struct(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("stage", pa.string()),
        ("error", pa.string()),
        # -1: the sample failed as a whole (read, decode); else the resolution that failed.
        ("slot", pa.int32()),
    ]
)

#: What :func:`stage_batch` returns: one row per shard present in the batch. An explicit schema:
#: left to Ray, equal-length index lists would become a tensor column in one block and objects
#: in another, which Ray cannot concatenate.
REPORT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("parts", pa.list_(_PART_TYPE)),
        ("errors", pa.list_(_ERROR_TYPE)),
        # -1, or the number of samples read when the batch holds the shard's sentinel.
        ("total", pa.int64()),
        # Why reading the shard stopped early (sentinel only).
        ("shard_error", pa.string()),
        # The Ray node that read the shard (sentinel only).
        ("read_node", pa.string()),
        # Epoch seconds: when the first encoder call of the batch began (None without one),
        # and when staging the batch ended. Timing only; the driver's run figures.
        ("encode_started", pa.float64()),
        ("staged_at", pa.float64()),
    ]
)


def _stage_part(
    batch: dict[str, np.ndarray],
    rows: np.ndarray,
    *,
    layout: OutputLayout,
    shard: str,
    folder: str,
    tensor_columns: list[str],
    sink_name: str,
    compression: str,
    slot: int,
    tensor_type: str,
    prompt_columns: dict[str, tuple[tuple[int | None, ...], str]],
) -> dict[str, Any]:
    """Writes the ok rows ``rows`` (positions in ``batch``, in index order) as one staged part."""
    sink = SINKS.get(sink_name)
    columns = {name: flight_array(np.asarray(batch[name])[rows], dtype) for name, dtype in _PASSTHROUGH.items()}
    for name in tensor_columns:
        values = np.asarray(batch[name])[rows]
        # A run of several sizes hands over per-row arrays; one part holds one size.
        columns[name] = tensor_array(np.stack(list(values)) if values.dtype == object else values)
    for name, (shape, dtype) in prompt_columns.items():
        # Every row of every folder carries its sample's text columns (each folder stands alone).
        columns[name] = prompt_array(prompt_values(np.asarray(batch[name])[rows], shape, dtype), shape, dtype)
    data = sink.serialize(
        pa.table(columns),
        tensor_columns=tensor_columns,
        compression=compression,
        tensor_type=tensor_type,
        prompt_columns=list(prompt_columns),
    )
    indices = np.asarray(batch["index"])[rows].astype(np.int64)
    # Named by content (its indices) so a retried task overwrites instead of adding a part.
    digest = hashlib.sha1(indices.tobytes()).hexdigest()[:12]
    path = layout.staged_path(shard, folder, int(indices[0]), digest, sink.extension)
    layout.write_bytes(path, data)
    # The encoder actor flags the rows it re-encoded in float32; a batch without the column has none.
    reencoded = int(np.count_nonzero(np.asarray(batch[REENCODED], dtype=bool)[rows])) if REENCODED in batch else 0
    return {
        "folder": folder,
        "path": path,
        "indices": indices.tolist(),
        "bytes": len(data),
        "reencoded": reencoded,
        "slot": slot,
    }


def stage_batch(
    batch: dict[str, np.ndarray],
    *,
    layout: OutputLayout,
    tensor_columns: list[str],
    folder: str,
    sink_name: str,
    compression: str,
    tensor_type: str = FIXED_SHAPE_TENSOR,
    name_folders: bool = False,
    prompt_columns: dict[str, tuple[tuple[int | None, ...], str]] | None = None,
) -> pa.Table:
    """Ray map_batches function: stage the ok rows per shard; report parts, errors, sentinels.

    Args:
        batch: numpy batch with ``shard``, ``index``, ``total`` (>= 0 on end-of-shard sentinel
            rows), ``error``/``stage`` (str or None), ``read_node`` (sentinels), the passthrough
            columns and the encoder's tensor columns (N, *shape). ``folder`` and ``slot``
            columns (what the read tasks' preprocess gives every row) name each row's data folder
            and resolution; a batch without them goes to ``folder``, slot 0.
        folder: the data folder of rows without a ``folder`` column.
        sink_name: the output format (a key of ``SINKS``): parts are written in it.
        tensor_type: ``output.tensor_type``, the Arrow layout of tensor columns in Parquet parts.
        name_folders: the run writes several sizes: the reason of an encode error (one
            resolution's row) names its folder, ``at WxH: ...``.
        prompt_columns: the text encoder's stored columns (name -> per-sample shape, None for
            the varying rows of ``trimmed``, and dtype), in flight as
            :func:`latentize.columns.prompt_flight_type` gives them; None: a run without text.

    Returns:
        An Arrow table of :data:`REPORT_SCHEMA`, one row per shard present in the batch.
    """
    n = len(batch["shard"])
    shards = text_column(batch["shard"], n)
    totals = np.asarray(batch["total"])
    errors = text_column(batch["error"], n)
    stages = text_column(batch["stage"], n)
    keys = text_column(batch["key"], n)
    nodes = text_column(batch.get("read_node"), n)
    folders = text_column(batch["folder"], n) if "folder" in batch else np.full(n, folder, dtype=object)
    slots = np.asarray(batch["slot"]).astype(np.int32) if "slot" in batch else np.zeros(n, np.int32)
    indices = np.asarray(batch["index"]).astype(np.int64)
    called = np.asarray(batch[ENCODE_STARTED], dtype=np.float64) if ENCODE_STARTED in batch else np.zeros(0)
    sentinel = totals >= 0
    failed = ~sentinel & np.array([e is not None for e in errors], dtype=bool)
    ok = ~sentinel & ~failed
    out: list[dict[str, Any]] = []
    for shard in sorted(set(shards.tolist())):
        mine = shards == shard
        report: dict[str, Any] = {"shard": shard, "parts": [], "errors": [], "total": -1}
        for i in np.flatnonzero(mine & sentinel):
            report.update(total=int(totals[i]), shard_error=errors[i], read_node=nodes[i])
        for i in np.flatnonzero(mine & failed):
            # An error row of a sample-wide failure (slot -1) stands for every resolution; a
            # caption the text encoder fails on fails the sample, whatever its resolution.
            slot = int(slots[i]) if stages[i] == "encode" else WHOLE_SAMPLE
            error = errors[i] if slot < 0 or not name_folders else f"at {folders[i]}: {errors[i]}"
            report["errors"].append(
                {"key": keys[i], "index": int(indices[i]), "stage": stages[i], "error": error, "slot": slot}
            )
        for name in sorted(set(folders[mine & ok].tolist())):
            sel = np.flatnonzero(mine & ok & (folders == name))
            sel = sel[np.argsort(indices[sel], kind="stable")]
            report["parts"].append(
                _stage_part(
                    batch,
                    sel,
                    layout=layout,
                    shard=shard,
                    folder=name,
                    tensor_columns=tensor_columns,
                    sink_name=sink_name,
                    compression=compression,
                    slot=int(slots[sel[0]]),
                    tensor_type=tensor_type,
                    prompt_columns=prompt_columns or {},
                )
            )
        out.append(report)
    staged_at = time.time()
    for report in out:
        report.update(encode_started=float(called.min()) if called.size else None, staged_at=staged_at)
    return pa.Table.from_pylist(out, schema=REPORT_SCHEMA)


@dataclass(frozen=True)
class Part:
    """A staged part as the tracker knows it: its data folder, path, row indices and size."""

    folder: str
    path: str
    indices: np.ndarray
    bytes: int
    reencoded: int
    slot: int = 0


@dataclass
class _ShardState:
    parts: dict[str, Part] = field(default_factory=dict)
    errors: dict[tuple[int, int], ErrorRow] = field(default_factory=dict)
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    count: int = 0
    total: int | None = None
    error: str | None = None
    read_node: str | None = None

    def cover(self, indices: np.ndarray) -> int:
        """Marks ``indices`` covered; returns how many were not before."""
        if indices.size == 0:
            return 0
        if indices.min() < 0:
            raise ValueError(f"negative row index in a report: {int(indices.min())}")
        top = int(indices.max()) + 1
        if top > self.seen.size:
            self.seen = np.concatenate([self.seen, np.zeros(max(top, 2 * self.seen.size) - self.seen.size, bool)])
        fresh = np.unique(indices[~self.seen[indices]])
        self.count += int(fresh.size)
        self.seen[fresh] = True
        return int(fresh.size)


@dataclass(frozen=True)
class ShardCommit:
    """Everything :func:`commit_shard` needs about one complete shard."""

    shard: str
    total: int
    parts: list[Part]
    #: The shard's error rows, in (index, slot) order.
    errors: list[ErrorRow]
    shard_error: str | None
    read_node: str | None


class ShardTracker:
    """Driver-side bookkeeping: which shards have all their rows staged or failed.

    Coverage is counted per (row index, resolution slot): a run of ``slots`` resolutions
    writes every sample once per resolution, and a shard is complete when each sample has a
    staged row or an error for each slot (an error of the whole sample covers all its slots).
    Duplicated reports (a retried task or actor) are harmless.
    """

    def __init__(self, *, slots: int = 1) -> None:
        self._slots = slots
        self._shards: dict[str, _ShardState] = {}
        self._done: set[str] = set()
        #: Distinct (sample, resolution) units staged and failed so far, all shards together
        #: (live progress; a sample counts ``slots`` units).
        self.units_ok = 0
        self.units_failed = 0

    def _units(self, indices: np.ndarray, slot: int) -> np.ndarray:
        if slot >= 0:
            return indices * self._slots + slot
        return (indices[:, None] * self._slots + np.arange(self._slots)[None, :]).ravel()

    def add(self, report: dict[str, Any]) -> bool:
        """Records one row of :data:`REPORT_SCHEMA`; True when its shard has just become complete."""
        shard = report["shard"]
        if shard in self._done:
            # A late duplicate (retried task) of a shard already handed to its commit.
            return False
        state = self._shards.setdefault(shard, _ShardState())
        for p in report["parts"]:
            indices = np.asarray(p["indices"], dtype=np.int64)
            slot = int(p.get("slot") or 0)
            part = Part(p["folder"], p["path"], indices, p["bytes"], p["reencoded"], slot)
            state.parts[part.path] = part
            self.units_ok += state.cover(self._units(indices, slot))
        for e in report["errors"]:
            slot = WHOLE_SAMPLE if e.get("slot") is None else int(e["slot"])
            row = ErrorRow(
                key=e["key"], shard=shard, index=int(e["index"]), stage=e["stage"], error=e["error"], slot=slot
            )
            state.errors.setdefault((row.index, slot), row)
            self.units_failed += state.cover(self._units(np.array([row.index], dtype=np.int64), slot))
        if report["total"] >= 0:
            state.total = int(report["total"])
            state.error = report.get("shard_error")
            state.read_node = report.get("read_node")
        return self.complete(shard)

    def complete(self, shard: str) -> bool:
        state = self._shards.get(shard)
        if state is None or state.total is None:
            return False
        # Distinct units seen == total x slots, none out of range: every row is accounted for.
        expected = state.total * self._slots
        return state.count == expected and not state.seen[expected:].any()

    def pop(self, shard: str) -> ShardCommit:
        """Removes a complete shard's state; returns what its commit needs."""
        state = self._shards.pop(shard)
        self._done.add(shard)
        assert state.total is not None
        errors = [state.errors[k] for k in sorted(state.errors)]
        return ShardCommit(shard, state.total, list(state.parts.values()), errors, state.error, state.read_node)

    @property
    def slots(self) -> int:
        return self._slots

    def incomplete(self) -> dict[str, tuple[int, int | None]]:
        """Shards still open: ``shard -> (rows seen (per slot), total or None)``."""
        return {s: (st.count, st.total) for s, st in self._shards.items()}


def choose_parts(parts: list[Part]) -> tuple[list[Part], list[Part]]:
    """Splits a shard's staged parts into ``(publish, merge)``.

    Normally every part holds other rows and all are published as they are. A retried task may
    have staged the same rows again in another grouping: parts whose rows are all in parts
    already chosen are dropped; a data folder where parts overlap only partly cannot be covered
    by whole parts, and all its parts are merged (read back and rewritten; rare).
    """
    publish: list[Part] = []
    merge: list[Part] = []
    for folder in sorted({p.folder for p in parts}):
        mine = sorted((p for p in parts if p.folder == folder), key=lambda p: (int(p.indices[0]), -p.indices.size))
        chosen: list[Part] = []
        covered: set[int] = set()
        clash = False
        for part in mine:
            rows = set(part.indices.tolist())
            if rows <= covered:
                continue
            if rows & covered:
                clash = True
                break
            chosen.append(part)
            covered |= rows
        (merge if clash else publish).extend(mine if clash else chosen)
    return publish, merge


def _merged_part(layout: OutputLayout, shard: str, parts: list[Part], sink_name: str) -> tuple[Part, bytes]:
    """One part from overlapping parts of one folder: each index once, in index order.

    Row ``j`` of a part holds index ``part.indices[j]`` (parts are staged in index order).
    """
    indices = np.concatenate([p.indices for p in parts])
    order, first = np.unique(indices, return_index=True)
    sink = SINKS.get(sink_name)
    data = sink.merge([layout.read_bytes(p.path) for p in parts], first.tolist())
    digest = hashlib.sha1(order.tobytes()).hexdigest()[:12]
    path = layout.staged_path(shard, parts[0].folder, int(order[0]), digest, sink.extension)
    return Part(parts[0].folder, path, order, len(data), sum(p.reencoded for p in parts)), data


def commit_shard(
    *,
    layout: OutputLayout,
    commit: ShardCommit,
    url: str,
    sink_name: str,
    fingerprint: str,
) -> Marker:
    """Publishes a complete shard's staged parts, writes its errors table, then its marker.

    Idempotent: a retried commit publishes the same names and writes the same marker.

    Returns:
        The marker (:class:`~latentize.sinks.contract.Marker`): shard, source URL, status
        (``ok``, or ``failed`` when reading the shard stopped early), samples / ok / failed
        counts, rows per data folder, files (relative paths), bytes of data, the nodes that read
        and committed it, config fingerprint.
    """
    import ray

    started = time.time()
    publish, merge = choose_parts(commit.parts)
    files: list[str] = []
    rows: dict[str, int] = {}
    data_bytes = 0
    for folder in sorted({p.folder for p in merge}):
        part, data = _merged_part(layout, commit.shard, [p for p in merge if p.folder == folder], sink_name)
        logger.warning("shard %s: %s parts overlapped (task retries); merged them", commit.shard, folder)
        layout.write_bytes(part.path, data)
        publish.append(part)
    for part in sorted(publish, key=lambda p: (p.folder, int(p.indices[0]))):
        final = layout.final_path(part.path)
        layout.publish(part.path, final)
        files.append(layout.relative(final))
        rows[part.folder] = rows.get(part.folder, 0) + int(part.indices.size)
        data_bytes += part.bytes
    by_stage: dict[str, int] = {}
    for e in commit.errors:
        by_stage[str(e.stage)] = by_stage.get(str(e.stage), 0) + 1
    if commit.errors:
        buf = io.BytesIO()
        pq.write_table(errors_table(commit.errors), buf, compression="zstd")
        layout.write_bytes(layout.errors_path(commit.shard), buf.getvalue())
        files.append(layout.relative(layout.errors_path(commit.shard)))
    # A sample stored in several folders (one per resolution) is one ok sample.
    n_ok = int(np.unique(np.concatenate([p.indices for p in publish])).size) if publish else 0
    marker = Marker(
        shard=commit.shard,
        url=url,
        status="failed" if commit.shard_error else "ok",
        error=commit.shard_error,
        samples=commit.total,
        ok=n_ok,
        failed=len(commit.errors),
        failed_by_stage=by_stage,
        reencoded_fp32=sum(p.reencoded for p in publish),
        rows=rows,
        files=files,
        bytes=data_bytes,
        read_node=commit.read_node,
        commit_node=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        fingerprint=fingerprint,
        committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    layout.write_json(layout.marker_path(commit.shard), marker.to_json())
    elapsed = time.time() - started
    logger.debug("committed %s (%d ok, %d failed) in %.2fs", commit.shard, n_ok, len(commit.errors), elapsed)
    return marker


class Committer:
    """The driver's commit loop: feeds stage reports to a :class:`ShardTracker`, commits each
    shard (a :func:`commit_shard` Ray task) as soon as its last row is staged, removes committed
    shards' staging in bulk and keeps the ledger of markers.

    At most ``parallelism`` commits are in flight; the loop waits for one to finish before it
    starts another. Commits are idempotent, so Ray may retry them.

    Args:
        layout: the output root.
        urls: shard id -> source URL of every shard this run encodes.
        markers: the markers already committed, as JSON text by shard id (from the plan); new
            ones are added. Text, not parsed dicts: a third of the memory at 230,000 shards.
        parallelism: commit tasks in flight at most.
        sink_name: the output format.
        fingerprint: the run's config fingerprint (recorded in each marker).
        ledger_every_s: seconds between rewrites of ``_ledger.parquet`` during the run.
        slots: resolutions written per sample (``preprocess.resolutions``).
    """

    #: Staged files removed per bulk delete (S3's limit per DeleteObjects request).
    DELETE_BATCH = 1000

    def __init__(
        self,
        *,
        layout: OutputLayout,
        urls: dict[str, str],
        markers: dict[str, str],
        parallelism: int,
        sink_name: str,
        fingerprint: str,
        ledger_every_s: float = 300.0,
        slots: int = 1,
    ) -> None:
        import ray

        self._layout = layout
        self._urls = urls
        self.markers = dict(markers)
        self._parallelism = max(1, parallelism)
        self._options = {"sink_name": sink_name, "fingerprint": fingerprint}
        # Ray's stubs type only positional remote functions; commit_shard is keyword-only.
        # SPREAD: commits are I/O, so they go to every node rather than pile up on the driver's.
        remote: Any = ray.remote(num_cpus=0, max_retries=3, retry_exceptions=True, scheduling_strategy="SPREAD")
        self._task = remote(commit_shard)
        self._tracker = ShardTracker(slots=slots)
        self._in_flight: dict[Any, ShardCommit] = {}
        self._staged_done: list[str] = []
        self._ledger_every_s = ledger_every_s
        self._ledger_at = time.time()
        #: Shards committed this run, the samples they hold (read), and of those the ones
        #: stored and failed (by stage).
        self.shards_done = 0
        self.samples_done = 0
        self.ok_done = 0
        self.failed_done = 0
        self.failed_by_stage: dict[str, int] = {}
        #: Epoch seconds of the first encoder call and of the last part staged (None before).
        self.first_encode_started: float | None = None
        self.last_staged_at: float | None = None

    def add(self, reports: pa.Table) -> None:
        """Takes one block of :func:`stage_batch` reports."""
        import ray

        for report in reports.to_pylist():
            self._time(report)
            if not self._tracker.add(report):
                continue
            commit = self._tracker.pop(report["shard"])
            ref = self._task.remote(layout=self._layout, commit=commit, url=self._urls[commit.shard], **self._options)
            self._in_flight[ref] = commit
            if len(self._in_flight) >= self._parallelism:
                ready, _ = ray.wait(list(self._in_flight), num_returns=1)
                self._record(ready)

    def staged(self) -> tuple[int, int]:
        """Samples staged (encoded) and failed so far, committed or not: live progress. With
        several resolutions, units over the resolution count (a partial failure rounds)."""
        slots = self._tracker.slots
        return self._tracker.units_ok // slots, self._tracker.units_failed // slots

    def _time(self, report: dict[str, Any]) -> None:
        called, staged = report.get("encode_started"), report.get("staged_at")
        if called is not None:
            first = self.first_encode_started
            self.first_encode_started = called if first is None else min(first, called)
        if staged is not None:
            self.last_staged_at = staged if self.last_staged_at is None else max(self.last_staged_at, staged)

    def finish(self) -> None:
        """Waits for the commits in flight, removes the last staged files, writes the ledger.

        Raises:
            LatentizeError: a shard never saw all its rows (rows lost inside Ray): it is not
                committed, and a rerun redoes it.
        """
        self._record(list(self._in_flight))
        self._flush_staging(force=True)
        self._layout.write_ledger(self.markers)
        left = self._tracker.incomplete()
        if left:
            raise LatentizeError(
                f"the pipeline ended with incomplete shards (rows seen, total): {left}; rerun to redo them"
            )

    def _record(self, refs: list[Any]) -> None:
        import ray

        markers: list[Marker] = ray.get(refs)
        for ref, marker in zip(refs, markers, strict=True):
            commit = self._in_flight.pop(ref)
            self.shards_done += 1
            self.samples_done += marker.samples or 0
            self.ok_done += marker.ok
            self.failed_done += marker.failed
            for stage, n in marker.failed_by_stage.items():
                self.failed_by_stage[stage] = self.failed_by_stage.get(stage, 0) + n
            self.markers[marker.shard] = json.dumps(marker.to_json(), separators=(",", ":"))
            self._staged_done.extend(p.path for p in commit.parts)
            if not marker.succeeded:
                logger.warning("shard %s failed: %s", marker.shard, marker.error)
        self._flush_staging()
        if time.time() - self._ledger_at > self._ledger_every_s:
            self._layout.write_ledger(self.markers)
            self._ledger_at = time.time()

    def _flush_staging(self, *, force: bool = False) -> None:
        if self._staged_done and (force or len(self._staged_done) >= self.DELETE_BATCH):
            self._layout.remove_files(self._staged_done)
            self._staged_done = []
