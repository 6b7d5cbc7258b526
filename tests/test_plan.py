"""``latentize plan``: the dry run counts shards and samples the ways it says, estimates the
output from the encoder's latent shapes, and writes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from latentize.cli import main
from latentize.config import Config, load_config
from latentize.demo import (
    ShardSample,
    build_demo_shards,
    failed_download,
    photo_images,
    photo_samples,
    write_img2dataset_shard,
    write_parquet_shard,
)
from latentize.estimate import estimate_run
from latentize.presets import PRESETS
from latentize.throughput import GPU_THROUGHPUT, GPUS, Throughput

RES = 64
# TAEF2 at 64²: 32 channels of 8x8, float16.
LATENT_BYTES = 32 * 8 * 8 * 2


def _config(urls: str, out: Path) -> Config:
    return load_config(
        base={
            "input": {"urls": urls},
            "preprocess": {"resolution": RES},
            "encoder": {"preset": "taef2"},
            "output": {"path": str(out)},
        }
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_plan_of_the_demo_shards_counts_them_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = build_demo_shards(str(tmp_path / "shards"), shards=2)
    out = tmp_path / "out"
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": str(tmp_path / "shards" / "{00000..00001}.tar"), "image_field": "jpg"},
                "preprocess": {"resolution": RES},
                "encoder": {"preset": "taef2"},
                "output": {"path": str(out)},
            }
        )
    )
    before = _snapshot(tmp_path)
    assert main(["plan", str(cfg), "--json", "--gpus", "1"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert _snapshot(tmp_path) == before  # not a byte written: no output root, no cache
    assert not out.exists()

    photos = len(photo_images())
    assert (found["shards"], found["shards_pending"]) == (2, 2)
    assert (found["samples"], found["samples_pending"], found["samples_exact"]) == (photos, photos, True)
    assert found["samples_counted_by"]["scan"] == 2  # WebDataset without _stats.json: read to the end
    assert found["input_bytes"] == sum(Path(u).stat().st_size for u in urls)
    folder = f"{RES}x{RES}"
    assert found["output_rows"] == {folder: photos}  # every demo photo decodes
    assert found["output_row_bytes"][folder]["tensors"] == LATENT_BYTES
    assert list(found["output_bytes"]) == [folder]
    assert photos * LATENT_BYTES < found["output_bytes"][folder] < photos * (LATENT_BYTES + 1000)
    assert found["decode_ms_per_image"] > 0 and found["decode_sample"]["ok"] == photos
    assert found["gpu_hours"] == dict.fromkeys(GPUS)  # no GPU throughput measured yet
    # On a GPU, the same pixels per batch as 256 images of 256², capped at 1,024 images.
    assert found["suggested"] == {"ray.actors": 1, "encoder.batch_size": 1024}

    # The plain text form says the same.
    assert main(["plan", str(cfg), "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert f"samples         {photos} ({photos} to encode), exact" in text and "nothing written" in text
    assert "--set ray.actors=1 --set encoder.batch_size=1024 (for 8 GPU(s) given;" in text
    assert "no measured throughput" in text
    assert not out.exists()


def _i2d_shards(root: Path, fmt: str) -> list[ShardSample]:
    everything = []
    for shard in range(3):
        photos = photo_samples(resolution=32, shard=shard)[: 3 + shard]
        samples = [*photos, failed_download(f"{shard:05d}9999", caption="gone")]
        write_img2dataset_shard(str(root), shard, samples, fmt=fmt)
        everything += samples
    return everything


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_img2dataset_stats_count_the_shards(tmp_path: Path, fmt: str) -> None:
    samples = _i2d_shards(tmp_path / "in", fmt)
    suffix = "tar" if fmt == "webdataset" else "parquet"
    found = estimate_run(_config(str(tmp_path / "in" / f"*.{suffix}"), tmp_path / "out"), sample_shards=1)
    downloaded = sum(s.image is not None for s in samples)
    # A tar holds the downloaded images only; img2dataset's Parquet a row per URL tried.
    assert found["samples"] == (downloaded if fmt == "webdataset" else len(samples))
    assert found["samples_exact"] and found["samples_counted_by"]["_stats.json"] == 3
    assert found["samples_counted_by"].get("scan", 0) == 0
    # Output rows: the failed downloads of the sampled Parquet shard are not data rows.
    rows = downloaded if fmt == "webdataset" else round(len(samples) * 3 / 4)
    assert found["output_rows"] == {f"{RES}x{RES}": rows}
    assert not (tmp_path / "out").exists()


def test_parquet_footers_count_up_to_a_limit_and_the_rest_is_estimated_by_size(tmp_path: Path) -> None:
    photos = photo_samples(resolution=32)
    for shard, n in enumerate((4, 6, 8)):
        write_parquet_shard(str(tmp_path / "in" / f"{shard:05d}.parquet"), photos[:n])
    urls = str(tmp_path / "in" / "*.parquet")
    exact = estimate_run(_config(urls, tmp_path / "out"), sample_shards=1)
    assert (exact["samples"], exact["samples_exact"]) == (18, True)
    assert exact["samples_counted_by"]["parquet metadata"] == 3
    bounded = estimate_run(_config(urls, tmp_path / "out"), sample_shards=1, footer_limit=2)
    assert bounded["samples_counted_by"] == {
        "_stats.json": 0,
        "parquet metadata": 2,
        "scan": 0,
        "estimated from size": 1,
    }
    assert not bounded["samples_exact"] and 14 <= bounded["samples"] <= 22
    assert not (tmp_path / "out").exists()


def test_several_resolutions_and_buckets_are_estimated_per_folder(tmp_path: Path) -> None:
    urls = build_demo_shards(str(tmp_path / "shards"), shards=1)
    photos = len(photo_images())
    sizes = {name: im.size for name, im in photo_images()}

    def plan_of(preprocess: dict[str, Any]) -> dict[str, Any]:
        cfg = load_config(
            base={
                "input": {"urls": urls},
                "preprocess": preprocess,
                "encoder": {"preset": "taef2"},
                "output": {"path": str(tmp_path / "out")},
            }
        )
        return estimate_run(cfg, sample_shards=1, sample_images=photos)

    multi = plan_of({"resolutions": [32, 64], "flip": True})
    # Every sample is a row in each resolution's folder; flip stores a second latent per row.
    assert multi["output_rows"] == {"32x32": photos, "64x64": photos}
    assert multi["output_row_bytes"]["32x32"]["tensors"] == 2 * 32 * 4 * 4 * 2
    assert multi["output_row_bytes"]["64x64"]["tensors"] == 2 * LATENT_BYTES

    buckets = plan_of({"buckets": [[64, 32], [48, 48], [32, 64]]})
    # Each photo in the bucket nearest its aspect ratio in log ratio (2:1, 1:1, 1:2: the
    # boundaries are at sqrt(2)), all of them sampled here.
    wide = sum(w / h > math.sqrt(2) for w, h in sizes.values())
    tall = sum(h / w > math.sqrt(2) for w, h in sizes.values())
    assert wide > 0
    expected = {"64x32": wide, "48x48": photos - wide - tall, "32x64": tall}
    assert buckets["output_rows"] == {k: v for k, v in expected.items() if v}
    assert buckets["output_row_bytes"]["48x48"]["tensors"] == 32 * 6 * 6 * 2
    assert not (tmp_path / "out").exists()


def test_gpu_hours_come_only_from_measured_throughput(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(GPU_THROUGHPUT) == set(PRESETS.names())
    assert all(set(row) == set(GPUS) for row in GPU_THROUGHPUT.values())
    measured: dict[str, Any] = {gpu: None for gpu in GPUS}
    measured["H100"] = Throughput(100.0, (256, 256), "bfloat16", 256, "a test figure")
    monkeypatch.setitem(GPU_THROUGHPUT, "taef2", measured)
    pq.write_table(
        pa.table({"key": [f"k{i}" for i in range(4)], "jpg": [s.image for s in photo_samples(resolution=32)[:4]]}),
        tmp_path / "00000.parquet",
    )
    found = estimate_run(_config(str(tmp_path / "00000.parquet"), tmp_path / "out"), sample_shards=1)
    # 100 images/s at 256² is 1,600 at 64² (cost in proportion to pixels): 4 images in 1/1440 h.
    assert found["gpu_hours"]["H100"] == round(4 / 1600 / 3600, 3)
    assert found["gpu_hours"]["H200"] is None
    assert found["throughput"]["H100"]["source"] == "a test figure"
    assert found["decode_cpus_per_gpu"]["H100"] == round(1600 * found["decode_ms_per_image"] / 1000, 1)


def test_suggested_batch_is_the_one_encode_would_use_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without GPUs encode runs CPU encoders with CPU batches (16 images of 256²);
    the plan must suggest that, not the GPU figure (256), and say what it planned for."""
    from latentize.encoders.pool import execution_for

    urls = build_demo_shards(str(tmp_path / "shards"), shards=1)
    cfg = _config(urls[0], tmp_path / "out")
    cfg.preprocess.resolution = 256
    for gpus, batch in ((0, 16), (1, 256)):
        found = estimate_run(cfg, sample_shards=1, sample_images=2, gpus=gpus)
        used = execution_for(cfg, {"GPU": float(gpus), "CPU": 8.0}).batch_size
        assert found["suggested"]["encoder.batch_size"] == used == batch
        assert found["suggested"]["ray.actors"] == 1
        assert found["suggested_for"]["encoders"] == ("gpu" if gpus else "cpu")

    # Without --gpus: this machine's GPUs, as a local Ray counts them (none visible here).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    found = estimate_run(cfg, sample_shards=1, sample_images=2)
    assert found["suggested_for"] == {
        "gpus": 0,
        "cpus": found["suggested_for"]["cpus"],
        "encoders": "cpu",
        "detected": True,
    }
    assert found["suggested"]["encoder.batch_size"] == 16


def test_zoo_presets_show_their_cpu_cost_relative_to_the_sd_vae_but_no_gpu_hours() -> None:
    """The new zoo's encoders have no GPU throughput measured: GPU-hours stay unknown, and plan
    shows the CPU-measured cost per image relative to the SD VAE's instead (never as GPU-hours)."""
    from latentize.config import load_config
    from latentize.estimate import _gpu_figures
    from latentize.throughput import CPU_COST

    new = ("qwen-image", "wan2.1", "wan2.2", "hunyuanimage-2.1", "janus", "emu3", "chameleon")
    assert set(new) <= set(CPU_COST) <= set(PRESETS.names())
    for name in new:
        found = _gpu_figures(load_config(base={"encoder": {"preset": name}, "output": {"path": "x"}}), 1e9, 1000, 5.0)
        assert found["gpu_hours"] == dict.fromkeys(GPUS), name
        assert found["encoder_cost"] == CPU_COST[name].to_dict() and found["encoder_cost"]["ratio"] > 0
    sd = _gpu_figures(load_config(base={"encoder": {"preset": "sdxl"}, "output": {"path": "x"}}), 1e9, 1000, 5.0)
    assert sd["gpu_hours"]["H200"] is not None and sd["encoder_cost"]["ratio"] == 1.0
    text = main_text({**_PLAN_TEXT, "encoder_cost": CPU_COST["emu3"].to_dict()})
    assert f"encoder cost    {CPU_COST['emu3'].ratio:.2f}x the SD VAE encoder's time per image on a CPU" in text


_PLAN_TEXT: dict[str, Any] = {
    "output": "out",
    "fresh": True,
    "samples_exact": True,
    "samples_counted_by": {"scan": 1},
    "decode_ms_per_image": 1.0,
    "shards": 1,
    "shards_pending": 1,
    "format": "webdataset",
    "samples": 1,
    "samples_pending": 1,
    "input_bytes": 10,
    "output_bytes": {},
    "output_rows": {},
    "gpu_hours": dict.fromkeys(GPUS),
    "suggested": {"ray.actors": 1},
    "suggested_for": {"gpus": 0, "cpus": 2, "encoders": "cpu", "detected": True},
}


def main_text(found: dict[str, Any]) -> str:
    from latentize.cli import _format_plan

    return _format_plan(found)


def test_text_columns_are_planned_and_warned_about_when_they_dwarf_the_latents(
    tmp_path: Path, tiny_text_pipelines: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    urls = build_demo_shards(str(tmp_path / "shards"), shards=1)
    photos = len(photo_images())

    def plan_of(text: dict[str, Any] | None) -> dict[str, Any]:
        cfg = load_config(
            base={
                "input": {"urls": urls},
                "preprocess": {"resolution": RES},
                "encoder": {"preset": "taef2"},
                "text": text,
                "output": {"path": str(tmp_path / "out")},
            }
        )
        return estimate_run(cfg, sample_shards=1, sample_images=photos)

    # The tiny FLUX.1 pipeline: T5 of width 96 at 512 tokens, CLIP-L pooled of width 32.
    flux = plan_of({"preset": "flux1", "model": str(tiny_text_pipelines["flux1"])})
    per_row = 512 * 96 * 2 + 32 * 2
    assert flux["text"]["bytes_per_row"] == per_row and flux["text"]["maximum"] is False
    assert flux["text"]["bytes"] == per_row * photos
    assert flux["output_row_bytes"]["64x64"]["text_embeddings"] == per_row
    assert flux["text"]["latent_bytes"] == LATENT_BYTES * photos
    assert per_row > 10 * LATENT_BYTES and "dominate the output" in flux["text"]["warning"]

    trimmed = plan_of(
        {"preset": "pixart-sigma", "model": str(tiny_text_pipelines["pixart-sigma"]), "storage": "trimmed"}
    )
    # Trimmed: the most a caption can take (300 tokens of width 96, and its length).
    assert trimmed["text"]["maximum"] is True and trimmed["text"]["bytes_per_row"] == 300 * 96 * 2 + 4

    cfg = tmp_path / "plan.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": urls},
                "preprocess": {"resolution": RES},
                "encoder": {"preset": "taef2"},
                "text": {"preset": "flux1", "model": str(tiny_text_pipelines["flux1"])},
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    assert main(["plan", str(cfg), "--sample-shards", "1"]) == 0
    printed = capsys.readouterr().out
    assert "  text            98.4 KB per row" in printed and "warning" in printed
    assert not (tmp_path / "out").exists()

    without = plan_of(None)
    assert without["text"] is None and "text_embeddings" not in without["output_row_bytes"]["64x64"]
