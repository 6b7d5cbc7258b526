"""Unit tests of latentize.sinks: atomic writes, staging, the shard tracker, per-shard commits
and the Parquet / WebDataset outputs (docs/architecture.md, "Output contract"). Everything is
called directly (no Ray); batches are built the way the encoder actors hand them to
:func:`stage_batch`.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentize.errors import LatentizeError
from latentize.sinks import OutputLayout, ShardTracker, commit_shard, data_folder, stage_batch
from latentize.sinks.commit import ERROR_SCHEMA

SHAPE = (4, 8, 8)
FOLDER = "64x64"
FINGERPRINT = "0123456789abcdef"
DATA_COLUMNS = ["key", "latent", "caption", "json", "notes", "width", "height", "crop_top", "crop_left"]


# --- batch builders ----------------------------------------------------------------------------


def latent_of(shard: str, index: int) -> np.ndarray:
    """A distinct, reproducible float16 latent per (shard, index)."""
    rng = np.random.default_rng([zlib.crc32(shard.encode()), index])
    return rng.standard_normal(SHAPE).astype(np.float16)


def sample(
    shard: str,
    index: int,
    *,
    error: str | None = None,
    stage: str | None = None,
    caption: bool = True,
    notes: str | None = None,
) -> dict[str, Any]:
    """One encoded sample row (an error row carries zero tensors, as the encoder actor makes)."""
    key = f"{shard}{index:04d}"
    failed = error is not None
    return {
        "key": key,
        "shard": shard,
        "index": index,
        "caption": f"a photo {key}" if caption else None,
        "json": json.dumps({"key": key, "index": index}) if caption else None,
        "notes": notes,
        "error": error,
        "stage": stage,
        "total": -1,
        "width": -1 if failed else 640 + index,
        "height": -1 if failed else 480,
        "crop_top": -1 if failed else 0,
        "crop_left": -1 if failed else 80 + index,
        "latent": np.zeros(SHAPE, np.float16) if failed else latent_of(shard, index),
    }


def sentinel(shard: str, total: int, error: str | None = None) -> dict[str, Any]:
    """The end-of-shard row: no key, index -1, ``total`` samples read."""
    return {
        "key": None,
        "shard": shard,
        "index": -1,
        "caption": None,
        "json": None,
        "notes": None,
        "error": error,
        "stage": "read" if error else None,
        "total": total,
        "width": -1,
        "height": -1,
        "crop_top": -1,
        "crop_left": -1,
        "latent": np.zeros(SHAPE, np.float16),
    }


_INTS = {
    "index": np.int64,
    "total": np.int64,
    "width": np.int32,
    "height": np.int32,
    "crop_top": np.int32,
    "crop_left": np.int32,
}


def batch_of(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch as Ray hands it over: an all-null string column arrives as a
    float array of NaN, a mixed one as an object array of str/None."""
    batch: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if isinstance(values[0], np.ndarray):  # tensor columns: (N, *shape)
            batch[name] = np.stack(values)
        elif name in _INTS:
            batch[name] = np.array(values, dtype=_INTS[name])
        elif all(v is None for v in values):
            batch[name] = np.full(len(values), np.nan)
        else:
            batch[name] = np.array(values, dtype=object)
    return batch


def stage(layout: OutputLayout, rows: list[dict[str, Any]], tensor_columns: tuple[str, ...] = ("latent",)):
    return stage_batch(batch_of(rows), layout=layout, tensor_columns=list(tensor_columns)).to_pydict()


def reports(staged: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """stage_batch's output as the keyword arguments of ShardTracker.add."""
    return [
        {
            "shard": str(staged["shard"][i]),
            "part": str(staged["part"][i]),
            "indices": np.asarray(staged["indices"][i]),
            "total": int(staged["total"][i]),
            "shard_error": staged["shard_error"][i],
        }
        for i in range(len(staged["shard"]))
    ]


def commit(
    layout: OutputLayout,
    shard: str,
    parts: list[str],
    total: int,
    shard_error: str | None = None,
    *,
    sink: str = "parquet",
    tensor_columns: tuple[str, ...] = ("latent",),
) -> dict[str, Any]:
    return commit_shard(
        layout=layout,
        shard=shard,
        url=f"s3://bucket/{shard}.tar",
        parts=parts,
        total=total,
        shard_error=shard_error,
        tensor_columns=list(tensor_columns),
        folder=FOLDER,
        sink_name=sink,
        compression="zstd",
        fingerprint=FINGERPRINT,
    )


def stage_and_track(
    layout: OutputLayout, *batches: list[dict[str, Any]]
) -> dict[str, tuple[list[str], int, str | None]]:
    """Stages batches, feeds every report to a tracker, pops shards as they complete."""
    tracker = ShardTracker()
    done = {}
    for rows in batches:
        for report in reports(stage(layout, rows)):
            if tracker.add(**report):
                done[report["shard"]] = tracker.pop(report["shard"])
    assert tracker.incomplete() == {}
    return done


@pytest.fixture()
def layout(tmp_path: Path) -> OutputLayout:
    return OutputLayout(str(tmp_path / "out"))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --- layout ----------------------------------------------------------------------------------


def test_layout_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = OutputLayout("rel/out/")
    assert layout.root == str(tmp_path / "rel" / "out")
    assert layout.is_local
    assert layout.marker_path("00001") == f"{layout.root}/_shards/00001.json"
    assert layout.errors_path("00001") == f"{layout.root}/_errors/00001.parquet"
    assert layout.staging_dir("00001") == f"{layout.root}/_staging/00001"
    assert layout.data_path(data_folder((96, 64)), "00001", "tar") == f"{layout.root}/96x64/00001.tar"
    with pytest.raises(LatentizeError, match="output.path is empty"):
        OutputLayout("")


def test_write_bytes_replaces_without_leaving_temp_files(layout: OutputLayout, tmp_path: Path) -> None:
    target = layout.join("sub", "file.bin")
    layout.write_bytes(target, b"first")
    layout.write_bytes(target, b"second version")
    assert Path(target).read_bytes() == b"second version"
    assert files_under(tmp_path / "out") == ["sub/file.bin"]  # no hidden .tmp left behind


def test_write_bytes_is_all_or_nothing(layout: OutputLayout, monkeypatch) -> None:
    target = layout.join("file.bin")
    layout.write_bytes(target, b"old")

    def crash(src: str, dst: str) -> None:
        # The new bytes are complete in the temporary file, beside the target, before the swap.
        assert Path(src).parent == Path(dst).parent and Path(src).read_bytes() == b"new"
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        layout.write_bytes(target, b"new")
    assert Path(target).read_bytes() == b"old"  # readers never see a partial file


def test_json_round_trip_and_markers(layout: OutputLayout) -> None:
    assert layout.read_json(layout.manifest_path) is None
    assert layout.read_markers() == {}
    layout.write_json(layout.marker_path("00003"), {"shard": "00003", "ok": 2})
    assert layout.read_markers() == {"00003": {"shard": "00003", "ok": 2}}


# --- staging ---------------------------------------------------------------------------------


def test_stage_batch_writes_one_part_per_shard(layout: OutputLayout, tmp_path: Path) -> None:
    rows = [
        sample("00000", 0),
        sample("00001", 0),
        sample("00000", 1),
        sample("00001", 1),
        sample("00000", 2, error="cannot identify image file", stage="decode"),
        sentinel("00001", 2),
    ]
    out = stage(layout, rows)

    assert set(out) == {"shard", "part", "indices", "total", "shard_error"}
    got = {
        (str(s), p != "", tuple(int(i) for i in ix), int(t))
        for s, p, ix, t in zip(out["shard"], out["part"], out["indices"], out["total"], strict=False)
    }
    assert got == {("00000", True, (0, 1, 2), -1), ("00001", True, (0, 1), -1), ("00001", False, (), 2)}
    assert list(out["shard_error"]) == [None, None, None]

    parts = {str(s): str(p) for s, p in zip(out["shard"], out["part"], strict=False) if p}
    for shard, part in parts.items():
        assert Path(part).parent == tmp_path / "out" / "_staging" / shard
    table = pq.read_table(parts["00000"])
    assert table.column("key").to_pylist() == ["000000000", "000000001", "000000002"]
    assert table.column("index").to_pylist() == [0, 1, 2]
    assert table.column("error").to_pylist() == [None, None, "cannot identify image file"]
    assert table.column("stage").to_pylist() == [None, None, "decode"]
    assert isinstance(table.column("latent").type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(
        table.column("latent").combine_chunks().to_numpy_ndarray()[:2],
        np.stack([latent_of("00000", 0), latent_of("00000", 1)]),
    )


def test_stage_batch_with_all_null_text_columns(layout: OutputLayout) -> None:
    rows = [sample("00000", i, caption=False) for i in range(3)] + [sentinel("00000", 3)]
    batch = batch_of(rows)
    assert batch["error"].dtype == np.float64 and np.isnan(batch["error"]).all()
    out = stage_batch(batch, layout=layout, tensor_columns=["latent"]).to_pydict()
    part = next(p for p in out["part"] if p)
    table = pq.read_table(part)
    for name in ("error", "stage", "caption", "json", "notes"):
        assert table.schema.field(name).type == pa.string()
        assert table.column(name).null_count == 3
    sentinel_row = list(out["part"]).index("")
    assert out["shard_error"][sentinel_row] is None and out["total"][sentinel_row] == 3


def test_sentinel_reports_the_shard_error(layout: OutputLayout) -> None:
    out = stage(layout, [sample("00007", 0), sentinel("00007", 1, error="OSError: truncated tar")])
    row = list(out["part"]).index("")
    assert out["shard_error"][row] == "OSError: truncated tar"
    assert out["total"][row] == 1


def test_restaging_the_same_rows_reuses_the_part_name(layout: OutputLayout, tmp_path: Path) -> None:
    rows = [sample("00000", i) for i in range(4)]
    first = stage(layout, rows)
    second = stage(layout, list(rows))  # a retried task with the same rows
    assert list(first["part"]) == list(second["part"])
    assert len(list((tmp_path / "out" / "_staging" / "00000").iterdir())) == 1
    other = stage(layout, rows[2:])
    assert other["part"][0] != first["part"][0]


# --- tracker ---------------------------------------------------------------------------------


def report(shard: str, indices: list[int], part: str | None = None) -> dict[str, Any]:
    return {
        "shard": shard,
        "part": part or f"p-{shard}-{indices}",
        "indices": np.array(indices, np.int64),
        "total": -1,
        "shard_error": None,
    }


def end(shard: str, total: int, error: str | None = None) -> dict[str, Any]:
    return {"shard": shard, "part": "", "indices": np.zeros(0, np.int64), "total": total, "shard_error": error}


def test_tracker_completes_only_with_all_indices_and_the_sentinel() -> None:
    t = ShardTracker()
    assert not t.add(**report("a", [2, 3]))
    assert not t.add(**report("b", [0]))
    assert not t.add(**report("a", [0]))
    assert t.incomplete() == {"a": (3, None), "b": (1, None)}
    assert not t.add(**end("a", 4))  # sentinel seen, index 1 still missing
    assert t.incomplete()["a"] == (3, 4)
    assert t.add(**report("a", [1]))
    parts, total, error = t.pop("a")
    assert total == 4 and error is None
    assert parts == sorted([report("a", [2, 3])["part"], report("a", [0])["part"], report("a", [1])["part"]])
    assert t.incomplete() == {"b": (1, None)}


def test_tracker_sentinel_last_and_empty_shard() -> None:
    t = ShardTracker()
    assert not t.add(**report("a", [0, 1]))
    assert t.add(**end("a", 2))
    assert t.add(**end("empty", 0))
    assert t.pop("empty") == ([], 0, None)


def test_tracker_ignores_duplicates_and_late_reports() -> None:
    t = ShardTracker()
    assert not t.add(**report("a", [0, 1], part="p1"))
    assert not t.add(**report("a", [0, 1], part="p1"))  # a retried task: same part again
    assert not t.add(**report("a", [1, 2], part="p2"))  # overlapping redo
    assert t.incomplete() == {"a": (3, None)}
    assert not t.add(**end("a", 4))
    assert t.add(**report("a", [3], part="p3"))
    assert t.pop("a") == (["p1", "p2", "p3"], 4, None)
    # After the hand-off to its commit, late duplicates never reopen or re-complete the shard.
    assert not t.add(**report("a", [3], part="p3"))
    assert not t.add(**end("a", 4))
    assert t.incomplete() == {}


def test_tracker_does_not_complete_on_out_of_range_indices() -> None:
    t = ShardTracker()
    assert not t.add(**report("a", [0, 5]))
    assert not t.add(**end("a", 2))


def test_tracker_keeps_the_shard_error() -> None:
    t = ShardTracker()
    t.add(**report("a", [0]))
    assert t.add(**end("a", 1, error="OSError: truncated"))
    assert t.pop("a")[2] == "OSError: truncated"


# --- commit: parquet -------------------------------------------------------------------------


def test_commit_merges_parts_into_one_row_per_index(layout: OutputLayout, tmp_path: Path) -> None:
    out = tmp_path / "out"
    layout.write_json(layout.manifest_path, {"fingerprint": FINGERPRINT})
    batch1 = [
        sample("00000", 0),
        sample("00000", 1),
        sample("00000", 2, error="cannot identify image file", stage="decode"),
        sample("00000", 3),
    ]
    # A redone batch overlapping the first one (indices 2 and 3 staged twice).
    batch2 = [
        sample("00000", 5),
        sample("00000", 2, error="cannot identify image file", stage="decode"),
        sample("00000", 3),
        sample("00000", 4),
        sentinel("00000", 6),
    ]
    done = stage_and_track(layout, batch1, batch2)
    parts, total, shard_error = done["00000"]
    assert len(parts) == 2 and total == 6

    marker = commit(layout, "00000", parts, total, shard_error)

    # Plain pyarrow reads the root: data only (no _errors, _shards, _manifest.json, _staging).
    table = pq.read_table(out)
    assert table.column_names == DATA_COLUMNS
    ok = [0, 1, 3, 4, 5]
    assert table.column("key").to_pylist() == [f"00000{i:04d}" for i in ok]  # input order
    assert table.column("width").to_pylist() == [640 + i for i in ok]
    assert table.column("crop_left").to_pylist() == [80 + i for i in ok]
    assert table.column("caption").to_pylist() == [f"a photo 00000{i:04d}" for i in ok]
    assert json.loads(table.column("json")[0].as_py()) == {"key": "000000000", "index": 0}
    latent = table.column("latent")
    assert latent.type.extension_name == "arrow.fixed_shape_tensor"
    assert latent.type.shape == list(SHAPE) and latent.type.value_type == pa.float16()
    np.testing.assert_array_equal(
        latent.combine_chunks().to_numpy_ndarray(), np.stack([latent_of("00000", i) for i in ok])
    )
    assert pq.read_table(out / FOLDER / "00000.parquet").num_rows == 5

    # The failed sample is an error row only, once.
    errors = pq.read_table(out / "_errors" / "00000.parquet")
    assert errors.schema == ERROR_SCHEMA
    assert errors.to_pylist() == [
        {"key": "000000002", "shard": "00000", "index": 2, "stage": "decode", "error": "cannot identify image file"}
    ]

    on_disk = json.loads((out / "_shards" / "00000.json").read_text())
    assert on_disk == marker
    assert marker["status"] == "ok" and marker["error"] is None
    assert (marker["samples"], marker["ok"], marker["failed"]) == (6, 5, 1)
    assert marker["files"] == [f"{FOLDER}/00000.parquet", "_errors/00000.parquet"]
    assert marker["fingerprint"] == FINGERPRINT and marker["url"] == "s3://bucket/00000.tar"
    assert not (out / "_staging" / "00000").exists()
    assert files_under(out) == ["64x64/00000.parquet", "_errors/00000.parquet", "_manifest.json", "_shards/00000.json"]


def test_shards_with_and_without_captions_read_as_one_table(layout: OutputLayout, tmp_path: Path) -> None:
    # One shard with captions, one whose caption/json/error columns are all null (NaN floats
    # in the batch): both files must share one schema for a plain dataset read.
    done = stage_and_track(
        layout,
        [sample("00000", 0), sample("00000", 1), sentinel("00000", 2)],
        [sample("00001", 0, caption=False), sentinel("00001", 1)],
    )
    for shard, (parts, total, error) in done.items():
        commit(layout, shard, parts, total, error)
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 3
    assert sorted(table.column("key").to_pylist()) == ["000000000", "000000001", "000010000"]
    assert table.schema.field("caption").type == pa.string()
    assert not (tmp_path / "out" / "_errors").exists()


def test_notes_reach_the_parquet_output(layout: OutputLayout, tmp_path: Path) -> None:
    # Non-fatal findings travel with data rows; a shard without any (all-NaN column in the
    # batch) still writes a string column, so both files read as one table.
    done = stage_and_track(
        layout,
        [
            sample("00000", 0, notes="upscaled from 12x9"),
            sample("00000", 1),
            sample("00000", 2, notes="caption is not valid UTF-8 (undecodable bytes replaced)"),
            sentinel("00000", 3),
        ],
        [sample("00001", 0), sentinel("00001", 1)],
    )
    for shard, (parts, total, error) in done.items():
        commit(layout, shard, parts, total, error)
    table = pq.read_table(tmp_path / "out").sort_by("key")
    assert table.column_names == DATA_COLUMNS
    assert table.schema.field("notes").type == pa.string()
    assert table.column("notes").to_pylist() == [
        "upscaled from 12x9",
        None,
        "caption is not valid UTF-8 (undecodable bytes replaced)",
        None,
    ]


def test_failed_shard_keeps_rows_read_before_the_failure(layout: OutputLayout, tmp_path: Path) -> None:
    done = stage_and_track(layout, [sample("00002", 0), sentinel("00002", 1, error="OSError: truncated tar")])
    marker = commit(layout, "00002", *done["00002"])
    assert marker["status"] == "failed" and marker["error"] == "OSError: truncated tar"
    assert (marker["samples"], marker["ok"], marker["failed"]) == (1, 1, 0)
    assert pq.read_table(tmp_path / "out").column("key").to_pylist() == ["000020000"]


def test_all_failed_and_empty_shards(layout: OutputLayout, tmp_path: Path) -> None:
    done = stage_and_track(
        layout, [sample("00003", 0, error="boom", stage="encode"), sentinel("00003", 1), sentinel("00004", 0)]
    )
    failed = commit(layout, "00003", *done["00003"])
    assert failed["files"] == ["_errors/00003.parquet"] and (failed["ok"], failed["failed"]) == (0, 1)
    empty = commit(layout, "00004", *done["00004"])
    assert empty["files"] == [] and (empty["samples"], empty["ok"], empty["failed"]) == (0, 0, 0)
    assert empty["status"] == "ok"
    assert not (tmp_path / "out" / FOLDER).exists()


def test_commit_refuses_a_shard_with_missing_rows(layout: OutputLayout) -> None:
    part = str(stage(layout, [sample("00000", 0), sample("00000", 1)])["part"][0])
    with pytest.raises(RuntimeError, match="expected 3"):
        commit(layout, "00000", [part], 3)
    assert layout.read_markers() == {}  # no marker: the shard stays pending


def test_several_tensor_columns(layout: OutputLayout, tmp_path: Path) -> None:
    # sample="moments": two tensor columns per row instead of `latent`.
    rows = [sample("00000", i) for i in range(2)]
    for i, r in enumerate(rows):
        r["mean"] = r.pop("latent")
        r["logvar"] = (latent_of("00000", i) * 2).astype(np.float16)
    out = stage_batch(batch_of(rows), layout=layout, tensor_columns=["mean", "logvar"]).to_pydict()
    marker = commit(layout, "00000", [str(out["part"][0])], 2, tensor_columns=("mean", "logvar"))
    table = pq.read_table(tmp_path / "out" / marker["files"][0])
    assert table.column_names[:3] == ["key", "mean", "logvar"]
    np.testing.assert_array_equal(
        table.column("logvar").combine_chunks().to_numpy_ndarray()[1], latent_of("00000", 1) * 2
    )


# --- commit: webdataset ----------------------------------------------------------------------


def test_webdataset_sink(layout: OutputLayout, tmp_path: Path) -> None:
    import webdataset as wds

    rows = [
        sample("00000", 0),
        sample("00000", 1, caption=False),
        sample("00000", 2, error="bad", stage="decode"),
        sample("00000", 3),
    ]
    done = stage_and_track(layout, rows[::-1] + [sentinel("00000", 4)])
    marker = commit(layout, "00000", *done["00000"], sink="webdataset")
    path = tmp_path / "out" / FOLDER / "00000.tar"
    assert marker["files"] == [f"{FOLDER}/00000.tar", "_errors/00000.parquet"]

    with tarfile.open(path) as tar:
        names = tar.getnames()
    # Samples in input order, each one's members contiguous; no member for a missing caption.
    assert [n.split(".", 1)[0] for n in names] == ["000000000"] * 3 + ["000000001"] + ["000000003"] * 3
    assert set(names) == {
        "000000000.latent.npy",
        "000000000.txt",
        "000000000.json",
        "000000001.latent.npy",
        "000000003.latent.npy",
        "000000003.txt",
        "000000003.json",
    }

    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000003"]
    for s, i in zip(samples, [0, 1, 3], strict=False):
        assert s["latent.npy"].dtype == np.float16
        np.testing.assert_array_equal(s["latent.npy"], latent_of("00000", i))
    assert samples[0]["txt"] == "a photo 000000000"
    assert samples[0]["json"] == {"key": "000000000", "index": 0}
    assert "txt" not in samples[1] and "json" not in samples[1]


def test_webdataset_output_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    blobs = []
    for run in ("a", "b"):
        layout = OutputLayout(str(tmp_path / run))
        done = stage_and_track(layout, [sample("00000", 0), sample("00000", 1), sentinel("00000", 2)])
        commit(layout, "00000", *done["00000"], sink="webdataset")
        blobs.append((tmp_path / run / FOLDER / "00000.tar").read_bytes())
    assert blobs[0] == blobs[1]
