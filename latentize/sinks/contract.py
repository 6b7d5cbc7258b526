"""The output contract as types: the run manifest, the commit markers and the error rows of an
output root (docs/architecture.md, "Output contract").

The driver (:mod:`latentize.pipeline`) writes the manifest and the commit tasks
(:mod:`latentize.sinks.commit`) the markers and errors tables; the QA report, the training
reader (:mod:`latentize.data`) and ``latentize status`` read all three through these types.

Every type reads what earlier versions wrote: a key a file lacks gets its default (a marker
without ``reencoded_fp32`` counts none, one without ``rows`` has ``rows=None``), and keys this
version does not know are kept when the driver rewrites a manifest. ``to_json`` writes the keys
in the order they have always had, so a file written through these types holds the bytes it
held before they existed.

Light (pyarrow and the standard library): the commit workers import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from latentize.sinks.base import read_parquet_bytes

if TYPE_CHECKING:
    from latentize.sinks.layout import OutputLayout

__all__ = [
    "ERROR_SCHEMA",
    "FORMAT_VERSION",
    "WHOLE_SAMPLE",
    "ColumnSpec",
    "ErrorRow",
    "FolderSpec",
    "Manifest",
    "Marker",
    "OutputSection",
    "SampleTotals",
    "ShardTotals",
    "Totals",
    "errors_table",
    "read_errors",
    "read_manifest",
    "run_markers",
]

#: The layout version a run writes: 2, several data files per shard (one per staged part) and
#: ``_ledger.parquet``; 1 wrote one ``<shard>.parquet`` per shard and no ledger.
FORMAT_VERSION = 2

#: The ``slot`` of an error row that stands for every resolution of its sample (it failed to be
#: read or decoded, before any crop was made).
WHOLE_SAMPLE = -1

#: Schema of ``OUT/_errors/<shard>.parquet``. ``slot``: :data:`WHOLE_SAMPLE` when the sample
#: failed as a whole (read, decode), else the resolution (position in
#: ``preprocess.resolutions``; 0 in a run of one size) whose row the encoder failed; tables
#: written before it existed lack the column (see :func:`read_errors`).
ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("slot", pa.int32()),
    ]
)

#: An encode error of one resolution, as error reasons named it before the ``slot`` column:
#: ``at WxH: <reason>`` (the folder the row was bound for).
_AT_FOLDER = re.compile(r"^at (\d+x\d+): ")


# --------------------------------------------------------------------------- error rows


@dataclass(frozen=True, kw_only=True)
class ErrorRow:
    """One row of an errors table: a sample (or one resolution of it) that has no data row.

    Attributes:
        key: the sample key (None when the reader found none).
        shard: the input shard id.
        index: the sample's position in its shard.
        stage: ``read``, ``decode``, ``preprocess``, ``encode`` or ``text`` (the text encoder).
        error: the reason.
        slot: :data:`WHOLE_SAMPLE`, or the resolution whose row the encoder failed.
    """

    key: str | None
    shard: str
    index: int
    stage: str | None
    error: str | None
    slot: int = WHOLE_SAMPLE

    @property
    def whole_sample(self) -> bool:
        """Whether the row stands for every resolution of its sample."""
        return self.slot < 0

    def __getitem__(self, column: str) -> Any:
        """A column by name (``row["index"]``), as the errors table holds it."""
        return self.to_json()[column]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "shard": self.shard,
            "index": self.index,
            "stage": self.stage,
            "error": self.error,
            "slot": self.slot,
        }


def errors_table(rows: Sequence[ErrorRow]) -> pa.Table:
    """The errors table of ``rows`` (one shard's, in index order), at :data:`ERROR_SCHEMA`."""
    return pa.Table.from_pylist([r.to_json() for r in rows], schema=ERROR_SCHEMA)


def read_errors(data: bytes, *, shard: str, slot_of: Mapping[str, int]) -> pa.Table:
    """An errors table file at :data:`ERROR_SCHEMA`, whatever version wrote it.

    Tables written before the ``slot`` column get it from the reason: an encode error of one
    resolution (``at WxH: ...``) stands for the slot of that folder (``slot_of``: data folder ->
    resolution slot), any other error for the whole sample. ``shard`` fills the shard column
    (the file's name says it).
    """
    table = read_parquet_bytes(data)
    n = table.num_rows
    if "slot" in table.column_names:
        slots = table.column("slot").cast(pa.int32())
    else:
        stages, reasons = table.column("stage").to_pylist(), table.column("error").to_pylist()
        slots = pa.chunked_array(
            [pa.array([_slot_of_reason(s, e, slot_of) for s, e in zip(stages, reasons, strict=True)], pa.int32())]
        )
    columns = {name: table.column(name) for name in ("key", "index", "stage", "error")}
    columns.update(shard=pa.chunked_array([pa.array([shard] * n, pa.string())]), slot=slots)
    return pa.table(
        [columns[f.name].cast(f.type) for f in ERROR_SCHEMA],
        schema=ERROR_SCHEMA,
    )


def _slot_of_reason(stage: str | None, error: str | None, slot_of: Mapping[str, int]) -> int:
    """The slot of an error row of a table without a ``slot`` column."""
    match = _AT_FOLDER.match(error or "") if stage == "encode" else None
    if match is None or match.group(1) not in slot_of:
        return WHOLE_SAMPLE
    return slot_of[match.group(1)]


# --------------------------------------------------------------------------- markers


@dataclass(frozen=True, kw_only=True)
class Marker:
    """A shard's commit marker, ``OUT/_shards/<shard>.json``: written last, after the shard's
    files are durable; the shard counts as done once it exists.

    Attributes:
        shard: the input shard id.
        url: the input shard.
        status: ``ok``, or ``failed`` when reading the shard stopped early (None: not recorded).
        error: why reading stopped early.
        samples: rows read (None: not recorded).
        ok: samples stored (a sample stored at several resolutions counts once).
        failed: error rows.
        failed_by_stage: error rows by stage.
        reencoded_fp32: stored samples re-encoded in float32 (non-finite in the compute dtype).
        rows: data rows per data folder (None: markers written before folders were counted).
        files: the shard's data and errors files, relative to the root.
        bytes: bytes of its data files.
        read_node: the Ray node that read the shard.
        commit_node: the Ray node that committed it.
        fingerprint: the config fingerprint of the run that committed it.
        committed_at: when (UTC, ISO 8601).
    """

    shard: str = ""
    url: str | None = None
    status: str | None = None
    error: str | None = None
    samples: int | None = None
    ok: int = 0
    failed: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)
    reencoded_fp32: int = 0
    rows: dict[str, int] | None = None
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    read_node: str | None = None
    commit_node: str | None = None
    fingerprint: str | None = None
    committed_at: str | None = None

    @property
    def succeeded(self) -> bool:
        """The shard was read to its end."""
        return self.status == "ok"

    @property
    def retryable(self) -> bool:
        """Whether ``--retry-failed`` redoes this shard: failed shards, and shards with samples
        that failed in the image or text encoder (out of memory, non-finite latents or
        embeddings: may pass on a retry). Samples that failed to read or decode are properties
        of their bytes and would fail again, so they alone do not redo a shard."""
        return not self.succeeded or bool(self.failed_by_stage.get("encode") or self.failed_by_stage.get("text"))

    def to_json(self) -> dict[str, Any]:
        """The marker file's content, every key in its place."""
        return {
            "shard": self.shard,
            "url": self.url,
            "status": self.status,
            "error": self.error,
            "samples": self.samples,
            "ok": self.ok,
            "failed": self.failed,
            "failed_by_stage": dict(self.failed_by_stage),
            "reencoded_fp32": self.reencoded_fp32,
            "rows": None if self.rows is None else dict(self.rows),
            "files": list(self.files),
            "bytes": self.bytes,
            "read_node": self.read_node,
            "commit_node": self.commit_node,
            "fingerprint": self.fingerprint,
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Marker:
        """A marker as any version wrote it (absent keys get their defaults)."""
        rows = data.get("rows")
        samples = data.get("samples")
        return cls(
            shard=str(data.get("shard") or ""),
            url=data.get("url"),
            status=data.get("status"),
            error=data.get("error"),
            samples=None if samples is None else int(samples),
            ok=int(data.get("ok") or 0),
            failed=int(data.get("failed") or 0),
            failed_by_stage={str(k): int(v) for k, v in (data.get("failed_by_stage") or {}).items()},
            reencoded_fp32=int(data.get("reencoded_fp32") or 0),
            rows=None if rows is None else {str(k): int(v) for k, v in rows.items()},
            files=[str(f) for f in data.get("files") or []],
            bytes=int(data.get("bytes") or 0),
            read_node=data.get("read_node"),
            commit_node=data.get("commit_node"),
            fingerprint=data.get("fingerprint"),
            committed_at=data.get("committed_at"),
        )

    @classmethod
    def loads(cls, text: str) -> Marker:
        """A marker from its JSON text (a marker file, a ledger cell)."""
        import json

        return cls.from_json(json.loads(text))


@dataclass(frozen=True)
class Totals:
    """What the markers of one run say about the whole output (the manifest's totals).

    Attributes:
        committed: shards with a marker of the run.
        failed_shards: of those, shards whose reading stopped early.
        ok, failed, reencoded: samples stored, error rows, samples re-encoded in float32.
        folders: data rows per data folder, sorted by folder.
    """

    committed: int
    failed_shards: int
    ok: int
    failed: int
    reencoded: int
    folders: dict[str, int]

    @classmethod
    def of(cls, markers: Iterable[Marker]) -> Totals:
        mine = list(markers)
        folders: dict[str, int] = {}
        for m in mine:
            for folder, rows in (m.rows or {}).items():
                folders[folder] = folders.get(folder, 0) + rows
        return cls(
            committed=len(mine),
            failed_shards=sum(not m.succeeded for m in mine),
            ok=sum(m.ok for m in mine),
            failed=sum(m.failed for m in mine),
            reencoded=sum(m.reencoded_fp32 for m in mine),
            folders=dict(sorted(folders.items())),
        )


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ColumnSpec:
    """A stored tensor column: its per-row shape and numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ColumnSpec:
        return cls(tuple(int(s) for s in data.get("shape") or ()), str(data.get("dtype") or ""))


def _columns_json(columns: Mapping[str, ColumnSpec]) -> dict[str, Any]:
    return {name: c.to_json() for name, c in columns.items()}


def _columns_from(data: Mapping[str, Any] | None) -> dict[str, ColumnSpec]:
    return {str(name): ColumnSpec.from_json(c) for name, c in (data or {}).items()}


def _size(value: Sequence[Any] | None) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


@dataclass(frozen=True, kw_only=True)
class FolderSpec:
    """A data folder as the manifest declares it (``output.folders``).

    Attributes:
        size: the crop size ``(width, height)`` (None: not recorded).
        resolution: the resolution of ``preprocess.resolutions`` it belongs to (None: one).
        slot: that resolution's position (0 in a run of one resolution).
        columns: its stored tensor columns with their shapes.
    """

    size: tuple[int, int] | None = None
    resolution: tuple[int, int] | None = None
    slot: int = 0
    columns: dict[str, ColumnSpec] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": None if self.size is None else list(self.size),
            "resolution": None if self.resolution is None else list(self.resolution),
            "slot": self.slot,
            "columns": _columns_json(self.columns),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FolderSpec:
        return cls(
            size=_size(data.get("size")),
            resolution=_size(data.get("resolution")),
            slot=int(data.get("slot") or 0),
            columns=_columns_from(data.get("columns")),
        )


@dataclass(frozen=True, kw_only=True)
class OutputSection:
    """The manifest's ``output``: how and where the data is stored.

    Attributes:
        format: ``output.format`` (``parquet`` when not recorded).
        dtype: ``output.dtype`` of float tensors.
        tensor_type: ``output.tensor_type``.
        data_folders: the data folders holding rows (a run of several sizes lists them when it
            ends).
        folders: every data folder the run may write, by name.
        rows_by_folder: data rows per folder (None until a run has ended).
    """

    format: str = "parquet"
    dtype: str | None = None
    tensor_type: str | None = None
    data_folders: list[str] = field(default_factory=list)
    folders: dict[str, FolderSpec] = field(default_factory=dict)
    rows_by_folder: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "dtype": self.dtype,
            "tensor_type": self.tensor_type,
            "data_folders": list(self.data_folders),
            "folders": {name: spec.to_json() for name, spec in self.folders.items()},
        }
        if self.rows_by_folder is not None:
            out["rows_by_folder"] = dict(self.rows_by_folder)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputSection:
        rows = data.get("rows_by_folder")
        return cls(
            format=str(data.get("format") or "parquet"),
            dtype=data.get("dtype"),
            tensor_type=data.get("tensor_type"),
            data_folders=[str(f) for f in data.get("data_folders") or []],
            folders={str(k): FolderSpec.from_json(v) for k, v in (data.get("folders") or {}).items()},
            rows_by_folder=None if not isinstance(rows, Mapping) else {str(k): int(v) for k, v in rows.items()},
        )


@dataclass(frozen=True, kw_only=True)
class ShardTotals:
    """The manifest's ``shards``: the run's input shards, and (once a run has ended) how many
    are committed and how many of those failed."""

    total: int = 0
    committed: int | None = None
    failed: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total": self.total}
        if self.committed is not None:
            out["committed"] = self.committed
        if self.failed is not None:
            out["failed"] = self.failed
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardTotals:
        committed, failed = data.get("committed"), data.get("failed")
        return cls(
            total=int(data.get("total") or 0),
            committed=None if committed is None else int(committed),
            failed=None if failed is None else int(failed),
        )


@dataclass(frozen=True, kw_only=True)
class SampleTotals:
    """The manifest's ``samples``: stored, failed, and stored after a float32 re-encode."""

    ok: int = 0
    failed: int = 0
    reencoded_fp32: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "reencoded_fp32": self.reencoded_fp32}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SampleTotals:
        return cls(
            ok=int(data.get("ok") or 0),
            failed=int(data.get("failed") or 0),
            reencoded_fp32=int(data.get("reencoded_fp32") or 0),
        )


#: The manifest's keys, in the order a run writes them.
_MANIFEST_KEYS = (
    "format_version",
    "fingerprint",
    "config",
    "encoder",
    "text",
    "preprocess",
    "output",
    "versions",
    "status",
    "shards",
    "runs",
    "samples",
    "updated_at",
)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """``OUT/_manifest.json``: the run's identity, how it was made, and its totals.

    Attributes:
        format_version: :data:`FORMAT_VERSION` for outputs of this layout.
        fingerprint: the config fingerprint (markers of another fingerprint are not this run's).
        config: the resolved config (credentials redacted), as ``config_to_dict`` writes it.
        encoder: the encoder: ``type``, ``model_class``, ``input_range``, ``downsample_factor``,
            ``latent_channels``, ``constants``, ``identity``, ``columns`` (stored columns with
            shape and dtype), ``preset`` and ``dtype`` (what the encoder type's decoder and the
            QA checks read; open to the encoder types, hence a mapping).
        text: the text stage's entry (``TextSpec.to_manifest()`` plus ``empty_prompt``, the
            file of the empty prompt's embeddings): ``storage``, ``columns`` (stored text
            columns with their per-sample shape, None for the varying rows of a trimmed
            ``prompt_embeds``, and dtype), the identity of the weights. None: no text stage.
        preprocess: how crops were made (``size``, ``buckets``, ``resolutions``, ``crop``,
            ``flip``, and descriptions of the decode and resize).
        output: :class:`OutputSection`.
        versions: library versions that produced it.
        status: ``running``, ``complete`` or ``incomplete``.
        shards: :class:`ShardTotals` (None: not recorded).
        runs: one entry per run into this root: start, end, shards, samples, seconds.
        samples: :class:`SampleTotals` (None until a run has ended).
        updated_at: when the totals were last written (UTC, ISO 8601).
        extra: keys this version does not know, kept where they were found.
    """

    format_version: int = FORMAT_VERSION
    fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    output: OutputSection = field(default_factory=OutputSection)
    versions: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    shards: ShardTotals | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    samples: SampleTotals | None = None
    updated_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading ----------------------------------------------------------------------------
    @property
    def columns(self) -> dict[str, ColumnSpec]:
        """The stored tensor columns (``encoder.columns``), at the reference size."""
        return _columns_from(self.encoder.get("columns"))

    @property
    def constants(self) -> dict[str, Any]:
        """The normalisation constants (``encoder.constants``)."""
        return dict(self.encoder.get("constants") or {})

    @property
    def identity(self) -> dict[str, Any]:
        """What names the weights (``encoder.identity``)."""
        return dict(self.encoder.get("identity") or {})

    @property
    def slot_of(self) -> dict[str, int]:
        """Data folder -> its resolution slot, for the folders the manifest declares."""
        return {name: spec.slot for name, spec in self.output.folders.items()}

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by its dotted key (``ray.dashboard``), or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def sizes(self) -> list[list[tuple[int, int]]] | None:
        """The sizes the run cropped to, per resolution: its resolved buckets, else its
        resolutions; None for outputs written before these were recorded."""
        if self.preprocess.get("buckets"):
            recorded = self.preprocess["buckets"]
        elif self.preprocess.get("resolutions"):
            recorded = [[size] for size in self.preprocess["resolutions"]]
        else:
            return None
        return [[(int(w), int(h)) for w, h in sizes] for sizes in recorded]

    def __getitem__(self, key: str) -> Any:
        """A top-level entry as the file holds it (``manifest["samples"]``), for scripts
        written against the parsed JSON."""
        return self.to_json()[key]

    # -- writing ----------------------------------------------------------------------------
    def with_status(self, status: str) -> Manifest:
        return replace(self, status=status)

    def with_run(self, run: dict[str, Any]) -> Manifest:
        """The manifest with one more ``runs`` entry."""
        return replace(self, runs=[*self.runs, run])

    def with_totals(self, totals: Totals, *, shards: int, updated_at: str) -> Manifest:
        """The manifest with the status and totals of ``totals`` over ``shards`` input shards."""
        complete = totals.committed == shards and totals.failed_shards == 0
        output = replace(
            self.output,
            data_folders=sorted(set(self.output.data_folders) | set(totals.folders)),
            rows_by_folder=dict(totals.folders),
        )
        return replace(
            self,
            status="complete" if complete else "incomplete",
            shards=ShardTotals(total=shards, committed=totals.committed, failed=totals.failed_shards),
            samples=SampleTotals(ok=totals.ok, failed=totals.failed, reencoded_fp32=totals.reencoded),
            output=output,
            updated_at=updated_at,
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest file's content: the keys in the order a run writes them; ``runs``,
        ``samples`` and ``updated_at`` only once there are any."""
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "encoder": self.encoder,
        }
        if self.text is not None:
            out["text"] = self.text
        out.update(
            {
                "preprocess": self.preprocess,
                "output": self.output.to_json(),
                "versions": self.versions,
                "status": self.status,
            }
        )
        if self.shards is not None:
            out["shards"] = self.shards.to_json()
        if self.runs:
            out["runs"] = list(self.runs)
        if self.samples is not None:
            out["samples"] = self.samples.to_json()
        if self.updated_at is not None:
            out["updated_at"] = self.updated_at
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest as any version wrote it (absent keys get their defaults)."""
        shards, samples = data.get("shards"), data.get("samples")
        return cls(
            format_version=int(data.get("format_version") or 1),
            fingerprint=data.get("fingerprint"),
            config=dict(data.get("config") or {}),
            encoder=dict(data.get("encoder") or {}),
            text=dict(data["text"]) if isinstance(data.get("text"), Mapping) else None,
            preprocess=dict(data.get("preprocess") or {}),
            output=OutputSection.from_json(data.get("output") or {}),
            versions=dict(data.get("versions") or {}),
            status=data.get("status"),
            shards=None if shards is None else ShardTotals.from_json(shards),
            runs=list(data.get("runs") or []),
            samples=SampleTotals.from_json(samples) if samples else None,
            updated_at=data.get("updated_at"),
            extra={k: v for k, v in data.items() if k not in _MANIFEST_KEYS},
        )


# --------------------------------------------------------------------------- reading a root


def read_manifest(layout: OutputLayout) -> Manifest | None:
    """The output root's manifest; None when it has none."""
    data = layout.read_manifest()
    return None if data is None else Manifest.from_json(data)


def run_markers(layout: OutputLayout, manifest: Manifest) -> dict[str, Marker]:
    """The commit markers of the manifest's run (its fingerprint), by shard id: markers of
    another run in the same root are not this output's."""
    markers = {shard: Marker.loads(text) for shard, text in layout.read_marker_texts().items()}
    return {shard: m for shard, m in markers.items() if m.fingerprint == manifest.fingerprint}
