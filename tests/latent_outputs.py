"""Builds committed output roots for reader tests through the real staging and commit code
(:func:`stage_batch`, :class:`ShardTracker`, :func:`commit_shard`): several shards, several data
folders (latent shapes), error rows, files split into parts, and a stray uncommitted file.

``text=`` adds caption embeddings in the storage contract of the text stage (issue 21): the
columns of :func:`~latentize.encoders.text.spec.stored_columns` after the latent columns, the
manifest's ``text`` entry and ``OUT/_empty_prompt.npz``. Fixed-shape text columns go through
``stage_batch`` as tensor columns (stored exactly like ``latent``); the two columns of
``storage: trimmed`` that are not tensors (``prompt_embeds`` as
``list<fixed_size_list<float16, width>>``, ``prompt_embeds_length`` int32) are added to each
staged part before it is committed (Parquet: a column; WebDataset: ``KEY.<column>.npy``).
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentize.encoders.text.spec import LENGTH, MASK, TextColumn, stored_columns
from latentize.sinks import SINKS, OutputLayout, ShardTracker, commit_shard, stage_batch
from latentize.sinks.base import tensor_array
from latentize.sinks.layout import EMPTY_PROMPT, final_name
from latentize.sinks.webdataset import _tar
from latentize.tarnames import KEY_MEMBER, base_plus_ext

FINGERPRINT = "reader-test-fp"
#: Data folder -> latent shape (C, h, w) of a factor-8 encoder at that crop size.
SHAPES = {"64x64": (4, 8, 8), "96x64": (4, 8, 12)}


#: The text stage's per-prompt outputs of the test family (a masked T5-like encoder with a
#: pooled CLIP-like vector): ``prompt_embeds`` (rows, width), its mask, a pooled vector.
TEXT_ROWS, TEXT_WIDTH, POOLED = 6, 8, 12
TEXT_SHAPES: dict[str, tuple[int | None, ...]] = {
    "prompt_embeds": (TEXT_ROWS, TEXT_WIDTH),
    "pooled_prompt_embeds": (POOLED,),
    MASK: (TEXT_ROWS,),
}


def text_spec(storage: str) -> dict[str, TextColumn]:
    """The stored text columns of ``storage`` (``padded`` or ``trimmed``), in file order."""
    return stored_columns(TEXT_SHAPES, storage, "float16")


def text_length(key: str) -> int:
    """The real tokens of a key's caption: 1 to ``TEXT_ROWS``, reproducible per key."""
    return 1 + zlib.crc32(f"len:{key}".encode()) % TEXT_ROWS


def text_of(storage: str, key: str) -> dict[str, np.ndarray]:
    """A key's stored text columns as the text stage would store them (``key`` "" is the
    empty prompt): padded rows past the length hold values too, as T5's pad tokens do."""
    n = text_length(key) if key else 1
    embeds = tensor_of("prompt_embeds", key, (TEXT_ROWS, TEXT_WIDTH))
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": tensor_of("pooled_prompt_embeds", key, (POOLED,))}
    if storage == "padded":
        out[MASK] = (np.arange(TEXT_ROWS) < n).astype(np.uint8)
    else:
        out["prompt_embeds"] = embeds[:n].copy()
        out[LENGTH] = np.array(n, dtype=np.int32)
    return {name: out[name] for name in text_spec(storage)}


def text_manifest(storage: str) -> dict[str, Any]:
    """The manifest's ``text`` entry (``TextSpec.to_manifest()`` plus ``empty_prompt``)."""
    columns = text_spec(storage)
    return {
        "preset": "test-t5-clip",
        "pipeline_class": "TestPipeline",
        "storage": storage,
        "dtype": "auto",
        "max_sequence_length": TEXT_ROWS,
        "max_rows": TEXT_ROWS,
        "masks_padding": True,
        "components": {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
        "call_overrides": {"max_sequence_length": TEXT_ROWS},
        "identity": {"model": "test", "sha256": "0" * 64},
        "columns": {k: {"shape": list(c.shape), "dtype": c.dtype} for k, c in columns.items()},
        "empty_prompt": EMPTY_PROMPT,
    }


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


def _rows_batch(
    shard: str,
    rows: list[tuple[int, str | None]],
    shape: tuple[int, ...],
    columns: list[str],
    text: str | None = None,
) -> dict:
    """A numpy batch as the encoder actors hand it to stage_batch: (index, error) per row;
    ``text``: with the fixed-shape text columns of that storage too."""
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
    if text is not None:
        for name, column in text_spec(text).items():
            if column.shape and not column.variable:
                batch[name] = np.stack([text_of(text, k)[name] for k in keys])
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
    text: str | None = None,
) -> Built:
    """Commits ``shards`` (shard -> data folder -> ok rows) into a new output at ``url``.

    Every ``error_every``-th index of a shard is an error row; each folder's rows are staged in
    parts of ``rows_per_part`` (one data file each). ``flipped`` adds a ``<column>_flipped`` twin
    per tensor column. ``stray`` leaves a data file of an uncommitted shard in the first folder.
    ``text`` (``padded`` or ``trimmed``) adds caption embeddings (:func:`text_of` per key; the
    module docstring says how they are stored) and ``built.tensors`` holds them too.
    """
    layout = OutputLayout(url)
    built = Built(layout)
    stored = [*columns, *(f"{c}_flipped" for c in columns if flipped)]
    texts = text_spec(text) if text is not None else {}
    fixed_text = [n for n, c in texts.items() if c.shape and not c.variable]
    other_text = [n for n in texts if n not in fixed_text]
    staged_columns = [*stored, *fixed_text]
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
                batch = _rows_batch(shard, rows[start : start + rows_per_part], SHAPES[folder], stored, text)
                table = stage_batch(
                    batch,
                    layout=layout,
                    tensor_columns=staged_columns,
                    folder=folder,
                    sink_name=sink,
                    compression="zstd",
                    tensor_type=tensor_type,
                )
                staged = table.to_pylist()
                if text is not None and other_text:
                    for report in staged:
                        for part in report["parts"]:
                            part["bytes"] = _add_text(layout, part["path"], sink, stored, text)
                reports += staged
            for i, error in rows:
                if error is None:
                    key = key_of(shard, i)
                    built.keys.setdefault(folder, []).append(key)
                    for column in stored:
                        built.tensors.setdefault(column, {})[key] = tensor_of(column, key, SHAPES[folder])
                    if text is not None:
                        for column, value in text_of(text, key).items():
                            built.tensors.setdefault(column, {})[key] = value
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
    if text is not None:
        # After ``encoder``, where the manifest type writes it.
        entries = list(built.manifest.items())
        at = [k for k, _ in entries].index("encoder") + 1
        built.manifest = dict([*entries[:at], ("text", text_manifest(text)), *entries[at:]])
        buf = io.BytesIO()
        np.savez(buf, **text_of(text, ""))
        layout.write_bytes(layout.join(EMPTY_PROMPT), buf.getvalue())
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


def _trimmed_arrays(values: dict[str, list[np.ndarray]]) -> dict[str, pa.Array]:
    """The non-tensor text columns of some rows as Arrow arrays: ``prompt_embeds`` as
    ``list<fixed_size_list<float16, width>>`` (its rows per sample), the length as int32."""
    out: dict[str, pa.Array] = {}
    for name, rows in values.items():
        if name == LENGTH:
            out[name] = pa.array(np.array(rows, dtype=np.int32))
            continue
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        flat = np.concatenate(rows).reshape(-1) if rows else np.zeros(0, np.float16)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), TEXT_WIDTH)
        out[name] = pa.ListArray.from_arrays(pa.array(offsets), inner)
    return out


def _add_text(layout: OutputLayout, path: str, sink: str, tensors: list[str], storage: str) -> int:
    """Adds the text columns that are not tensors to a staged part, in the contract's column
    order (key, latent columns, text columns, the rest); returns its new size in bytes."""
    spec = text_spec(storage)
    data = layout.read_bytes(path)
    if sink == "parquet":
        table = pq.read_table(pa.BufferReader(data))
        keys = [str(k) for k in table.column("key").to_pylist()]
        added = _trimmed_arrays(
            {n: [text_of(storage, k)[n] for k in keys] for n, c in spec.items() if n not in table.column_names}
        )
        columns = {n: table.column(n) for n in table.column_names}
        columns.update(added)
        order = ["key", *tensors, *spec, *(n for n in table.column_names if n not in ("key", *tensors, *spec))]
        buf = io.BytesIO()
        pq.write_table(pa.table({n: columns[n] for n in order}), buf, compression="zstd", row_group_size=1024)
        new = buf.getvalue()
    else:
        samples: list[dict[str, Any]] = []
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                base, ext = base_plus_ext(member.name)
                if not samples or samples[-1]["__key__"] != base:
                    samples.append({"__key__": base})
                extracted = tar.extractfile(member)
                samples[-1][ext] = extracted.read() if extracted is not None else b""
        for sample in samples:
            key = sample[KEY_MEMBER].decode() if KEY_MEMBER in sample else sample["__key__"]
            values = text_of(storage, key)
            for name in spec:
                if f"{name}.npy" not in sample:
                    buf = io.BytesIO()
                    np.save(buf, values[name])
                    sample[f"{name}.npy"] = buf.getvalue()
            first = [f"{n}.npy" for n in (*tensors, *spec)]
            ordered = {"__key__": sample["__key__"], **{e: sample[e] for e in first}}
            ordered.update({e: v for e, v in sample.items() if e not in ordered})
            sample.clear()
            sample.update(ordered)
        new = _tar(samples)
    layout.write_bytes(path, new)
    return len(new)
