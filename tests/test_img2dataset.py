"""img2dataset's output as a run's input, through the real job: its Parquet shards keep their
captions (``caption_field: auto`` reads its ``caption`` column) and failed downloads become error
rows that name img2dataset's status and message; the manifest shows the resolved field."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from img2dataset_layout import ROWS_PER_BLOCK, write_output

from latentize.cli import _run_line
from latentize.config import Config, load_config
from latentize.demo import ShardSample, failed_download, photo_samples, write_img2dataset_shard
from latentize.pipeline import EncodeActor, plan, run

RES = 64


def _samples(shard: int) -> list[ShardSample]:
    photos = photo_samples(resolution=RES, shard=shard)[:4]
    lost = failed_download(f"{shard:05d}0004", caption="a photo that is gone")
    return [photos[0], photos[1], lost, photos[2], photos[3]]


@pytest.fixture(scope="module")
def i2d_parquet(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[ShardSample]]:
    root = tmp_path_factory.mktemp("img2dataset")
    samples = []
    for shard in range(2):
        write_img2dataset_shard(str(root), shard, _samples(shard), fmt="parquet")
        samples += _samples(shard)
    return str(root / "*.parquet"), samples


def _config(urls: str, out: Path, model: Path) -> Config:
    return load_config(
        base={
            "input": {"urls": urls},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(model), "batch_size": 4},
            "output": {"path": str(out)},
        }
    )


def test_manifest_shows_the_resolved_caption_field(
    tmp_path: Path, i2d_parquet: tuple[str, list[ShardSample]], tiny_models: dict[str, Path]
) -> None:
    cfg = _config(i2d_parquet[0], tmp_path / "out", tiny_models["kl"])
    assert cfg.input.caption_field == "auto"
    p = plan(cfg)
    assert p.manifest["config"]["input"]["caption_field"] == "caption"
    assert p.config.input.caption_field == "caption"
    # The fingerprint is the resolved config's: naming the column gives the same run.
    named = _config(i2d_parquet[0], tmp_path / "out", tiny_models["kl"])
    named.input.caption_field = "caption"
    assert plan(named).fingerprint == p.fingerprint


def test_missing_optional_column_is_logged_once_by_the_plan(
    tmp_path: Path,
    i2d_parquet: tuple[str, list[ShardSample]],
    tiny_models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """img2dataset's Parquet output has no ``json`` column (``input.json_field``'s default)."""
    with caplog.at_level(logging.WARNING, logger="latentize"):
        plan(_config(i2d_parquet[0], tmp_path / "out", tiny_models["kl"]))
    found = [r.getMessage() for r in caplog.records if "input.json_field" in r.getMessage()]
    assert len(found) == 1 and "column 'json' is not in the parquet files" in found[0], found


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_img2dataset_parquet_keeps_captions_and_names_failed_downloads(
    tmp_path: Path, i2d_parquet: tuple[str, list[ShardSample]], tiny_models: dict[str, Path]
) -> None:
    urls, samples = i2d_parquet
    out = tmp_path / "out"
    summary = run(_config(urls, out, tiny_models["kl"]))
    assert (summary.samples_ok, summary.samples_failed) == (8, 2) and summary.complete

    data = pq.read_table(out, columns=["key", "caption"]).to_pylist()
    expected: dict[str, Any] = {s.key: s.caption for s in samples if s.image is not None}
    assert {row["key"]: row["caption"] for row in data} == expected
    errors = pq.read_table(out / "_errors").to_pylist()
    assert sorted(e["key"] for e in errors) == ["000000004", "000010004"]
    for error in errors:
        assert error["stage"] == "read"
        assert error["error"] == "img2dataset: failed_to_download: HTTP Error 404: Not Found"


# --- runs over img2dataset's real layouts ---------------------------------------------------

#: Bucketed, multi-resolution and flipped runs (and one fixed size), small enough for a CPU.
_MODES: dict[str, dict[str, Any]] = {
    "buckets-flip": {"buckets": [[64, 64], [96, 64], [64, 96]], "flip": True},
    "resolutions-flip": {"resolutions": [64, 96], "flip": True},
    "resolutions-buckets": {"resolutions": [64, 128], "buckets": [[64, 64], [96, 64], [64, 96]]},
    "fixed": {"resolution": 64},
}


@pytest.fixture
def ordered_blocks() -> Iterator[None]:
    """Ray Data hands blocks on in read order, so that the encoder's batches (and the blocks
    they make) are the same on every run: with ``ROWS_PER_BLOCK`` rows per block, a batch of
    the all-failed shards holds null rows only."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    yield
    options.preserve_order = before


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session", "ordered_blocks")
@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("webdataset", "buckets-flip"),
        ("parquet", "buckets-flip"),
        ("webdataset", "resolutions-flip"),
        ("parquet", "resolutions-buckets"),
        ("parquet", "fixed"),
    ],
)
def test_runs_over_img2dataset_layouts_write_every_key_once(
    tmp_path: Path, tiny_models: dict[str, Path], fmt: str, mode: str
) -> None:
    """Empty tars, all-failed Parquet shards, single-sample shards and end-of-shard rows alone
    in a block: every key once per resolution (data) or once in the errors tables."""
    layout = write_output(tmp_path / "img2dataset", fmt)
    out = tmp_path / "out"
    cfg = load_config(
        base={
            "input": {"urls": layout.urls, "rows_per_block": ROWS_PER_BLOCK},
            "preprocess": _MODES[mode],
            # One image per encoder call: a batch is a few rows, so null-only batches exist.
            "encoder": {"model": str(tiny_models["kl"]), "batch_size": 1},
            "output": {"path": str(out)},
        }
    )
    summary = run(cfg)
    failed = layout.read_errors + layout.decode_errors
    assert summary.complete and (summary.samples_ok, summary.samples_failed) == (len(layout.ok), len(failed))

    manifest = json.loads((out / "_manifest.json").read_text())
    folders = manifest["output"]["folders"]
    slots = len(cfg.preprocess.targets)
    per_slot: dict[int, list[str]] = {slot: [] for slot in range(slots)}
    for folder in manifest["output"]["rows_by_folder"]:
        table = pq.read_table(out / folder)
        assert ("latent_flipped" in table.column_names) == bool(cfg.preprocess.flip)
        per_slot[folders[folder]["slot"]] += table.column("key").to_pylist()
    for keys in per_slot.values():
        assert sorted(keys) == sorted(layout.ok)
    errors = pq.read_table(out / "_errors").to_pylist()
    assert sorted(e["key"] for e in errors) == sorted(failed)
    assert {e["slot"] for e in errors} == {-1}  # read and decode errors stand for every resolution
    stages = {e["key"]: e["stage"] for e in errors}
    assert {stages[k] for k in layout.decode_errors} == {"decode"}
    assert {stages[k] for k in layout.read_errors} <= {"read"}
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_shards").glob("*.json")}
    assert sorted(markers) == layout.shards and all(m["status"] == "ok" for m in markers.values())


def _slow_start_actor(seconds: float) -> type[EncodeActor]:
    """An encoder actor that takes ``seconds`` longer to start, as a large model's weights do
    (defined here, so Ray pickles it by value)."""

    class SlowStart(EncodeActor):
        def __init__(self, **kwargs: Any) -> None:
            time.sleep(seconds)
            super().__init__(**kwargs)

    return SlowStart


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_progress_is_live_and_the_summary_counts_what_was_encoded(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Progress lines at a steady interval from the start of the execution, while nothing is
    staged yet; the summary tells samples read from samples encoded (failed downloads were
    read errors, never encoded)."""
    layout = write_output(tmp_path / "img2dataset", "parquet")
    monkeypatch.setattr("latentize.pipeline.PROGRESS_EVERY_S", 0.25)
    cfg = load_config(
        base={
            "input": {"urls": layout.urls},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(tiny_models["kl"]), "batch_size": 4},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with caplog.at_level(logging.INFO, logger="latentize"):
        summary = run(cfg, encode_actor=_slow_start_actor(3.0))

    lines = [r for r in caplog.records if r.getMessage().startswith("progress:")]
    idle = re.compile(r"progress: 0/5 shards committed, 0 samples \(0 encoded, 0 failed\), 0\.0 img/s, .* ETA unknown")
    waiting = [r for r in lines if idle.match(r.getMessage())]
    assert len(waiting) >= 4, [r.getMessage() for r in lines]
    gaps = np.diff([r.created for r in lines])
    assert gaps.max() < 2.0, gaps  # steady, not only when a report arrives

    failed = len(layout.read_errors) + len(layout.decode_errors)
    assert summary.samples_now == len(layout.ok) + failed
    assert (summary.samples_ok_now, summary.samples_failed_now) == (len(layout.ok), failed)
    assert summary.failed_now_by_stage == {"decode": len(layout.decode_errors), "read": len(layout.read_errors)}
    line = _run_line(summary)
    assert f"read {summary.samples_now} samples from 5 shard(s): {len(layout.ok)} encoded, {failed} failed" in line
    assert f"({len(layout.decode_errors)} decode, {len(layout.read_errors)} read)" in line

    # A rerun has nothing to do: it says so without starting (or stopping) Ray.
    calls = request.getfixturevalue("no_ray")
    again = run(cfg)
    assert again.nothing_to_do and calls == []
