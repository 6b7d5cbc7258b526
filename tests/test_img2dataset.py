"""img2dataset's output as a run's input, through the real job: its Parquet shards keep their
captions (``caption_field: auto`` reads its ``caption`` column) and failed downloads become error
rows that name img2dataset's status and message; the manifest shows the resolved field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from latentize.config import Config, load_config
from latentize.demo import ShardSample, failed_download, photo_samples, write_img2dataset_shard
from latentize.pipeline import plan, run

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


@pytest.mark.xfail(
    strict=True,
    reason="pipeline.plan does not yet call latentize.sources.resolve_input_fields (the manifest shows 'auto')",
)
def test_manifest_shows_the_resolved_caption_field(
    tmp_path: Path, i2d_parquet: tuple[str, list[ShardSample]], tiny_models: dict[str, Path]
) -> None:
    cfg = _config(i2d_parquet[0], tmp_path / "out", tiny_models["kl"])
    assert cfg.input.caption_field == "auto"
    p = plan(cfg)
    assert p.manifest["config"]["input"]["caption_field"] == "caption"
    assert p.config.input.caption_field == "caption"


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
