"""The QA report end to end: Ray passes over real output roots (local and S3), the scale check,
findings with their keys, VQ usage, the CLI and the job entry point.

Outputs are built two ways: by the real job (tiny random models on real photos) and with planted
latents in the exact output layout (``tests/qa_outputs.py``), which is how unscaled latents,
NaNs and duplicates get in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from qa_outputs import kl_constants, sd_like_raw, write_output

from latentize.qa import QAOptions, run_qa
from latentize.qa.checks import normalization_map, scale_check
from latentize.qa.stats import LatentStats

REPO = Path(__file__).resolve().parents[1]
SD_SCALE = 0.18215


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert len(found) == 1, report["checks"]
    return found[0]


# --- the scale check as a pure function -------------------------------------------------


def _stored_summary(stored: np.ndarray) -> dict[str, Any]:
    stats = LatentStats(channels=stored.shape[1])
    stats.update(stored, [str(i) for i in range(len(stored))])
    return stats.to_dict()


@pytest.mark.parametrize(
    ("name", "stored_from_raw", "passes", "says"),
    [
        ("correct", lambda raw: raw * SD_SCALE, True, "within"),
        ("unscaled", lambda raw: raw, False, "looks unscaled"),
        ("scaled twice", lambda raw: raw * SD_SCALE * SD_SCALE, False, "looks scaled twice"),
        ("wrong shift", lambda raw: (raw + 5.0) * SD_SCALE, False, "shift_factor"),
    ],
)
def test_scale_check_catches_unscaled_doubly_scaled_and_shifted_latents(
    name: str, stored_from_raw: Any, passes: bool, says: str
) -> None:
    raw = sd_like_raw(64)
    encoder = {"type": "kl", "constants": kl_constants(SD_SCALE)}
    stored = stored_from_raw(raw)
    section, check = scale_check(
        _stored_summary(stored), normalization_map(encoder, 4), encoder, tolerance=0.35, shift_tolerance=0.5
    )
    assert (check.status == "pass") is passes, check
    assert says in check.message, check.message
    # The recommendation is 1 / std and the mean of the raw latents the manifest implies.
    implied_raw = stored / SD_SCALE
    assert section["recommended"]["scaling_factor"] == pytest.approx(1 / implied_raw.std(), rel=1e-9)
    assert section["recommended"]["shift_factor"] == pytest.approx(implied_raw.mean(), rel=1e-9)


def test_scale_check_of_latents_mean_std_form_and_raw_moments() -> None:
    raw = sd_like_raw(32)
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    constants = {
        "scaling_factor": 0.5,
        "shift_factor": 0.0,
        "latents_mean": mean.tolist(),
        "latents_std": std.tolist(),
        "applied": True,
    }
    encoder = {"type": "kl", "constants": constants}
    stored = (raw - mean[:, None, None]) * 0.5 / std[:, None, None]
    section, check = scale_check(
        _stored_summary(stored), normalization_map(encoder, 4), encoder, tolerance=0.35, shift_tolerance=0.5
    )
    # std 0.5 by construction of the constants (Playground's scaling_factor is 0.5 too).
    assert check.status == "fail" and section["normalized_std"] == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(section["recommended"]["latents_mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(section["recommended"]["latents_std"], std * 0.5, rtol=1e-9)

    # Raw moments (constants not applied) are judged after applying the manifest's formula.
    moments = {"type": "kl", "constants": {**kl_constants(SD_SCALE), "applied": False}}
    section, check = scale_check(
        _stored_summary(raw), normalization_map(moments, 4), moments, tolerance=0.35, shift_tolerance=0.5
    )
    assert check.status == "pass", check
    assert section["raw_std"] == pytest.approx(raw.std(), rel=1e-9)


# --- Ray passes over planted outputs ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_statistics_equal_numpy_and_a_correct_output_passes(tmp_path: Path) -> None:
    raw = sd_like_raw(150)
    stored = (raw * SD_SCALE).astype(np.float16)
    write_output(
        str(tmp_path / "out"),
        "latent",
        stored,
        constants=kl_constants(SD_SCALE),
        shards=3,
        errors={"00001": ["bad-a", "bad-b"]},
    )
    result = run_qa(str(tmp_path / "out"), options=QAOptions(sample=0))
    report = result.report
    assert result.passed, report["checks"]
    assert _check(report, "scale")["status"] == "pass"
    assert _check(report, "counts")["status"] == "pass"

    # Exactly numpy's figures on the whole output, read back by plain pyarrow.
    table = pq.read_table(tmp_path / "out")
    data = table.column("latent").combine_chunks().to_numpy_ndarray().astype(np.float64)
    per_channel = data.transpose(1, 0, 2, 3).reshape(4, -1)
    channels = report["statistics"]["latent"]["stored"]["channels"]
    for c, got in enumerate(channels):
        assert got["count"] == per_channel[c].size
        assert got["min"] == per_channel[c].min() and got["max"] == per_channel[c].max()
        assert got["mean"] == pytest.approx(per_channel[c].mean(), rel=1e-12)
        assert got["std"] == pytest.approx(per_channel[c].std(), rel=1e-12)
    pooled = report["statistics"]["latent"]["stored"]["all"]
    assert pooled["count"] == data.size and pooled["mean"] == pytest.approx(data.mean(), rel=1e-12)
    # Raw statistics undo the stored normalisation with the manifest's constants.
    raw_channels = report["statistics"]["latent"]["raw"]["channels"]
    assert raw_channels[0]["mean"] == pytest.approx(per_channel[0].mean() / SD_SCALE, rel=1e-12)
    assert raw_channels[0]["std"] == pytest.approx(per_channel[0].std() / SD_SCALE, rel=1e-12)
    assert report["alignment"]["totals"]["error_rows"] == 2
    assert {s["shard"]: s["data_rows"] for s in report["alignment"]["shards"]} == {
        "00000": 50,
        "00001": 50,
        "00002": 50,
    }

    written = json.loads(Path(result.json_path).read_text())
    assert written["passed"] is True and Path(result.html_path).stat().st_size > 10_000
    assert Path(result.json_path).parent == tmp_path / "out" / "_qa"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_both_tensor_layouts_give_the_same_report(tmp_path: Path) -> None:
    stored = (sd_like_raw(40) * SD_SCALE).astype(np.float16)
    reports = {}
    for tensor_type in ("fixed_shape_tensor", "list"):
        out = str(tmp_path / tensor_type)
        write_output(out, "latent", stored, constants=kl_constants(SD_SCALE), tensor_type=tensor_type)
        reports[tensor_type] = run_qa(out, options=QAOptions(sample=0)).report
    stored_type = pq.read_schema(next((tmp_path / "list" / "64x64").glob("*.parquet"))).field("latent").type
    assert str(stored_type).startswith("fixed_size_list<")
    assert reports["list"]["statistics"] == reports["fixed_shape_tensor"]["statistics"]
    assert reports["list"]["statistics"]["latent"]["stored"]["all"]["count"] == stored.size
    assert [c["status"] for c in reports["list"]["checks"]] == [
        c["status"] for c in reports["fixed_shape_tensor"]["checks"]
    ]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_unscaled_latents_under_a_manifest_that_says_0_18215_fail(tmp_path: Path) -> None:
    raw = sd_like_raw(60).astype(np.float16)
    write_output(str(tmp_path / "out"), "latent", raw, constants=kl_constants(SD_SCALE))
    result = run_qa(str(tmp_path / "out"), options=QAOptions(sample=0, report=str(tmp_path / "rep")))
    scale = _check(result.report, "scale")
    assert scale["status"] == "fail" and "looks unscaled" in scale["message"], scale
    assert not result.passed
    assert result.report["scale"]["recommended"]["scaling_factor"] == pytest.approx(
        1 / (raw.astype(np.float64) / SD_SCALE).std(), rel=1e-6
    )
    assert (tmp_path / "rep" / "report.html").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_nan_latent_duplicate_latent_and_repeated_key_are_reported_with_keys(tmp_path: Path) -> None:
    stored = (sd_like_raw(40) * SD_SCALE).astype(np.float32)
    keys = [f"k{i:03d}" for i in range(40)]
    stored[7, 2, 3, 3] = np.nan
    stored[31] = stored[12]  # the latents of k012 stored again under k031
    stored[20, 1, 0, 0] = 40.0  # an outlier far beyond 6 std
    keys[25] = "k005"  # the same key in two shards (shards hold rows 0-19 and 20-39)
    write_output(
        str(tmp_path / "out"), "latent", stored, constants=kl_constants(SD_SCALE), keys=keys, errors={"00000": ["k039"]}
    )
    report = run_qa(str(tmp_path / "out"), options=QAOptions(sample=0)).report
    finite = _check(report, "finite")
    assert finite["status"] == "fail" and "k007" in finite["message"]
    assert report["nonfinite"]["keys"] == ["k007"] and report["nonfinite"]["rows"] == 1
    assert report["statistics"]["latent"]["stored"]["channels"][2]["nonfinite"] == 1
    dup = _check(report, "duplicates")
    assert dup["status"] == "warn" and "k012" in dup["message"] and "k031" in dup["message"]
    assert report["duplicates"]["examples"][0]["keys"] == ["k012", "k031"]
    unique = _check(report, "keys_unique")
    assert unique["status"] == "fail" and "k005" in unique["message"]
    # k039 is both a data row (shard 00001) and an error row (shard 00000).
    assert {g[0] for g in report["alignment"]["duplicate_keys"]} == {"k005", "k039"}
    outliers = report["outliers"]
    assert outliers["worst"][0]["key"] == "k020" and outliers["worst"][0]["channel"] == 1
    assert outliers["worst"][0]["value"] == pytest.approx(40.0)
    assert _check(report, "outliers")["status"] == "warn"
    assert not report["passed"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_vq_usage_and_perplexity_equal_a_numpy_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    codes = 1024
    # Zipf-like usage with a dead tail: codes 0..599 only.
    p = 1.0 / np.arange(1, 601) ** 1.1
    indices = rng.choice(600, size=(90, 16, 16), p=p / p.sum()).astype(np.int16)
    write_output(
        str(tmp_path / "out"), "indices", indices, encoder_type="vq", constants={"codebook_size": codes, "embed_dim": 4}
    )
    report = run_qa(str(tmp_path / "out"), options=QAOptions(sample=0)).report
    book = report["codebook"]
    values, counts = np.unique(indices, return_counts=True)
    full = np.zeros(codes, dtype=np.int64)
    full[values] = counts
    assert book["counts"] == full.tolist()
    assert book["used"] == len(values) and book["dead"] == codes - len(values)
    prob = counts / counts.sum()
    assert book["perplexity"] == pytest.approx(float(np.exp(-(prob * np.log(prob)).sum())), rel=1e-12)
    assert book["top"][0]["code"] == int(values[np.argmax(counts)])
    assert report["scale"] == {"applicable": False}
    assert _check(report, "codebook_range")["status"] == "pass"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_qa_of_an_output_on_s3(s3: dict[str, Any]) -> None:
    from conftest import S3_BUCKET

    url = f"s3://{S3_BUCKET}/qa-out"
    stored = (sd_like_raw(30) * SD_SCALE).astype(np.float16)
    write_output(url, "latent", stored, constants=kl_constants(SD_SCALE), storage_options=s3)
    result = run_qa(url, options=QAOptions(sample=0, storage_options=s3))
    assert result.passed, result.report["checks"]
    assert result.html_path == f"{S3_BUCKET}/qa-out/_qa/report.html"
    import fsspec

    fs = fsspec.filesystem("s3", **s3)
    assert json.loads(fs.cat_file(result.json_path))["rows"]["data"] == 30


# --- the real job's outputs --------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], ray_session: None) -> Path:
    """A real output of the job: the tiny KL model on two shards of real photos (one corrupt)."""
    from latentize.config import load_config
    from latentize.demo import corrupt_samples, photo_samples, write_webdataset_shard
    from latentize.pipeline import run

    root = tmp_path_factory.mktemp("qa_job")
    photos = [p for p in photo_samples(resolution=64) if p.key]
    write_webdataset_shard(str(root / "in" / "00000.tar"), photos[:10])
    write_webdataset_shard(str(root / "in" / "00001.tar"), photos[10:] + corrupt_samples(shard=1)[:2])
    cfg = load_config(
        base={
            "input": {"urls": str(root / "in" / "{00000..00001}.tar")},
            "preprocess": {"resolution": 64},
            "encoder": {"type": "kl", "model": str(tiny_models["kl"]), "batch_size": 8},
            "output": {"path": str(root / "out")},
        }
    )
    summary = run(cfg)
    assert summary.samples_failed >= 1
    return root / "out"


@pytest.mark.slow
def test_cli_qa_of_a_real_output_decodes_the_sample(encoded: Path, tmp_path: Path) -> None:
    from latentize.cli import main

    code = main(["qa", str(encoded), "--sample", "4", "--report", str(tmp_path / "rep"), "--min-psnr", "0"])
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    recon = report["reconstruction"]
    assert recon["sample"] == 4 and len(recon["samples"]) == 4
    psnrs = [s["psnr"] for s in recon["samples"]]
    assert psnrs == sorted(psnrs)  # worst first
    assert "AutoencoderKL" in recon["decoder"]
    # The counts agree with the markers, the corrupt samples are error rows, nothing repeats.
    for name in ("counts", "keys_unique", "complete", "finite"):
        assert _check(report, name)["status"] == "pass", report["checks"]
    # Random weights give latents far from unit variance: the scale check fails, so does the run.
    assert _check(report, "scale")["status"] == "fail"
    assert code == 1

    # The same sample for the same seed.
    again = run_qa(str(encoded), options=QAOptions(sample=4, report=str(tmp_path / "rep2"), min_psnr=0)).report
    assert [s["key"] for s in again["reconstruction"]["samples"]] == [s["key"] for s in recon["samples"]]


@pytest.mark.slow
def test_job_entry_point_joins_the_cluster_and_exits_nonzero_on_failure(encoded: Path, tmp_path: Path) -> None:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "qa_report.py"),
            str(encoded),
            "--sample",
            "0",
            "--report",
            str(tmp_path / "rep"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["rows"]["data"] >= 1 and not report["passed"]
    assert (tmp_path / "rep" / "report.html").exists()


def test_qa_of_a_folder_without_a_run_says_so(tmp_path: Path) -> None:
    from latentize.cli import main

    assert main(["qa", str(tmp_path)]) == 2


# --- real (packaged) TAEF2 weights: reconstruction of real photos, and the report in a browser ---------


@pytest.fixture(scope="module")
def taef2_report(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Any:
    from latentize.config import load_config
    from latentize.demo import photo_samples, write_webdataset_shard
    from latentize.pipeline import run

    root = tmp_path_factory.mktemp("qa_taef2")
    photos = [p for p in photo_samples() if p.key][:10]
    write_webdataset_shard(str(root / "in" / "00000.tar"), photos[:5])
    write_webdataset_shard(str(root / "in" / "00001.tar"), photos[5:])
    cfg = load_config(
        base={
            "input": {"urls": str(root / "in" / "{00000..00001}.tar")},
            "preprocess": {"resolution": 256},
            "encoder": {"preset": "taef2", "batch_size": 4},  # the packaged weights
            "output": {"path": str(root / "out")},
        }
    )
    assert run(cfg).samples_ok == len(photos)
    # The decoder is found beside the encoder file (taef2_decoder.pth).
    return run_qa(str(root / "out"), options=QAOptions(sample=8, seed=1))


@pytest.mark.slow
def test_taef2_reconstruction_psnr_of_real_photos_is_reported(taef2_report: Any) -> None:
    recon = taef2_report.report["reconstruction"]
    assert recon["sample"] == 8 and "taef2_decoder.pth" in recon["decoder"]
    assert recon["metrics"]["psnr"]["mean"] >= 24.0, recon["metrics"]
    assert 0.5 < recon["metrics"]["ssim"]["mean"] <= 1.0
    assert _check(taef2_report.report, "reconstruction")["status"] == "pass"
    assert not recon["failed"]


@pytest.mark.slow
def test_real_report_opens_in_headless_chromium(taef2_report: Any, tmp_path: Path) -> None:
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian package `chromium`; .ci/run installs it)")
    html = Path(taef2_report.html_path)
    n_images = html.read_text().count("<img")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    dom = subprocess.run(
        [
            browser,
            *flags,
            f"--user-data-dir={tmp_path / 'profile-dom'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f'data-images-loaded="{n_images}/{n_images}"' in dom and n_images >= 6, dom[:300]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            *flags,
            f"--user-data-dir={tmp_path / 'profile-shot'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_webdataset_and_parquet_outputs_read_back_the_same_rows(tmp_path: Path) -> None:
    """The QA reader of WebDataset output matches members on the known ``.<column>.npy``
    suffixes, so keys with dots survive; both formats, and both Parquet tensor layouts, give the
    same blocks, with canonical tensor columns."""
    import pyarrow as pa

    from latentize.qa.scan import ROWS_PER_BLOCK, DataFile, TensorColumn, read_data_file
    from latentize.sinks import SINKS, OutputLayout
    from latentize.sinks.base import tensor_array, tensor_numpy

    rng = np.random.default_rng(0)
    n = ROWS_PER_BLOCK + 5  # two blocks
    latent = rng.normal(size=(n, 4, 2, 2)).astype(np.float16)
    keys = [f"img.{i:05d}.v2" for i in range(n)]
    table = pa.table(
        {
            "key": keys,
            "latent": tensor_array(latent),
            "caption": [f"c{i}" for i in range(n)],
            "json": [None] * n,
            "notes": [None] * n,
            "width": [64] * n,
            "height": [64] * n,
            "crop_top": [0] * n,
            "crop_left": [0] * n,
        }
    )
    layout = OutputLayout(str(tmp_path))
    columns = [TensorColumn(name="latent", shape=(4, 2, 2), dtype="float16")]
    for fmt, tensor_type in [("parquet", "fixed_shape_tensor"), ("parquet", "list"), ("webdataset", "list")]:
        sink = SINKS.get(fmt)
        path = layout.join(f"00000-{tensor_type}.{sink.extension}")
        data = sink.serialize(table, tensor_columns=["latent"], compression="zstd", tensor_type=tensor_type)
        layout.write_bytes(path, data)
        blocks = list(read_data_file(layout, DataFile(path=path, shard="00000"), fmt=fmt, columns=columns))
        assert [b.num_rows for b in blocks] == [ROWS_PER_BLOCK, 5], fmt
        assert all(isinstance(b.schema.field("latent").type, pa.FixedShapeTensorType) for b in blocks)
        got = pa.concat_tables(blocks)
        assert got.column("key").to_pylist() == keys
        assert set(got.column("shard").to_pylist()) == {"00000"}
        np.testing.assert_array_equal(tensor_numpy(got.column("latent")), latent)


def test_error_slots_come_from_the_errors_tables_slot_column(tmp_path: Path) -> None:
    """The errors table says which resolution an encode error stands for (``slot``); tables
    written before that column existed still get it from the ``at WxH:`` reason."""
    from latentize.qa.run import _read_errors
    from latentize.sinks import OutputLayout
    from latentize.sinks.commit import ERROR_SCHEMA

    layout = OutputLayout(str(tmp_path))
    rows = {
        "key": ["a", "b", "c"],
        "shard": ["new"] * 3,
        "index": [0, 1, 2],
        "stage": ["decode", "encode", "encode"],
        # The reason is free text: the slot is not parsed from it.
        "error": ["cannot identify image file", "non-finite latents", "non-finite latents"],
        "slot": [-1, 1, 0],
    }
    pq.write_table(pa.table(rows, schema=ERROR_SCHEMA), tmp_path / "new.parquet")
    old = {name: values for name, values in rows.items() if name != "slot"}
    old.update(shard=["old"] * 3, error=["cannot identify image file", "at 96x96: non-finite", "at 64x64: non-finite"])
    pq.write_table(pa.table(old), tmp_path / "old.parquet")

    paths = {"new": layout.join("new.parquet"), "old": layout.join("old.parquet")}
    table = _read_errors(layout, paths, {"64x64": 0, "96x96": 1})
    got = sorted(zip(*(table.column(c).to_pylist() for c in ("shard", "key", "slot")), strict=True))
    assert got == [(shard, key, slot) for shard in ("new", "old") for key, slot in (("a", -1), ("b", 1), ("c", 0))]
