"""Unit tests of latentize.sinks: atomic writes, staging, the shard tracker, per-shard commits
and the Parquet / WebDataset outputs (docs/architecture.md, "Output contract"). Everything is
called directly (no Ray); batches are built the way the encoder actors hand them to
:func:`stage_batch`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentize.errors import LatentizeError
from latentize.sinks import OutputLayout, ShardTracker, commit_shard, data_folder, stage_batch
from latentize.sinks.base import read_parquet_bytes
from latentize.sinks.commit import ERROR_SCHEMA, Part, ShardCommit, choose_parts
from latentize.sinks.layout import final_name

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
    reencoded: bool = False,
) -> dict[str, Any]:
    """One encoded sample row (an error row carries zero tensors, as the encoder actor makes;
    ``reencoded``: the actor re-encoded it in float32, which it flags and notes)."""
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
        "read_node": None,
        "width": -1 if failed else 640 + index,
        "height": -1 if failed else 480,
        "crop_top": -1 if failed else 0,
        "crop_left": -1 if failed else 80 + index,
        "latent": np.zeros(SHAPE, np.float16) if failed else latent_of(shard, index),
        "reencoded_fp32": reencoded,
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
        "read_node": None,
        "width": -1,
        "height": -1,
        "crop_top": -1,
        "crop_left": -1,
        "latent": np.zeros(SHAPE, np.float16),
        "reencoded_fp32": False,
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


def stage(
    layout: OutputLayout,
    rows: list[dict[str, Any]],
    tensor_columns: tuple[str, ...] = ("latent",),
    sink: str = "parquet",
) -> list[dict[str, Any]]:
    """stage_batch's reports for ``rows``, as plain dicts (what the driver's Committer sees)."""
    table = stage_batch(
        batch_of(rows),
        layout=layout,
        tensor_columns=list(tensor_columns),
        folder=FOLDER,
        sink_name=sink,
        compression="zstd",
    )
    return table.to_pylist()


def commit(layout: OutputLayout, done: ShardCommit, *, sink: str = "parquet") -> dict[str, Any]:
    """The shard's marker, as its file holds it."""
    return commit_shard(
        layout=layout, commit=done, url=f"s3://bucket/{done.shard}.tar", sink_name=sink, fingerprint=FINGERPRINT
    ).to_json()


def stage_and_track(
    layout: OutputLayout, *batches: list[dict[str, Any]], sink: str = "parquet"
) -> dict[str, ShardCommit]:
    """Stages batches, feeds every report to a tracker, pops shards as they complete."""
    tracker = ShardTracker()
    done = {}
    for rows in batches:
        for report in stage(layout, rows, sink=sink):
            if tracker.add(report):
                done[report["shard"]] = tracker.pop(report["shard"])
    assert tracker.incomplete() == {}
    return done


@pytest.fixture()
def layout(tmp_path: Path) -> OutputLayout:
    return OutputLayout(str(tmp_path / "out"))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def data_file(shard: str, first: int = 0, extension: str = "parquet") -> str:
    return f"{FOLDER}/{final_name(shard, first, extension)}"


# --- layout ----------------------------------------------------------------------------------


def test_read_parquet_bytes_holds_no_reference_to_its_bytes_once_it_returns() -> None:
    """Ledger, inputs and errors files are read from bytes in memory. A reference to them left
    behind on an Arrow pool thread (``pq.read_table``'s scanner leaves one now and then) can be
    dropped after the interpreter began to exit, which aborts the process (SIGABRT, seen on
    ``latentize encode`` reruns with nothing to do)."""
    written = pa.table({"shard": [f"{i:05d}" for i in range(50)], "marker": ["{}"] * 50})
    buf = io.BytesIO()
    pq.write_table(written, buf)
    data = buf.getvalue()
    alone = sys.getrefcount(data)
    left = 0
    for _ in range(300):
        table = read_parquet_bytes(data, columns=["shard"])
        left += sys.getrefcount(data) != alone
        assert table.column_names == ["shard"] and table.num_rows == 50
        del table
    assert left == 0
    assert read_parquet_bytes(data).equals(written)


def test_layout_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = OutputLayout("rel/out/")
    assert layout.root == str(tmp_path / "rel" / "out")
    assert layout.is_local
    assert layout.marker_path("00001") == f"{layout.root}/_shards/00001.json"
    assert layout.errors_path("00001") == f"{layout.root}/_errors/00001.parquet"
    assert layout.staging_dir("00001") == f"{layout.root}/_staging/00001"
    staged = layout.staged_path("00001", data_folder((96, 64)), 512, "abc123", "tar")
    assert staged == f"{layout.root}/_staging/00001/96x64/part-000000512-abc123.tar"
    assert layout.final_path(staged) == f"{layout.root}/96x64/00001-000000512.tar"
    with pytest.raises(ValueError, match="not a staged part"):
        layout.final_path(layout.join("96x64", "00001-000000512.tar"))
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


def test_publish_is_a_hard_link_that_keeps_the_staged_file(layout: OutputLayout) -> None:
    staged = layout.staged_path("00000", FOLDER, 0, "d1", "parquet")
    layout.write_bytes(staged, b"latents")
    final = layout.final_path(staged)
    layout.publish(staged, final)
    layout.publish(staged, final)  # a retried commit publishes again
    assert Path(final).read_bytes() == b"latents"
    assert os.path.samefile(staged, final)  # the same bytes on disk: nothing was copied
    assert Path(staged).exists()  # the resume logic still finds it until the marker exists


def test_json_round_trip_and_markers(layout: OutputLayout) -> None:
    assert layout.read_json(layout.manifest_path) is None
    assert layout.read_markers() == {}
    layout.write_json(layout.marker_path("00003"), {"shard": "00003", "ok": 2})
    assert layout.read_markers() == {"00003": {"shard": "00003", "ok": 2}}


def test_markers_come_from_the_ledger_and_the_listing(layout: OutputLayout) -> None:
    for shard in ("a", "b"):
        layout.write_json(layout.marker_path(shard), {"shard": shard, "ok": 1})
    layout.write_ledger({"a": json.dumps({"shard": "a", "ok": 1, "from": "ledger"}), "b": '{"shard": "b", "ok": 1}'})
    layout.write_json(layout.marker_path("c"), {"shard": "c", "ok": 3})  # committed after the ledger
    Path(layout.marker_path("b")).unlink()  # a marker removed since: the shard no longer counts
    assert layout.read_markers() == {
        "a": {"shard": "a", "ok": 1, "from": "ledger"},
        "c": {"shard": "c", "ok": 3},
    }
    assert layout.committed_shards() == {"a", "c"}


def test_remove_files_in_bulk_ignores_missing(layout: OutputLayout) -> None:
    paths = [layout.join("x", f"{i}.bin") for i in range(3)]
    for p in paths[:2]:
        layout.write_bytes(p, b"1")
    layout.remove_files(paths)
    assert layout.list_files(layout.join("x")) == []


def test_discard_removes_leftovers_of_uncommitted_shards_only(layout: OutputLayout) -> None:
    def staged(shard: str, first: int) -> str:
        path = layout.staged_path(shard, FOLDER, first, "d", "parquet")
        layout.write_bytes(path, b"part")
        layout.publish(path, layout.final_path(path))
        return path

    kept = staged("done", 0)  # committed; its staging survived a crash before the bulk delete
    layout.write_json(layout.marker_path("done"), {"shard": "done", "files": [data_file("done")]})
    layout.write_bytes(layout.errors_path("done"), b"e")
    crashed = [staged("crashed", 0), staged("crashed", 2)]  # copied, never marked
    layout.write_bytes(layout.errors_path("crashed"), b"e")
    markers = layout.read_marker_texts()
    removed = layout.discard({"crashed", "never-started"}, markers)
    assert removed == 5
    left = {layout.relative(p) for p in layout.list_files(layout.root)}
    assert left == {
        layout.relative(kept),
        data_file("done"),
        "_errors/done.parquet",
        "_shards/done.json",
    }
    assert all(not Path(p).exists() for p in crashed)


def test_discard_of_committed_shards_survives_a_crash_half_way(layout: OutputLayout, monkeypatch) -> None:
    files = [data_file("bad"), "_errors/bad.parquet"]
    for f in files:
        layout.write_bytes(layout.join(f), b"x")
    layout.write_json(layout.marker_path("bad"), {"shard": "bad", "status": "failed", "files": files})
    layout.write_json(layout.marker_path("good"), {"shard": "good", "status": "ok", "files": []})
    markers = layout.read_marker_texts()
    real_remove = layout.remove_files
    calls = 0

    def crash_after_markers(paths):
        nonlocal calls
        calls += 1
        real_remove(paths)
        if calls == 1:  # the markers are gone, the files not yet
            raise KeyboardInterrupt

    monkeypatch.setattr(layout, "remove_files", crash_after_markers)
    with pytest.raises(KeyboardInterrupt):
        layout.discard({"bad"}, markers)
    monkeypatch.undo()
    assert layout.committed_shards() == {"good"}
    assert all(Path(layout.join(f)).exists() for f in files)  # orphans for now...
    # ...which the next resume (not retrying anything itself) finishes from the discard list.
    layout.discard({"bad"}, layout.read_marker_texts())
    assert not any(Path(layout.join(f)).exists() for f in files)
    assert layout.list_files(layout.join("_staging")) == []
    assert layout.committed_shards() == {"good"}


# --- staging ---------------------------------------------------------------------------------


def test_stage_batch_writes_ok_rows_per_shard_and_reports_the_rest(layout: OutputLayout, tmp_path: Path) -> None:
    rows = [
        sample("00000", 1),
        sample("00001", 0),
        sample("00000", 0),
        sample("00001", 1),
        sample("00000", 2, error="cannot identify image file", stage="decode"),
        sentinel("00001", 2),
    ]
    rows[-1]["read_node"] = "node-1"
    out = {r["shard"]: r for r in stage(layout, rows)}
    assert set(out) == {"00000", "00001"}
    assert out["00000"]["total"] == -1 and out["00001"]["total"] == 2
    assert out["00001"]["read_node"] == "node-1" and out["00001"]["shard_error"] is None
    assert out["00000"]["errors"] == [
        {"key": "000000002", "index": 2, "stage": "decode", "error": "cannot identify image file", "slot": -1}
    ]
    (part,) = out["00000"]["parts"]
    assert part["folder"] == FOLDER and part["indices"] == [0, 1] and part["reencoded"] == 0 and part["slot"] == 0
    assert Path(part["path"]).parent == tmp_path / "out" / "_staging" / "00000" / FOLDER
    assert part["bytes"] == Path(part["path"]).stat().st_size
    # The part is already the final file: data columns only, ok rows only, in index order.
    table = pq.read_table(part["path"])
    assert table.column_names == DATA_COLUMNS
    assert table.column("key").to_pylist() == ["000000000", "000000001"]
    assert isinstance(table.column("latent").type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(
        table.column("latent").combine_chunks().to_numpy_ndarray(),
        np.stack([latent_of("00000", 0), latent_of("00000", 1)]),
    )


def test_an_encode_error_names_its_folder_only_in_runs_of_several_sizes(layout: OutputLayout) -> None:
    # Every row carries its slot and folder (a run of one size too); only a run of several
    # sizes names the folder in an encode error's reason.
    rows = [sample("00000", 0, error="non-finite latents", stage="encode"), sentinel("00000", 1)]
    for r in rows:
        r["slot"], r["folder"] = (0, FOLDER) if r["index"] >= 0 else (-1, None)
    for several, reason in ((False, "non-finite latents"), (True, f"at {FOLDER}: non-finite latents")):
        (report,) = stage_batch(
            batch_of(rows),
            layout=layout,
            tensor_columns=["latent"],
            folder=FOLDER,
            sink_name="parquet",
            compression="zstd",
            name_folders=several,
        ).to_pylist()
        assert [(e["error"], e["slot"]) for e in report["errors"]] == [(reason, 0)]


def test_stage_batch_with_all_null_text_columns(layout: OutputLayout) -> None:
    rows = [sample("00000", i, caption=False) for i in range(3)] + [sentinel("00000", 3)]
    batch = batch_of(rows)
    assert batch["error"].dtype == np.float64 and np.isnan(batch["error"]).all()
    (report,) = stage_batch(
        batch, layout=layout, tensor_columns=["latent"], folder=FOLDER, sink_name="parquet", compression="zstd"
    ).to_pylist()
    table = pq.read_table(report["parts"][0]["path"])
    for name in ("caption", "json", "notes"):
        assert table.schema.field(name).type == pa.string()
        assert table.column(name).null_count == 3
    assert report["shard_error"] is None and report["total"] == 3 and report["errors"] == []


def test_sentinel_reports_the_shard_error(layout: OutputLayout) -> None:
    (report,) = stage(layout, [sample("00007", 0), sentinel("00007", 1, error="OSError: truncated tar")])
    assert report["shard_error"] == "OSError: truncated tar"
    assert report["total"] == 1


def test_restaging_the_same_rows_reuses_the_part_name(layout: OutputLayout, tmp_path: Path) -> None:
    rows = [sample("00000", i) for i in range(4)]
    first = stage(layout, rows)[0]["parts"][0]["path"]
    second = stage(layout, list(rows))[0]["parts"][0]["path"]  # a retried task with the same rows
    assert first == second
    assert len(list((tmp_path / "out" / "_staging" / "00000" / FOLDER).iterdir())) == 1
    other = stage(layout, rows[2:])[0]["parts"][0]["path"]
    assert other != first


def test_stage_batch_groups_rows_by_their_folder_column(layout: OutputLayout) -> None:
    rows = [sample("00000", i) for i in range(3)]
    batch = batch_of(rows)
    batch["folder"] = np.array(["64x64", "96x64", "64x64"], dtype=object)
    (report,) = stage_batch(
        batch, layout=layout, tensor_columns=["latent"], folder="unused", sink_name="parquet", compression="zstd"
    ).to_pylist()
    assert [(p["folder"], p["indices"]) for p in report["parts"]] == [("64x64", [0, 2]), ("96x64", [1])]


# --- tracker ---------------------------------------------------------------------------------


def report(shard: str, indices: list[int], path: str | None = None, errors: list[int] = ()) -> dict[str, Any]:
    return {
        "shard": shard,
        "parts": [
            {"folder": FOLDER, "path": path or f"p-{shard}-{indices}", "indices": indices, "bytes": 1, "reencoded": 0}
        ]
        if indices
        else [],
        "errors": [{"key": f"k{i}", "index": i, "stage": "decode", "error": "bad"} for i in errors],
        "total": -1,
        "shard_error": None,
        "read_node": None,
    }


def end(shard: str, total: int, error: str | None = None) -> dict[str, Any]:
    return {"shard": shard, "parts": [], "errors": [], "total": total, "shard_error": error, "read_node": "n1"}


def paths(done: ShardCommit) -> list[str]:
    return sorted(p.path for p in done.parts)


def test_tracker_completes_only_with_all_indices_and_the_sentinel() -> None:
    t = ShardTracker()
    assert not t.add(report("a", [2, 3]))
    assert not t.add(report("b", [0]))
    assert not t.add(report("a", [], errors=[0]))
    assert t.incomplete() == {"a": (3, None), "b": (1, None)}
    assert not t.add(end("a", 4))  # sentinel seen, index 1 still missing
    assert t.incomplete()["a"] == (3, 4)
    assert t.add(report("a", [1]))
    done = t.pop("a")
    assert done.total == 4 and done.shard_error is None and done.read_node == "n1"
    assert paths(done) == sorted(["p-a-[2, 3]", "p-a-[1]"])
    assert [e["index"] for e in done.errors] == [0]
    assert t.incomplete() == {"b": (1, None)}


def test_tracker_sentinel_last_and_empty_shard() -> None:
    t = ShardTracker()
    assert not t.add(report("a", [0, 1]))
    assert t.add(end("a", 2))
    assert t.add(end("empty", 0))
    empty = t.pop("empty")
    assert (empty.parts, empty.errors, empty.total) == ([], [], 0)


def test_tracker_ignores_duplicates_and_late_reports() -> None:
    t = ShardTracker()
    assert not t.add(report("a", [0, 1], path="p1"))
    assert not t.add(report("a", [0, 1], path="p1"))  # a retried task: same part again
    assert not t.add(report("a", [1, 2], path="p2"))  # overlapping redo
    assert not t.add(report("a", [], errors=[2]))
    assert not t.add(report("a", [], errors=[2]))
    assert t.incomplete() == {"a": (3, None)}
    assert not t.add(end("a", 4))
    assert t.add(report("a", [3], path="p3"))
    done = t.pop("a")
    assert paths(done) == ["p1", "p2", "p3"] and len(done.errors) == 1
    # After the hand-off to its commit, late duplicates never reopen or re-complete the shard.
    assert not t.add(report("a", [3], path="p3"))
    assert not t.add(end("a", 4))
    assert t.incomplete() == {}


def test_tracker_does_not_complete_on_out_of_range_indices() -> None:
    t = ShardTracker()
    assert not t.add(report("a", [0, 5]))
    assert not t.add(end("a", 2))


def test_tracker_keeps_the_shard_error() -> None:
    t = ShardTracker()
    t.add(report("a", [0]))
    assert t.add(end("a", 1, error="OSError: truncated"))
    assert t.pop("a").shard_error == "OSError: truncated"


def _part(path: str, indices: list[int], folder: str = FOLDER) -> Part:
    return Part(folder, path, np.array(indices, np.int64), 1, 0)


def test_choose_parts_publishes_disjoint_parts_and_drops_repeats() -> None:
    parts = [_part("b", [2, 3]), _part("a", [0, 1]), _part("a-again", [0]), _part("c", [4], folder="96x64")]
    publish, merge = choose_parts(parts)
    assert sorted(p.path for p in publish) == ["a", "b", "c"] and merge == []


def test_choose_parts_merges_a_folder_whose_parts_overlap_partly() -> None:
    parts = [_part("a", [0, 1]), _part("b", [1, 2]), _part("c", [0], folder="96x64")]
    publish, merge = choose_parts(parts)
    assert [p.path for p in publish] == ["c"]
    assert sorted(p.path for p in merge) == ["a", "b"]


# --- commit: parquet -------------------------------------------------------------------------


def test_commit_publishes_parts_writes_errors_then_the_marker(layout: OutputLayout, tmp_path: Path) -> None:
    out = tmp_path / "out"
    layout.write_json(layout.manifest_path, {"fingerprint": FINGERPRINT})
    batch1 = [sample("00000", 3), sample("00000", 0), sample("00000", 1)]
    batch2 = [
        sample("00000", 5),
        sample("00000", 2, error="cannot identify image file", stage="decode"),
        sample("00000", 4),
        sentinel("00000", 6),
    ]
    done = stage_and_track(layout, batch1, batch2)["00000"]
    assert len(done.parts) == 2 and done.total == 6
    staged_bytes = sum(p.bytes for p in done.parts)

    marker = commit(layout, done)

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
    # Each staged part became one data file, unchanged: no latent byte was written twice.
    for p in done.parts:
        assert os.path.samefile(p.path, layout.final_path(p.path))

    # The failed sample is an error row only, once.
    errors = pq.read_table(out / "_errors" / "00000.parquet")
    assert errors.schema == ERROR_SCHEMA
    assert errors.to_pylist() == [
        {
            "key": "000000002",
            "shard": "00000",
            "index": 2,
            "stage": "decode",
            "error": "cannot identify image file",
            "slot": -1,
        }
    ]

    on_disk = json.loads((out / "_shards" / "00000.json").read_text())
    assert on_disk == marker
    assert marker["status"] == "ok" and marker["error"] is None
    assert (marker["samples"], marker["ok"], marker["failed"]) == (6, 5, 1)
    assert marker["rows"] == {FOLDER: 5} and marker["bytes"] == staged_bytes
    assert marker["files"] == [data_file("00000", 0), data_file("00000", 4), "_errors/00000.parquet"]
    assert marker["fingerprint"] == FINGERPRINT and marker["url"] == "s3://bucket/00000.tar"
    assert marker["failed_by_stage"] == {"decode": 1}


def test_commit_merges_parts_that_retries_staged_overlapping(layout: OutputLayout, tmp_path: Path) -> None:
    batch1 = [sample("00000", i) for i in (0, 1, 3)] + [sample("00000", 2, error="bad", stage="decode")]
    # A redone batch overlapping the first one partly (index 3 staged twice, in other groupings).
    batch2 = [sample("00000", 5), sample("00000", 2, error="bad", stage="decode"), sample("00000", 3)]
    batch3 = [sample("00000", 4), sentinel("00000", 6)]
    done = stage_and_track(layout, batch1, batch2, batch3)["00000"]
    marker = commit(layout, done)
    (data,) = (f for f in marker["files"] if not f.startswith("_"))
    table = pq.read_table(tmp_path / "out" / data)
    assert table.column("key").to_pylist() == [f"00000{i:04d}" for i in (0, 1, 3, 4, 5)]
    np.testing.assert_array_equal(
        table.column("latent").combine_chunks().to_numpy_ndarray(),
        np.stack([latent_of("00000", i) for i in (0, 1, 3, 4, 5)]),
    )
    assert (marker["ok"], marker["failed"]) == (5, 1)
    assert pq.read_table(tmp_path / "out").num_rows == 5


def test_shards_with_and_without_captions_read_as_one_table(layout: OutputLayout, tmp_path: Path) -> None:
    # One shard with captions, one whose caption/json/error columns are all null (NaN floats
    # in the batch): both files must share one schema for a plain dataset read.
    done = stage_and_track(
        layout,
        [sample("00000", 0), sample("00000", 1), sentinel("00000", 2)],
        [sample("00001", 0, caption=False), sentinel("00001", 1)],
    )
    for shard_commit in done.values():
        commit(layout, shard_commit)
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
            sample("00000", 2, notes="re-encoded in float32 (non-finite in the compute dtype)", reencoded=True),
            sentinel("00000", 3),
        ],
        [sample("00001", 0), sentinel("00001", 1)],
    )
    markers = [commit(layout, c) for c in done.values()]
    table = pq.read_table(tmp_path / "out").sort_by("key")
    assert table.column_names == DATA_COLUMNS
    assert table.schema.field("notes").type == pa.string()
    assert table.column("notes").to_pylist() == [
        "upscaled from 12x9",
        None,
        "re-encoded in float32 (non-finite in the compute dtype)",
        None,
    ]
    assert [m["reencoded_fp32"] for m in markers] == [1, 0]


def test_failed_shard_keeps_rows_read_before_the_failure(layout: OutputLayout, tmp_path: Path) -> None:
    done = stage_and_track(layout, [sample("00002", 0), sentinel("00002", 1, error="OSError: truncated tar")])
    marker = commit(layout, done["00002"])
    assert marker["status"] == "failed" and marker["error"] == "OSError: truncated tar"
    assert (marker["samples"], marker["ok"], marker["failed"]) == (1, 1, 0)
    assert pq.read_table(tmp_path / "out").column("key").to_pylist() == ["000020000"]


def test_all_failed_and_empty_shards(layout: OutputLayout, tmp_path: Path) -> None:
    done = stage_and_track(
        layout, [sample("00003", 0, error="boom", stage="encode"), sentinel("00003", 1), sentinel("00004", 0)]
    )
    failed = commit(layout, done["00003"])
    assert failed["files"] == ["_errors/00003.parquet"] and (failed["ok"], failed["failed"]) == (0, 1)
    empty = commit(layout, done["00004"])
    assert empty["files"] == [] and (empty["samples"], empty["ok"], empty["failed"]) == (0, 0, 0)
    assert empty["status"] == "ok"
    assert not (tmp_path / "out" / FOLDER).exists()


def test_several_tensor_columns(layout: OutputLayout, tmp_path: Path) -> None:
    # sample="moments": two tensor columns per row instead of `latent`.
    rows = [sample("00000", i) for i in range(2)] + [sentinel("00000", 2)]
    for i, r in enumerate(rows):
        r["mean"] = r.pop("latent")
        r["logvar"] = (latent_of("00000", i) * 2).astype(np.float16)
    tracker = ShardTracker()
    for r in stage(layout, rows, tensor_columns=("mean", "logvar")):
        tracker.add(r)
    marker = commit(layout, tracker.pop("00000"))
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
    done = stage_and_track(layout, rows[::-1] + [sentinel("00000", 4)], sink="webdataset")
    marker = commit(layout, done["00000"], sink="webdataset")
    path = tmp_path / "out" / data_file("00000", 0, "tar")
    assert marker["files"] == [data_file("00000", 0, "tar"), "_errors/00000.parquet"]

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
    for s, i in zip(samples, [0, 1, 3], strict=True):
        assert s["latent.npy"].dtype == np.float16
        np.testing.assert_array_equal(s["latent.npy"], latent_of("00000", i))
    assert samples[0]["txt"] == "a photo 000000000"
    assert samples[0]["json"] == {"key": "000000000", "index": 0}
    assert "txt" not in samples[1] and "json" not in samples[1]


def test_webdataset_merge_keeps_each_sample_once(layout: OutputLayout, tmp_path: Path) -> None:
    import webdataset as wds

    batches = [[sample("00000", 0), sample("00000", 1)], [sample("00000", 1), sample("00000", 2)]]
    done = stage_and_track(layout, *batches, [sentinel("00000", 3)], sink="webdataset")
    marker = commit(layout, done["00000"], sink="webdataset")
    (path,) = marker["files"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    for s, i in zip(samples, range(3), strict=True):
        np.testing.assert_array_equal(s["latent.npy"], latent_of("00000", i))
        assert s["txt"] == f"a photo 00000{i:04d}"


#: Keys that WebDataset's split at the first dot of a name would cut, or that look escaped.
AWKWARD_KEYS = ["img.000.v2.jpg", "img.001.v2.jpg", "dir.x/photo.png", "100%.jpg", "a%2Eb", "plain"]


@pytest.mark.parametrize("overlap", [False, True], ids=["parts", "merged"])
def test_webdataset_output_keeps_dotted_keys_for_webdataset_readers(
    layout: OutputLayout, tmp_path: Path, overlap: bool
) -> None:
    """Parquet input keys such as ``img.000.v2.jpg``: webdataset's reader, the sink's merge
    (parts that retried tasks staged overlapping) and the QA read the same samples, each key
    back from its member key (``unquote``) and from ``KEY.key.txt``; notes travel too."""
    import webdataset as wds

    from latentize.qa.scan import DataFile, TensorColumn, read_data_file

    rows = [sample("00000", i, notes="upscaled from 40x30" if i == 2 else None) for i in range(len(AWKWARD_KEYS))]
    for row, key in zip(rows, AWKWARD_KEYS, strict=True):
        row["key"] = key
    batches = [rows[:4], rows[2:]] if overlap else [rows[:3], rows[3:]]
    done = stage_and_track(layout, *batches, [sentinel("00000", len(rows))], sink="webdataset")
    marker = commit(layout, done["00000"], sink="webdataset")
    files = [f for f in marker["files"] if f.endswith(".tar")]
    assert len(files) == (1 if overlap else 2)

    samples = [s for f in files for s in wds.WebDataset(str(tmp_path / "out" / f), shardshuffle=False).decode()]
    assert [unquote(s["__key__"]) for s in samples] == AWKWARD_KEYS
    assert [s.get("key.txt", s["__key__"]) for s in samples] == AWKWARD_KEYS
    assert [s["__key__"] for s in samples if "key.txt" not in s] == ["plain"]
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s["latent.npy"], latent_of("00000", i))
        assert s["txt"] == f"a photo 00000{i:04d}"
        assert s.get("notes.txt") == ("upscaled from 40x30" if i == 2 else None)

    column = TensorColumn(name="latent", shape=SHAPE, dtype="float16")
    read = [
        t
        for f in files
        for t in read_data_file(layout, DataFile(layout.join(f), "00000", FOLDER), fmt="webdataset", columns=[column])
    ]
    assert [k for t in read for k in t.column("key").to_pylist()] == AWKWARD_KEYS


def test_webdataset_output_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    blobs = []
    for run in ("a", "b"):
        layout = OutputLayout(str(tmp_path / run))
        done = stage_and_track(
            layout, [sample("00000", 0), sample("00000", 1), sentinel("00000", 2)], sink="webdataset"
        )
        commit(layout, done["00000"], sink="webdataset")
        blobs.append((tmp_path / run / data_file("00000", 0, "tar")).read_bytes())
    assert blobs[0] == blobs[1]


def test_tracker_of_several_resolutions_waits_for_every_slot() -> None:
    t = ShardTracker(slots=2)
    first = report("a", [0, 1])
    first["parts"][0]["slot"] = 0
    assert not t.add(first)
    assert not t.add(end("a", 3))
    assert t.incomplete()["a"] == (2, 3)
    second = report("a", [0, 1], path="p-512")
    second["parts"][0]["slot"] = 1
    assert not t.add(second)
    # Sample 2 failed to decode: one error row stands for both resolutions.
    assert t.add(report("a", [], errors=[2]))
    done = t.pop("a")
    assert sorted(p.slot for p in done.parts) == [0, 1] and len(done.errors) == 1


def test_tracker_counts_an_encode_error_for_its_resolution_only() -> None:
    t = ShardTracker(slots=2)
    ok = report("a", [0])
    ok["parts"][0]["slot"] = 0
    t.add(ok)
    failed = report("a", [], errors=[0])
    failed["errors"][0].update(stage="encode", slot=1)
    assert not t.add(end("a", 1))  # the 512 row of sample 0 is still missing
    assert t.add(failed)


def test_webdataset_sink_writes_every_tensor_column_flipped_ones_too(layout: OutputLayout, tmp_path: Path) -> None:
    import webdataset as wds

    rows = [sample("00000", i) for i in range(2)] + [sentinel("00000", 2)]
    for i, r in enumerate(rows):
        r["latent_flipped"] = (latent_of("00000", i)[:, :, ::-1] * 3).astype(np.float16)
    tracker = ShardTracker()
    for r in stage(layout, rows, tensor_columns=("latent", "latent_flipped"), sink="webdataset"):
        tracker.add(r)
    marker = commit(layout, tracker.pop("00000"), sink="webdataset")
    (path,) = marker["files"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / path), shardshuffle=False).decode())
    assert [sorted(k for k in s if k.endswith(".npy")) for s in samples] == [["latent.npy", "latent_flipped.npy"]] * 2
    np.testing.assert_array_equal(
        samples[1]["latent_flipped.npy"], (latent_of("00000", 1)[:, :, ::-1] * 3).astype(np.float16)
    )


# --- tensor layouts (output.tensor_type) -------------------------------------------------------


@pytest.mark.parametrize("tensor_type", ["fixed_shape_tensor", "list"])
@pytest.mark.parametrize(
    "values",
    [
        np.arange(2 * 4 * 3 * 5, dtype=np.float16).reshape(2, 4, 3, 5),
        np.arange(3 * 2 * 2, dtype=np.int16).reshape(3, 2, 2),  # VQ indices (h, w)
        np.zeros((0, 4, 2, 2), np.float32),
    ],
    ids=["latent", "indices", "empty"],
)
def test_tensor_layouts_round_trip(values: np.ndarray, tensor_type: str) -> None:
    from latentize.sinks.base import canonical_tensor, is_tensor_type, tensor_array, tensor_numpy

    array = tensor_array(values, tensor_type)
    assert is_tensor_type(array.type)
    if tensor_type == "list":
        assert pa.types.is_fixed_size_list(array.type) and array.type.list_size == values.shape[1]
    got = tensor_numpy(pa.chunked_array([array[:1], array[1:]], type=array.type))
    assert got.dtype == values.dtype and got.shape == values.shape
    np.testing.assert_array_equal(got, values)
    assert isinstance(canonical_tensor(array).type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(tensor_numpy(canonical_tensor(array)), values)


def test_list_tensor_type_writes_nested_fixed_size_lists(layout: OutputLayout) -> None:
    from latentize.sinks.base import tensor_numpy

    rows = [sample("00000", i) for i in range(3)]
    (report,) = stage_batch(
        batch_of([*rows, sentinel("00000", 3)]),
        layout=layout,
        tensor_columns=["latent"],
        folder=FOLDER,
        sink_name="parquet",
        compression="zstd",
        tensor_type="list",
    ).to_pylist()
    table = pq.read_table(report["parts"][0]["path"])
    assert str(table.schema.field("latent").type) == (
        "fixed_size_list<element: fixed_size_list<element: fixed_size_list<element: halffloat>[8]>[8]>[4]"
    )
    np.testing.assert_array_equal(tensor_numpy(table.column("latent")), np.stack([r["latent"] for r in rows]))
    assert table.column_names == DATA_COLUMNS
