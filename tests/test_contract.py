"""The output contract's types (``latentize.sinks.contract``): manifests, markers and error rows
of earlier versions read with defaults, files written through the types keep their bytes, and a
sample re-encoded in float32 is counted from a typed flag, not from its note."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray.data.block import BlockAccessor

from latentize.config import config_to_dict, load_config
from latentize.demo import photo_samples
from latentize.encoders import ENCODERS
from latentize.encoders.actor import EncodeActor
from latentize.encoders.base import resolved_source
from latentize.preprocess import preprocess_block
from latentize.preprocess.buckets import resolve_targets
from latentize.sinks import OutputLayout, stage_batch
from latentize.sinks.contract import (
    ErrorRow,
    Manifest,
    Marker,
    Totals,
    errors_table,
    read_errors,
    read_manifest,
    run_markers,
)
from latentize.sources.datasource import SAMPLE_SCHEMA
from latentize.status import format_status, output_status

#: A manifest as a run of this version writes it, after its first run (keys in file order).
RUN_MANIFEST: dict[str, Any] = {
    "format_version": 2,
    "fingerprint": "fp",
    "config": {"ray": {"dashboard": True}},
    "encoder": {"type": "kl", "constants": {"scaling_factor": 0.5}, "columns": {"latent": {"shape": [4, 8, 8]}}},
    "preprocess": {"size": None, "buckets": None, "resolutions": [[64, 64], [96, 64]], "crop": "center"},
    "output": {
        "format": "parquet",
        "dtype": "float16",
        "tensor_type": "fixed_shape_tensor",
        "data_folders": ["64x64", "96x64"],
        "folders": {
            "64x64": {"size": [64, 64], "resolution": [64, 64], "slot": 0, "columns": {}},
            "96x64": {
                "size": [96, 64],
                "resolution": [96, 64],
                "slot": 1,
                "columns": {"latent": {"shape": [4, 8, 12], "dtype": "float16"}},
            },
        },
        "rows_by_folder": {"64x64": 3, "96x64": 3},
    },
    "versions": {"latentize": "0"},
    "status": "complete",
    "shards": {"total": 2, "committed": 2, "failed": 0},
    "runs": [{"seconds": 1.0}],
    "samples": {"ok": 3, "failed": 1, "reencoded_fp32": 1},
    "updated_at": "2026-01-01T00:00:00Z",
}


def test_a_manifest_written_through_the_type_keeps_its_bytes() -> None:
    manifest = Manifest.from_json(RUN_MANIFEST)
    assert json.dumps(manifest.to_json()) == json.dumps(RUN_MANIFEST)
    assert manifest.slot_of == {"64x64": 0, "96x64": 1}
    assert manifest.output.folders["96x64"].columns["latent"].shape == (4, 8, 12)
    assert manifest.sizes() == [[(64, 64)], [(96, 64)]]
    assert manifest.setting("ray.dashboard") is True and manifest.setting("ray.address", "x") == "x"
    assert manifest["samples"] == RUN_MANIFEST["samples"]  # the file's entries by key, for scripts


def test_the_text_entry_is_written_only_for_runs_with_text() -> None:
    assert "text" not in Manifest.from_json(RUN_MANIFEST).to_json() and Manifest.from_json(RUN_MANIFEST).text is None
    text = {"preset": "sdxl", "storage": "padded", "columns": {}, "empty_prompt": "_empty_prompt.npz"}
    manifest = Manifest.from_json({**RUN_MANIFEST, "text": text, "later": 1})
    assert manifest.text == text and manifest.extra == {"later": 1}
    assert list(manifest.to_json())[4] == "text" and list(manifest.to_json())[-1] == "later"
    # A shard with samples the text encoder failed on is redone by --retry-failed, as encode failures.
    assert Marker.from_json({"status": "ok", "failed_by_stage": {"text": 1}}).retryable


def test_the_text_entry_is_a_field_written_after_the_encoder_only_when_present() -> None:
    text = {
        "preset": "sd3",
        "storage": "trimmed",
        "columns": {"prompt_embeds": {"shape": [None, 8], "dtype": "float16"}},
    }
    with_text = {**{k: v for k, v in RUN_MANIFEST.items() if k != "preprocess"}, "text": text}
    ordered = {k: with_text[k] for k in ("format_version", "fingerprint", "config", "encoder", "text")}
    ordered.update({"preprocess": RUN_MANIFEST["preprocess"]}, **{k: RUN_MANIFEST[k] for k in list(RUN_MANIFEST)[5:]})
    manifest = Manifest.from_json(ordered)
    assert manifest.text == text and "text" not in manifest.extra
    assert json.dumps(manifest.to_json()) == json.dumps(ordered)
    assert Manifest.from_json(RUN_MANIFEST).text is None and "text" not in Manifest.from_json(RUN_MANIFEST).to_json()


def test_older_manifests_and_markers_read_with_defaults() -> None:
    # A manifest of format 1 (no folders, no totals) with a key this version does not know.
    old = Manifest.from_json({"format_version": 1, "fingerprint": "fp", "encoder": {}, "legacy": [1]})
    assert old.output.format == "parquet" and old.output.folders == {} and old.output.rows_by_folder is None
    assert old.samples is None and old.shards is None and old.sizes() is None
    assert list(old.to_json())[-1] == "legacy"  # kept, where a rewrite would put it
    # A marker from before per-folder rows and the re-encode count.
    marker = Marker.from_json({"shard": "s", "status": "ok", "ok": 2, "files": ["256x256/s-000000000.parquet"]})
    assert (marker.rows, marker.reencoded_fp32, marker.samples, marker.failed) == (None, 0, None, 0)
    assert marker.succeeded and not marker.retryable
    assert Marker.from_json({"status": "ok", "failed_by_stage": {"encode": 1}}).retryable
    assert not Marker.from_json({"shard": "s", "ok": 1}).succeeded  # no status: not read to its end


def test_totals_of_markers_count_re_encoded_samples() -> None:
    markers = [
        Marker(shard="a", status="ok", ok=3, failed=1, reencoded_fp32=2, rows={"64x64": 3}),
        Marker(shard="b", status="failed", ok=1, rows={"64x64": 1, "96x64": 1}),
    ]
    totals = Totals.of(markers)
    assert (totals.committed, totals.failed_shards, totals.ok, totals.failed, totals.reencoded) == (2, 1, 4, 1, 2)
    assert totals.folders == {"64x64": 4, "96x64": 1}
    manifest = Manifest.from_json(RUN_MANIFEST).with_totals(totals, shards=3, updated_at="t")
    assert manifest.status == "incomplete" and manifest.to_json()["samples"] == {
        "ok": 4,
        "failed": 1,
        "reencoded_fp32": 2,
    }


def test_error_rows_read_back_at_the_schema_with_their_slot(tmp_path: Path) -> None:
    rows = [
        ErrorRow(key="a", shard="s", index=0, stage="decode", error="bad"),
        ErrorRow(key="b", shard="s", index=1, stage="encode", error="non-finite", slot=1),
    ]
    import pyarrow.parquet as pq

    pq.write_table(errors_table(rows), tmp_path / "new.parquet")
    table = read_errors((tmp_path / "new.parquet").read_bytes(), shard="s", slot_of={})
    assert table.to_pylist() == [r.to_json() for r in rows]
    # A table from before the slot column, whose reason named the folder instead.
    old = errors_table(rows).drop_columns(["slot"]).set_column(4, "error", pa.array(["bad", "at 96x64: non-finite"]))
    pq.write_table(old, tmp_path / "old.parquet")
    table = read_errors((tmp_path / "old.parquet").read_bytes(), shard="s", slot_of={"96x64": 1})
    assert table.column("slot").to_pylist() == [-1, 1]


def _output(tmp_path: Path) -> OutputLayout:
    """An output root of two committed shards, one of another run, one pending."""
    layout = OutputLayout(str(tmp_path / "out"))
    layout.write_json(layout.manifest_path, {**RUN_MANIFEST, "status": "incomplete"})
    layout.write_inputs([("/in/a.tar", "a"), ("/in/b.tar", "b"), ("/in/c.tar", "c")])
    layout.write_json(
        layout.marker_path("a"), Marker(shard="a", status="ok", ok=3, reencoded_fp32=2, fingerprint="fp").to_json()
    )
    layout.write_json(layout.marker_path("b"), {"shard": "b", "status": "ok", "ok": 5, "fingerprint": "fp"})
    layout.write_json(layout.marker_path("c"), {"shard": "c", "status": "ok", "ok": 7, "fingerprint": "other"})
    return layout


def test_status_counts_re_encoded_samples_from_the_markers(tmp_path: Path) -> None:
    layout = _output(tmp_path)
    manifest = read_manifest(layout)
    assert manifest is not None and set(run_markers(layout, manifest)) == {"a", "b"}
    status = output_status(layout)
    assert status["samples"] == {"ok": 8, "failed": 0} and status["reencoded_fp32"] == 2
    assert status["shards"]["pending_shards"] == ["c"]
    assert "2 of the ok samples re-encoded in float32" in format_status(status)


def test_the_encoder_flags_samples_re_encoded_in_float32_and_staging_counts_the_flags(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(
        base={
            "input": {"urls": "unused"},
            "output": {"path": str(tmp_path / "out")},
            "encoder": {"type": "kl", "model": str(tiny_models["kl"]), "dtype": "bfloat16"},
            "preprocess": {"resolution": 64},
        }
    )
    spec = ENCODERS.get(resolved_source(cfg)[0]).inspect(cfg)
    actor = EncodeActor(config=config_to_dict(cfg), spec=spec)
    encoder = actor.encoder
    original = encoder._forward

    def nan_below_fp32(model: torch.nn.Module, x: torch.Tensor, keys: Any) -> dict[str, torch.Tensor]:
        # Sample k1's latents are not finite in bfloat16, fine in float32.
        out = original(model, x, keys)
        if "k1" in keys and next(model.parameters()).dtype != torch.float32:
            out = {name: v.clone() for name, v in out.items()}
            for v in out.values():
                v[list(keys).index("k1")] = float("nan")
        return out

    monkeypatch.setattr(encoder, "_forward", nan_below_fp32)
    photos = [s.image for s in photo_samples(resolution=64)[:3]]
    rows = [
        {"key": f"k{i}", "shard": "s", "index": i, "image": image, "total": -1} for i, image in enumerate(photos)
    ] + [{"key": None, "shard": "s", "index": -1, "image": None, "total": 3}]
    block = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    pixels = preprocess_block(block, config=cfg.preprocess, targets=resolve_targets(cfg.preprocess, spec.downsample))
    out = actor(BlockAccessor.for_block(pixels).to_batch_format("numpy"))
    assert out.column("reencoded_fp32").to_pylist() == [False, True, False, False]
    assert "re-encoded in float32" in out.column("notes")[1].as_py()  # readers of the data see the note
    batch = BlockAccessor.for_block(out).to_batch_format("numpy")
    # Staging counts the flags: a note that says the same without the flag counts nothing.
    (report,) = stage_batch(
        batch,
        layout=OutputLayout(str(tmp_path / "out")),
        tensor_columns=["latent"],
        folder="64x64",
        sink_name="parquet",
        compression="zstd",
    ).to_pylist()
    assert [p["reencoded"] for p in report["parts"]] == [1]
    batch["reencoded_fp32"] = np.zeros(4, dtype=bool)
    (report,) = stage_batch(
        batch,
        layout=OutputLayout(str(tmp_path / "out")),
        tensor_columns=["latent"],
        folder="64x64",
        sink_name="parquet",
        compression="zstd",
    ).to_pylist()
    assert [p["reencoded"] for p in report["parts"]] == [0]
