"""Builds committed output roots for reader tests through the real staging and commit code
(:func:`stage_batch`, :class:`ShardTracker`, :func:`commit_shard`): several shards, several data
folders (latent shapes), error rows, files split into parts, and a stray uncommitted file."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentize.sinks import SINKS, OutputLayout, ShardTracker, commit_shard, stage_batch
from latentize.sinks.base import tensor_array
from latentize.sinks.layout import final_name

FINGERPRINT = "reader-test-fp"
#: Data folder -> latent shape (C, h, w) of a factor-8 encoder at that crop size.
SHAPES = {"64x64": (4, 8, 8), "96x64": (4, 8, 12)}


def key_of(shard: str, index: int) -> str:
    return f"{shard}{index:04d}"


def tensor_of(column: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A distinct, reproducible float16 tensor per (column, key)."""
    values = np.random.default_rng([zlib.crc32(column.encode()), zlib.crc32(key.encode())]).standard_normal(shape)
    if column.startswith("logvar"):
        values = values * 0.5 - 2.0
    return values.astype(np.float16)


@dataclass
class Built:
    """What a built output holds: its layout, committed keys by folder, the stored tensors."""

    layout: OutputLayout
    keys: dict[str, list[str]] = field(default_factory=dict)
    tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # column -> key -> value
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def all_keys(self) -> list[str]:
        return sorted(k for keys in self.keys.values() for k in keys)


def _rows_batch(shard: str, rows: list[tuple[int, str | None]], shape: tuple[int, ...], columns: list[str]) -> dict:
    """A numpy batch as the encoder actors hand it to stage_batch: (index, error) per row."""
    n = len(rows)
    keys = [key_of(shard, i) for i, _ in rows]
    failed = [e is not None for _, e in rows]
    batch: dict[str, Any] = {
        "key": np.array(keys, dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "index": np.array([i for i, _ in rows], dtype=np.int64),
        "caption": np.array([f"caption {k}" for k in keys], dtype=object),
        "json": np.array([json.dumps({"key": k}) for k in keys], dtype=object),
        "notes": np.array([None] * n, dtype=object),
        "error": np.array([e for _, e in rows], dtype=object),
        "stage": np.array(["decode" if f else None for f in failed], dtype=object),
        "total": np.full(n, -1, dtype=np.int64),
        "read_node": np.array([None] * n, dtype=object),
        "width": np.array([640 + i for i, _ in rows], dtype=np.int32),
        "height": np.full(n, 480, dtype=np.int32),
        "crop_top": np.zeros(n, dtype=np.int32),
        "crop_left": np.array([i % 7 for i, _ in rows], dtype=np.int32),
    }
    for column in columns:
        batch[column] = np.stack(
            [
                np.zeros(shape, np.float16) if f else tensor_of(column, k, shape)
                for k, f in zip(keys, failed, strict=True)
            ]
        )
    return batch


def _sentinel(shard: str, total: int, columns: list[str]) -> dict:
    batch = _rows_batch(shard, [(0, "end")], (1,), columns)
    batch.update(
        key=np.array([None], dtype=object),
        index=np.array([-1], dtype=np.int64),
        error=np.array([None], dtype=object),
        stage=np.array([None], dtype=object),
        total=np.array([total], dtype=np.int64),
    )
    return batch


def build_output(
    url: str,
    shards: dict[str, dict[str, int]],
    *,
    tensor_type: str = "fixed_shape_tensor",
    sink: str = "parquet",
    columns: tuple[str, ...] = ("latent",),
    flipped: bool = False,
    constants: dict[str, Any] | None = None,
    rows_per_part: int = 6,
    error_every: int = 5,
    stray: bool = True,
) -> Built:
    """Commits ``shards`` (shard -> data folder -> ok rows) into a new output at ``url``.

    Every ``error_every``-th index of a shard is an error row; each folder's rows are staged in
    parts of ``rows_per_part`` (one data file each). ``flipped`` adds a ``<column>_flipped`` twin
    per tensor column. ``stray`` leaves a data file of an uncommitted shard in the first folder.
    """
    layout = OutputLayout(url)
    built = Built(layout)
    stored = [*columns, *(f"{c}_flipped" for c in columns if flipped)]
    tracker = ShardTracker()
    markers: dict[str, str] = {}
    for shard, folders in sorted(shards.items()):
        index = 0
        reports = []
        for folder, n in folders.items():
            rows: list[tuple[int, str | None]] = []
            while sum(1 for _, e in rows if e is None) < n:
                rows.append((index, "cannot identify image file" if index % error_every == error_every - 1 else None))
                index += 1
            for start in range(0, len(rows), rows_per_part):
                batch = _rows_batch(shard, rows[start : start + rows_per_part], SHAPES[folder], stored)
                table = stage_batch(
                    batch,
                    layout=layout,
                    tensor_columns=stored,
                    folder=folder,
                    sink_name=sink,
                    compression="zstd",
                    tensor_type=tensor_type,
                )
                reports += table.to_pylist()
            for i, error in rows:
                if error is None:
                    key = key_of(shard, i)
                    built.keys.setdefault(folder, []).append(key)
                    for column in stored:
                        built.tensors.setdefault(column, {})[key] = tensor_of(column, key, SHAPES[folder])
        reports += stage_batch(
            _sentinel(shard, index, stored),
            layout=layout,
            tensor_columns=stored,
            folder="unused",
            sink_name=sink,
            compression="zstd",
        ).to_pylist()
        for report in reports:
            if tracker.add(report):
                marker = commit_shard(
                    layout=layout,
                    commit=tracker.pop(report["shard"]),
                    url=f"/in/{shard}.tar",
                    sink_name=sink,
                    fingerprint=FINGERPRINT,
                )
                markers[shard] = json.dumps(marker.to_json())
    assert tracker.incomplete() == {}
    layout.write_ledger(markers)
    layout.prune_staging()
    if stray:
        _stray(layout, sorted({f for fs in shards.values() for f in fs})[0], stored, sink, tensor_type)
    folders = sorted(built.keys)
    built.manifest = {
        "format_version": 2,
        "fingerprint": FINGERPRINT,
        "encoder": {
            "type": "kl",
            "constants": constants or {"scaling_factor": 0.5, "shift_factor": 0.1, "applied": True},
            "columns": {c: {"shape": list(SHAPES[folders[0]]), "dtype": "float16"} for c in columns},
            "sample": "moments" if "mean" in columns else "mode",
        },
        "output": {
            "format": sink,
            "dtype": "float16",
            "tensor_type": tensor_type,
            "data_folders": folders,
            # As a run records them: each folder's stored columns with their shapes.
            "folders": {
                f: {"slot": 0, "columns": {c: {"shape": list(SHAPES[f]), "dtype": "float16"} for c in columns}}
                for f in folders
            },
        },
        "status": "complete",
    }
    layout.write_json(layout.manifest_path, built.manifest)
    layout.write_inputs([(f"/in/{s}.tar", s) for s in sorted(shards)])
    return built


def _stray(layout: OutputLayout, folder: str, columns: list[str], sink: str, tensor_type: str) -> None:
    """A published data file whose shard has no marker (a crash between publish and marker)."""
    batch = _rows_batch("stray", [(i, None) for i in range(3)], SHAPES[folder], columns)
    import pyarrow as pa

    table = pa.table(
        {
            "key": pa.array(list(batch["key"]), pa.string()),
            **{c: tensor_array(batch[c]) for c in columns},
            **{c: pa.array(list(batch[c]), pa.string()) for c in ("caption", "json", "notes")},
            **{c: pa.array(batch[c]) for c in ("width", "height", "crop_top", "crop_left")},
        }
    )
    data = SINKS.get(sink).serialize(table, tensor_columns=columns, compression="zstd", tensor_type=tensor_type)
    ext = SINKS.get(sink).extension
    layout.write_bytes(layout.join(folder, final_name("stray", 0, ext)), data)
