"""The distributed passes of the QA report over every data row, on Ray Data.

1. **Statistics** (``Dataset.aggregate``): per tensor column a mergeable
   :class:`~latentize.qa.stats.LatentStats` (float latents) or
   :class:`~latentize.qa.stats.CodeUsage` (VQ indices), rows per shard, and the seeded
   reconstruction sample (the ``k`` keys of smallest ``stable_seed(seed, key)``: a bottom-k
   sample is mergeable and does not depend on how rows are split over workers). Accumulators
   travel as bytes, so Ray merges them in its own tree without pickling numpy state.
2. **Findings** (``map_batches`` then ``groupby``): per row a content digest, and for float
   latents the values beyond ``outlier_std`` standard deviations of their channel (known from
   pass 1); rows are grouped on ``d:<digest>`` and ``k:<key>`` (error rows join the key groups),
   and only groups of more than one row (identical latents, repeated keys), outlier rows and the
   sampled rows (with their stored arrays) come back to the driver.

Both passes read only the key and tensor columns of the data files.

Outputs with several data folders (aspect-ratio buckets, several resolutions) keep every
figure per folder: blocks carry their file's ``folder``, statistics and rows are accumulated per
folder (the totals merge them), the sample is drawn over data rows ``(key, folder)``, and a key
is *repeated* only when it is stored twice for one resolution *slot* (or in two shards): a
sample appears once in a folder of each resolution. A sample whose rows miss some slot (its
encoding failed at one resolution) is *partial*; its rows come back to the driver too, which is
what lets the driver count distinct samples from row counts.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentize.qa.stats import CodeUsage, LatentStats
from latentize.registry import Registry
from latentize.sinks.base import canonical_tensor, tensor_array, tensor_numpy
from latentize.sinks.contract import Marker
from latentize.sinks.layout import OutputLayout
from latentize.tarnames import KEY_MEMBER

__all__ = [
    "DataFile",
    "DataFilesDatasource",
    "Findings",
    "ScanState",
    "TensorColumn",
    "find_rows",
    "key_verdict",
    "missing_slots",
    "read_data_file",
    "scan_statistics",
    "split_folders",
    "tensor_values",
]

logger = logging.getLogger(__name__)

#: Rows per block read from a data file.
ROWS_PER_BLOCK = 1024
#: Outlier rows returned to the driver (the most extreme first); the count is always exact.
OUTLIER_LIMIT = 100


@dataclass(frozen=True)
class DataFile:
    """One committed data file: its path under the output's filesystem, its shard id and its
    data folder (``WxH``; empty for a file at the root)."""

    path: str
    shard: str
    folder: str = ""


@dataclass(frozen=True)
class TensorColumn:
    """A stored tensor column: name, per-row shape, numpy dtype name, and whether it holds
    VQ codebook indices (then ``codebook_size`` is set)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codebook_size: int | None = None

    @property
    def is_index(self) -> bool:
        return self.codebook_size is not None


# --- reading the data files ---------------------------------------------------------------

DataReader = Callable[[OutputLayout, DataFile, list[TensorColumn]], Iterator[pa.Table]]

#: Data file readers by ``output.format``.
DATA_READERS: Registry[DataReader] = Registry("output format", config_key="output.format")


def _block(keys: list[str], data: DataFile, arrays: dict[str, np.ndarray]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array([data.shard] * len(keys), pa.string()),
        "folder": pa.array([data.folder] * len(keys), pa.string()),
    }
    for name, values in arrays.items():
        columns[name] = tensor_array(values)
    return pa.table(columns)


def _with_origin(table: pa.Table, data: DataFile) -> pa.Table:
    n = table.num_rows
    table = table.append_column("shard", pa.array([data.shard] * n, pa.string()))
    return table.append_column("folder", pa.array([data.folder] * n, pa.string()))


def split_folders(block: pa.Table) -> list[tuple[str, pa.Table]]:
    """A block's rows by data folder, ``[(folder, rows)]`` in folder order.

    Ray may concatenate blocks of several data files (and so of several folders) before an
    aggregation; each folder's rows share their tensor shapes.
    """
    folders = block.column("folder")
    unique = sorted(str(f) for f in pc.unique(folders).to_pylist())
    if len(unique) == 1:
        return [(unique[0], block)]
    return [(f, block.filter(pc.equal(folders, f))) for f in unique]


def tensor_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A tensor column whose rows share one shape -> (N, *shape) numpy array.

    Blocks of one data file hold canonical ``arrow.fixed_shape_tensor`` columns; when Ray
    concatenates blocks of different shapes it turns them into its variable-shaped tensor
    type, whose rows are read one by one here.
    """
    if isinstance(column.type, pa.FixedShapeTensorType):
        return tensor_numpy(column)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    rows = [np.asarray(row) for chunk in chunks for row in chunk.to_numpy(zero_copy_only=False)]
    return np.stack(rows)


@DATA_READERS.register("parquet")
def _read_parquet(layout: OutputLayout, data: DataFile, columns: list[TensorColumn]) -> Iterator[pa.Table]:
    with layout.fs.open(data.path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=ROWS_PER_BLOCK, columns=["key", *(c.name for c in columns)]):
            # Canonical fixed-shape tensors pass through; nested lists (output.tensor_type: list)
            # become canonical tensors, so that every block has one type whatever the layout.
            table = pa.Table.from_batches([batch])
            for c in columns:
                i = table.schema.get_field_index(c.name)
                table = table.set_column(i, c.name, canonical_tensor(table.column(c.name)))
            yield _with_origin(table, data)


@DATA_READERS.register("webdataset")
def _read_tar(layout: OutputLayout, data: DataFile, columns: list[TensorColumn]) -> Iterator[pa.Table]:
    """A data tar's samples: consecutive members of one member key, as WebDataset's reader
    groups them. Members are split on the known extensions, which gives WebDataset's split for
    member keys written by :func:`~latentize.tarnames.member_key` and still reads outputs
    written before keys were escaped (dots kept in member names). A sample's key is its
    ``KEY.key.txt`` member when it has one (a key written escaped), else its member key."""
    wanted = {f"{c.name}.npy": c.name for c in columns}
    suffixes = [f".{ext}" for ext in (*wanted, KEY_MEMBER)]

    def split(name: str) -> tuple[str, str] | None:
        for suffix in suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], suffix[1:]
        return None

    keys: list[str] = []
    values: dict[str, list[np.ndarray]] = {c.name: [] for c in columns}
    incomplete: list[str] = []

    def finish(member: str | None, sample: dict[str, Any]) -> None:
        if member is None:
            return
        key = sample.pop(KEY_MEMBER, member)
        if len(sample) < len(columns):
            incomplete.append(key)
            return
        keys.append(key)
        for name, array in sample.items():
            values[name].append(array)

    def flush() -> Iterator[pa.Table]:
        if keys:
            yield _block(list(keys), data, {c.name: np.stack(values[c.name]) for c in columns})
            keys.clear()
            for v in values.values():
                v.clear()

    current: str | None = None
    sample: dict[str, Any] = {}
    with layout.fs.open(data.path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            found = split(member.name)
            if not member.isfile() or found is None:
                continue
            base, ext = found
            if base != current:
                finish(current, sample)
                current, sample = base, {}
                if len(keys) >= ROWS_PER_BLOCK:
                    yield from flush()
            extracted = tar.extractfile(member)
            assert extracted is not None
            raw = extracted.read()
            if ext == KEY_MEMBER:
                sample[KEY_MEMBER] = raw.decode("utf-8")
            else:
                sample[wanted[ext]] = np.load(io.BytesIO(raw), allow_pickle=False)
    finish(current, sample)
    yield from flush()
    if incomplete:
        logger.warning("%s: %d key(s) lack some tensor members: %s", data.path, len(incomplete), incomplete[:5])


def read_data_file(
    layout: OutputLayout, data: DataFile, *, fmt: str, columns: list[TensorColumn]
) -> Iterator[pa.Table]:
    """Streams a data file as Arrow blocks: ``key``, ``shard``, ``folder`` and the tensor
    columns (canonical ``arrow.fixed_shape_tensor``), at most :data:`ROWS_PER_BLOCK` rows each."""
    return DATA_READERS.get(fmt)(layout, data, columns)


def _datasource_class() -> type:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _DataFilesDatasource(Datasource):
        """One read task per committed data file."""

        def __init__(
            self, *, layout: OutputLayout, files: list[DataFile], fmt: str, columns: list[TensorColumn]
        ) -> None:
            self._layout = layout
            self._files = files
            self._fmt = fmt
            self._columns = columns

        def get_name(self) -> str:
            return "LatentizeOutput"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            tasks = []
            for data in self._files:

                def read(data: DataFile = data) -> Iterator[pa.Table]:
                    return read_data_file(self._layout, data, fmt=self._fmt, columns=self._columns)

                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=(data.path,), exec_stats=None)
                tasks.append(ReadTask(read, meta))
            return tasks

    return _DataFilesDatasource


def DataFilesDatasource(*, layout: OutputLayout, files: list[DataFile], fmt: str, columns: list[TensorColumn]) -> Any:
    """A Ray Data datasource over an output's committed data files (Ray is imported lazily so
    that this module imports without Ray)."""
    return _datasource_class()(layout=layout, files=files, fmt=fmt, columns=columns)


# --- pass 1: statistics ---------------------------------------------------------------------


def sample_priority(seed: int, key: str) -> int:
    """The reconstruction sample is the keys of smallest priority: a seeded hash of the key, so
    the same seed picks the same keys however the rows are split over workers."""
    digest = hashlib.sha256(f"qa\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


#: Per-column accumulators of one data folder.
FolderStats = dict[str, LatentStats | CodeUsage]


class ScanState:
    """Mergeable result of pass 1 (see the module docstring).

    Attributes:
        folders: data folder -> column -> accumulator (a folder appears once it has rows).
        rows: data rows by shard.
        folder_rows: data rows by shard, then data folder.
    """

    def __init__(self, *, columns: list[TensorColumn], sample: int, seed: int) -> None:
        self.columns = columns
        self.sample = sample
        self.seed = seed
        self.folders: dict[str, FolderStats] = {}
        self.rows: dict[str, int] = {}
        self.folder_rows: dict[str, dict[str, int]] = {}
        # Max-heap by priority (negated) of the ``sample`` smallest (priority, key, folder, shard).
        self._heap: list[tuple[int, str, str, str]] = []

    def _empty(self) -> FolderStats:
        out: FolderStats = {}
        for c in self.columns:
            if c.is_index:
                out[c.name] = CodeUsage(codebook_size=int(c.codebook_size or 0))
            else:
                out[c.name] = LatentStats(channels=int(c.shape[0]))
        return out

    @property
    def stats(self) -> FolderStats:
        """The accumulators of the whole output: the folders' merged (a fresh object each
        time, except with one folder, whose own accumulators are returned)."""
        if len(self.folders) == 1:
            return next(iter(self.folders.values()))
        total = self._empty()
        for folder in sorted(self.folders):
            for name, stats in self.folders[folder].items():
                total[name].merge(stats)  # type: ignore[arg-type]
        return total

    def update(self, block: pa.Table) -> ScanState:
        for folder, rows in split_folders(block):
            self._update_folder(folder, rows)
        return self

    def _update_folder(self, folder: str, block: pa.Table) -> None:
        keys = [str(k) for k in block.column("key").to_pylist()]
        shards = block.column("shard").to_pylist()
        accumulators = self.folders.setdefault(folder, self._empty())
        for c in self.columns:
            values = tensor_values(block.column(c.name))
            stats = accumulators[c.name]
            if isinstance(stats, CodeUsage):
                stats.update(values)
            else:
                stats.update(values, keys)
        for shard in shards:
            self.rows[shard] = self.rows.get(shard, 0) + 1
            by_folder = self.folder_rows.setdefault(shard, {})
            by_folder[folder] = by_folder.get(folder, 0) + 1
        for key, shard in zip(keys, shards, strict=False):
            self._offer(sample_priority(self.seed, key), key, folder, shard)

    def _offer(self, priority: int, key: str, folder: str, shard: str) -> None:
        if self.sample <= 0:
            return
        item = (-priority, key, folder, shard)
        if len(self._heap) < self.sample:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    @property
    def sampled(self) -> list[tuple[str, str, str]]:
        """The sampled data rows ``(key, folder, shard)``, by priority. A key's rows in several
        folders share its priority, so the sample holds whole samples but perhaps the last."""
        return [(k, f, s) for _, k, f, s in sorted(self._heap, reverse=True)]

    def merge(self, other: ScanState) -> ScanState:
        for folder, stats in other.folders.items():
            mine = self.folders.get(folder)
            if mine is None:
                self.folders[folder] = stats
                continue
            for name, s in mine.items():
                s.merge(stats[name])  # type: ignore[arg-type]
        for shard, n in other.rows.items():
            self.rows[shard] = self.rows.get(shard, 0) + n
        for shard, by_folder in other.folder_rows.items():
            mine_rows = self.folder_rows.setdefault(shard, {})
            for folder, n in by_folder.items():
                mine_rows[folder] = mine_rows.get(folder, 0) + n
        for neg, key, folder, shard in other._heap:
            self._offer(-neg, key, folder, shard)
        return self

    def to_bytes(self) -> bytes:
        import json

        head = {
            "rows": self.rows,
            "folder_rows": self.folder_rows,
            "heap": [[-neg, k, f, s] for neg, k, f, s in self._heap],
            "stats": {
                folder: {name: s.to_bytes().hex() for name, s in stats.items()}
                for folder, stats in self.folders.items()
            },
        }
        return json.dumps(head).encode()

    def load(self, data: bytes) -> ScanState:
        import json

        if not data:
            return self
        head = json.loads(data)
        self.rows = {k: int(v) for k, v in head["rows"].items()}
        self.folder_rows = {s: {f: int(n) for f, n in v.items()} for s, v in head["folder_rows"].items()}
        self._heap = [(-int(p), k, f, s) for p, k, f, s in head["heap"]]
        heapq.heapify(self._heap)
        self.folders = {}
        for folder, hexed in head["stats"].items():
            stats = self._empty()
            for name, value in hexed.items():
                stats[name] = type(stats[name]).from_bytes(bytes.fromhex(value))
            self.folders[folder] = stats
        return self


def _aggregate_class() -> type:
    from ray.data.aggregate import AggregateFnV2

    class _ScanAggregate(AggregateFnV2):
        def __init__(self, *, columns: list[TensorColumn], sample: int, seed: int) -> None:
            self._make = lambda: ScanState(columns=columns, sample=sample, seed=seed)
            super().__init__("latentize_qa", zero_factory=lambda: b"", on=None, ignore_nulls=False)

        def aggregate_block(self, block: Any) -> bytes:
            from ray.data.block import BlockAccessor

            table = BlockAccessor.for_block(block).to_arrow()
            return self._make().update(table).to_bytes()

        def combine(self, current: bytes, new: bytes) -> bytes:
            if not current:
                return new
            if not new:
                return current
            return self._make().load(current).merge(self._make().load(new)).to_bytes()

    return _ScanAggregate


def scan_statistics(ds: Any, *, columns: list[TensorColumn], sample: int, seed: int) -> ScanState:
    """Pass 1 over ``ds`` (a dataset of :func:`read_data_file` blocks)."""
    agg = _aggregate_class()(columns=columns, sample=sample, seed=seed)
    result = ds.aggregate(agg)
    data = result["latentize_qa"] if isinstance(result, dict) else result
    return ScanState(columns=columns, sample=sample, seed=seed).load(data or b"")


# --- pass 2: findings -----------------------------------------------------------------------

FINDINGS_SCHEMA = pa.schema(
    [
        ("group", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        # The data folder of a data row (None on error rows).
        ("folder", pa.string()),
        # The resolution slot the row stands for; -1: an error row of the whole sample.
        ("slot", pa.int32()),
        # A data row (else an error row).
        ("data", pa.bool_()),
        # Set by keep_interesting on every row of a key group that comes back whole.
        ("whole", pa.bool_()),
        ("outliers", pa.int64()),
        ("column", pa.string()),
        ("channel", pa.int32()),
        ("value", pa.float64()),
        ("z", pa.float64()),
        ("sampled", pa.bool_()),
        # The row's stored arrays (an .npz), only on sampled rows.
        ("payload", pa.binary()),
    ]
)


def _digest(arrays: list[np.ndarray], i: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a[i]).tobytes())
    return h.hexdigest()


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    # numpy's stub: the unpacked names could bind its keyword-only `allow_pickle: bool`; they
    # are column names.
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def row_findings(
    block: pa.Table,
    *,
    columns: list[TensorColumn],
    mean: Mapping[str, list[float]],
    std: Mapping[str, list[float]],
    outlier_std: float,
    sampled: frozenset[tuple[str, str]],
    slot_of: Mapping[str, int] | None = None,
) -> pa.Table:
    """Per data row: a digest group row and a key group row (see :data:`FINDINGS_SCHEMA`).

    A value is an outlier when ``|x - mean[c]| > outlier_std * std[c]`` for its channel ``c``
    (non-finite values are reported by pass 1, not here); ``z`` and ``value`` describe the
    row's most extreme value. ``sampled`` holds the ``(key, folder)`` of the sampled rows;
    ``slot_of`` maps a data folder to its resolution slot (0 for folders it does not name).
    """
    tables = [
        _folder_findings(
            rows,
            folder=folder,
            slot=int((slot_of or {}).get(folder, 0)),
            columns=columns,
            mean=mean,
            std=std,
            outlier_std=outlier_std,
            sampled=sampled,
        )
        for folder, rows in split_folders(block)
    ]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _folder_findings(
    block: pa.Table,
    *,
    folder: str,
    slot: int,
    columns: list[TensorColumn],
    mean: Mapping[str, list[float]],
    std: Mapping[str, list[float]],
    outlier_std: float,
    sampled: frozenset[tuple[str, str]],
) -> pa.Table:
    """:func:`row_findings` of rows of one data folder."""
    keys = [str(k) for k in block.column("key").to_pylist()]
    shards = block.column("shard").to_pylist()
    arrays = {c.name: tensor_values(block.column(c.name)) for c in columns}
    n = len(keys)
    outliers = np.zeros(n, dtype=np.int64)
    zmax = np.zeros(n)
    zcol: list[str | None] = [None] * n
    zch = np.full(n, -1, dtype=np.int32)
    zval = np.full(n, np.nan)
    for c in columns:
        if c.is_index or c.name not in mean:
            continue
        x = arrays[c.name].astype(np.float64).reshape(n, c.shape[0], -1)
        mu = np.asarray(mean[c.name], dtype=np.float64)[None, :, None]
        sd = np.asarray(std[c.name], dtype=np.float64)[None, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.abs(x - mu) / np.where(sd > 0, sd, np.inf)
        z = np.where(np.isfinite(z), z, 0.0)
        outliers += (z > outlier_std).reshape(n, -1).sum(axis=1)
        flat = z.reshape(n, -1)
        arg = flat.argmax(axis=1)
        best = flat[np.arange(n), arg]
        better = best > zmax
        for i in np.flatnonzero(better).tolist():
            zmax[i] = best[i]
            zcol[i] = c.name
            zch[i] = arg[i] // x.shape[2]
            zval[i] = x[i].reshape(-1)[arg[i]]
    flat_arrays = [arrays[c.name] for c in columns]
    rows: dict[str, list[Any]] = {name: [] for name in FINDINGS_SCHEMA.names}
    for i, key in enumerate(keys):
        is_sampled = (key, folder) in sampled
        payload = _npz({c.name: arrays[c.name][i] for c in columns}) if is_sampled else None
        for group in (f"d:{_digest(flat_arrays, i)}", f"k:{key}"):
            rows["group"].append(group)
            rows["key"].append(key)
            rows["shard"].append(shards[i])
            rows["folder"].append(folder)
            rows["slot"].append(slot)
            rows["data"].append(True)
            rows["whole"].append(False)
            rows["outliers"].append(int(outliers[i]))
            rows["column"].append(zcol[i])
            rows["channel"].append(int(zch[i]))
            rows["value"].append(float(zval[i]))
            rows["z"].append(float(zmax[i]))
            # Outliers and the sample travel on the key row only, so each row is reported once.
            is_key = group.startswith("k:")
            rows["sampled"].append(is_sampled and is_key)
            rows["payload"].append(payload if is_key else None)
    return pa.table(rows, schema=FINDINGS_SCHEMA)


def error_key_rows(keys: list[str], shards: list[str], slots: list[int] | None = None) -> pa.Table:
    """Key group rows for the error rows, so a key that is both data and error is caught.

    ``slots``: the resolution slot each error row stands for (-1, the default: the whole sample).
    """
    n = len(keys)
    return pa.table(
        {
            "group": [f"k:{k}" for k in keys],
            "key": keys,
            "shard": shards,
            "folder": [None] * n,
            "slot": slots if slots is not None else [-1] * n,
            "data": [False] * n,
            "whole": [False] * n,
            "outliers": [0] * n,
            "column": [None] * n,
            "channel": [-1] * n,
            "value": [None] * n,
            "z": [0.0] * n,
            "sampled": [False] * n,
            "payload": [None] * n,
        },
        schema=FINDINGS_SCHEMA,
    )


def key_verdict(
    slots: Sequence[int], data: Sequence[bool], shards: Sequence[str], *, total_slots: int
) -> tuple[bool, bool]:
    """Whether the rows of one key are ``(repeated, partial)``.

    Each row stands for one resolution slot (``-1``: an error row of the whole sample, which
    stands for every slot). The key is *repeated* when its rows are in more than one shard or a
    slot is stood for more than once (a second data row, or a data and an error row); *partial*
    when it has data rows but not in every one of the ``total_slots`` slots.

    Args:
        slots: the slot of each row.
        data: whether each row is a data row (else an error row).
        shards: the shard of each row.
        total_slots: the resolutions of the run (1 for one resolution).
    """
    per_slot: dict[int, int] = {}
    whole = 0
    for slot in slots:
        if slot < 0:
            whole += 1
        else:
            per_slot[slot] = per_slot.get(slot, 0) + 1
    covered = set(range(total_slots)) | set(per_slot)
    repeated = len(set(shards)) > 1 or any(per_slot.get(s, 0) + whole > 1 for s in covered)
    with_data = {s for s, d in zip(slots, data, strict=True) if d}
    partial = bool(with_data) and not set(range(total_slots)) <= with_data
    return repeated, partial


def missing_slots(slots: Sequence[int], data: Sequence[bool], *, total_slots: int) -> list[int]:
    """The resolution slots for which a key with data rows has no row at all, data or error.

    A sample encoded at one resolution but not at another must say why in an error row; one
    that has neither lost a row. An error row of the whole sample (slot -1) stands for every
    slot (a data row beside it is a repeat, not a gap).

    Args:
        slots: the slot of each of the key's rows.
        data: whether each row is a data row (else an error row).
        total_slots: the resolutions of the run.
    """
    if not any(data) or any(slot < 0 for slot in slots):
        return []
    return sorted(set(range(total_slots)) - set(slots))


def keep_interesting(group: pa.Table, *, slots: int = 1) -> pa.Table:
    """``map_groups`` body: a digest group whole when it has several rows; a key group whole
    (``whole`` set) when :func:`key_verdict` finds it repeated or partial; else only the rows
    that are outliers or sampled."""
    name = str(group.column("group")[0].as_py())
    if name.startswith("k:"):
        repeated, partial = key_verdict(
            group.column("slot").to_pylist(),
            group.column("data").to_pylist(),
            group.column("shard").to_pylist(),
            total_slots=slots,
        )
        if repeated or partial:
            index = group.schema.get_field_index("whole")
            return group.set_column(index, "whole", pa.array([True] * group.num_rows, pa.bool_()))
    elif group.num_rows > 1:
        return group
    mask = pc.or_(pc.greater(group.column("outliers"), 0), group.column("sampled"))
    return group.filter(mask)


@dataclass
class Findings:
    """What pass 2 found. ``outlier_rows`` / ``outlier_values`` are exact counts.

    Attributes:
        samples: ``(key, folder)`` -> (shard, the sampled row's stored arrays).
        irregular: shard -> (keys, data rows) of the keys whose rows came back whole (repeated
            or partial); every other key with data holds one row per resolution slot.
        missing_keys: key -> the resolution slots it has data rows but no row at all for
            (:func:`missing_slots`), by key.
    """

    duplicate_latents: list[list[tuple[str, str]]]
    duplicate_keys: list[list[str]]
    outlier_rows: int
    outlier_values: int
    worst: list[dict[str, Any]]
    samples: dict[tuple[str, str], tuple[str, dict[str, np.ndarray]]]
    duplicate_rows: int
    irregular: dict[str, tuple[int, int]]
    missing_keys: dict[str, list[int]] = field(default_factory=dict)


def find_rows(
    ds: Any,
    errors: pa.Table | None,
    *,
    columns: list[TensorColumn],
    mean: Mapping[str, list[float]],
    std: Mapping[str, list[float]],
    outlier_std: float,
    sampled: frozenset[tuple[str, str]],
    partitions: int = 1,
    slot_of: Mapping[str, int] | None = None,
    slots: int = 1,
) -> Findings:
    """Pass 2 over ``ds``; ``errors`` (``key``, ``shard``, and ``slot`` when the run wrote
    several resolutions) joins the key groups; ``partitions``: of the shuffle on the group
    column; ``slot_of`` / ``slots``: each data folder's resolution slot and their number."""
    import ray

    found = ds.map_batches(
        row_findings,
        fn_kwargs={
            "columns": columns,
            "mean": dict(mean),
            "std": dict(std),
            "outlier_std": outlier_std,
            "sampled": sampled,
            "slot_of": dict(slot_of or {}),
        },
        batch_format="pyarrow",
        batch_size=None,
    )
    if errors is not None and errors.num_rows:
        error_slots = errors.column("slot").to_pylist() if "slot" in errors.column_names else None
        error_rows = error_key_rows(errors.column("key").to_pylist(), errors.column("shard").to_pylist(), error_slots)
        found = found.union(ray.data.from_arrow(error_rows))
    kept = found.groupby("group", num_partitions=partitions).map_groups(
        keep_interesting, batch_format="pyarrow", fn_kwargs={"slots": slots}
    )
    return _collect(kept, slots=slots)


def _collect(kept: Any, *, slots: int) -> Findings:
    """The driver's side of pass 2: the rows :func:`keep_interesting` kept, as findings."""
    dup_latents: dict[str, list[tuple[str, str]]] = {}
    whole: dict[str, list[tuple[str, int, bool]]] = {}
    counted: set[tuple[str, str]] = set()
    worst: list[tuple[float, int, dict[str, Any]]] = []
    outlier_rows = outlier_values = 0
    samples: dict[tuple[str, str], tuple[str, dict[str, np.ndarray]]] = {}
    tie = 0
    for batch in kept.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            group = row["group"]
            if group.startswith("d:"):
                dup_latents.setdefault(group[2:], []).append((row["key"], row["shard"]))
                continue
            key = row["key"]
            if row["whole"]:
                whole.setdefault(key, []).append((row["shard"], int(row["slot"]), bool(row["data"])))
            if not row["data"]:
                continue
            stored = (key, row["folder"])
            if row["sampled"] and row["payload"] is not None and stored not in samples:
                with np.load(io.BytesIO(row["payload"]), allow_pickle=False) as npz:
                    samples[stored] = (row["shard"], {name: npz[name] for name in npz.files})
            # A data row stored twice (a repeated key) counts once.
            if row["outliers"] > 0 and stored not in counted:
                counted.add(stored)
                outlier_rows += 1
                outlier_values += int(row["outliers"])
                item = {k: row[k] for k in ("key", "shard", "column", "channel", "value", "z", "outliers")}
                tie += 1
                entry = (float(row["z"]), -tie, item)
                if len(worst) < OUTLIER_LIMIT:
                    heapq.heappush(worst, entry)
                elif entry > worst[0]:
                    heapq.heapreplace(worst, entry)
    groups = [sorted(v) for v in dup_latents.values() if len(v) > 1]
    groups.sort(key=lambda g: (-len(g), g))
    repeated = sorted(k for k, rows in whole.items() if _repeated(rows, slots))
    return Findings(
        duplicate_latents=groups,
        duplicate_keys=[[k, *sorted(shard for shard, _, _ in whole[k])] for k in repeated],
        outlier_rows=outlier_rows,
        outlier_values=outlier_values,
        worst=[item for _, _, item in sorted(worst, key=lambda e: (-e[0], -e[1]))],
        samples=samples,
        duplicate_rows=sum(len(g) for g in groups),
        irregular=_irregular(whole),
        missing_keys=_missing(whole, slots),
    )


def _repeated(rows: list[tuple[str, int, bool]], slots: int) -> bool:
    """:func:`key_verdict`'s ``repeated`` of one key's ``(shard, slot, data)`` rows."""
    shards = [shard for shard, _, _ in rows]
    return key_verdict([s for _, s, _ in rows], [d for _, _, d in rows], shards, total_slots=slots)[0]


def _missing(whole: Mapping[str, list[tuple[str, int, bool]]], slots: int) -> dict[str, list[int]]:
    """Key -> :func:`missing_slots` of the keys that came back whole, those with a gap only."""
    out = {}
    for key in sorted(whole):
        rows = whole[key]
        gap = missing_slots([s for _, s, _ in rows], [d for _, _, d in rows], total_slots=slots)
        if gap:
            out[key] = gap
    return out


def _irregular(whole: Mapping[str, list[tuple[str, int, bool]]]) -> dict[str, tuple[int, int]]:
    """Shard -> (keys with data rows there, their data rows) of the keys that came back whole."""
    keys: dict[str, int] = {}
    rows: dict[str, int] = {}
    for entries in whole.values():
        data_shards = [shard for shard, _, is_data in entries if is_data]
        for shard in set(data_shards):
            keys[shard] = keys.get(shard, 0) + 1
        for shard in data_shards:
            rows[shard] = rows.get(shard, 0) + 1
    return {shard: (keys[shard], rows[shard]) for shard in sorted(keys)}


def list_files(
    layout: OutputLayout, markers: Mapping[str, Marker], data_folders: list[str]
) -> tuple[list[DataFile], list[str], dict[str, str]]:
    """Committed data files and error files by marker, and files no marker lists.

    Returns:
        ``(data files, orphan paths relative to the root, shard -> errors file path)``.
    """
    data: list[DataFile] = []
    errors: dict[str, str] = {}
    listed: set[str] = set()
    for shard in sorted(markers):
        for rel in markers[shard].files:
            listed.add(rel)
            path = layout.join(rel)
            if rel.startswith("_errors/"):
                errors[shard] = path
            else:
                data.append(DataFile(path=path, shard=shard, folder=posixpath.dirname(rel)))
    orphans: list[str] = []
    for folder in [*data_folders, "_errors"]:
        try:
            found = layout.fs.ls(layout.join(folder), detail=False)
        except FileNotFoundError:
            continue
        for p in found:
            rel = posixpath.relpath(p, layout.root)
            if rel not in listed and not posixpath.basename(p).startswith("."):
                orphans.append(rel)
    return data, sorted(orphans), errors
