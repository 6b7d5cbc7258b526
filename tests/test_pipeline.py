"""End to end: the real job through one local Ray on shards of real photos.

Parity runs use photos already at the target size, so no resampling happens and the stored
latents must equal a direct diffusers computation on the decoded JPEG pixels.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import KL_MEAN, KL_SCALE, KL_SHIFT, KL_STD, S3_BUCKET
from PIL import Image

from latentize.config import Config, load_config
from latentize.demo import (
    ShardSample,
    corrupt_samples,
    photo_samples,
    write_parquet_shard,
    write_webdataset_shard,
)
from latentize.errors import LatentizeError
from latentize.pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

RES = 64


def _config(inputs: str, out: str, model: Path, **sections: dict[str, Any]) -> Config:
    base: dict[str, Any] = {
        "input": {"urls": inputs, "image_field": "jpg;png"},
        "preprocess": {"resolution": RES},
        "encoder": {"model": str(model), "batch_size": 4},
        "output": {"path": out},
        "ray": {"actors": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_config(base=base)


def _pixels(samples: list[ShardSample]) -> torch.Tensor:
    """Decoded JPEG pixels as the encoder sees them: (N, 3, H, W) float32 in [-1, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


def _by_key(table: Any, column: str) -> dict[str, np.ndarray]:
    values = table.column(column).combine_chunks().to_numpy_ndarray()
    return dict(zip(table.column("key").to_pylist(), values, strict=False))


@pytest.fixture(scope="module")
def exact_photos() -> list[ShardSample]:
    return photo_samples(resolution=RES)[:10]


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory: pytest.TempPathFactory, exact_photos: list[ShardSample]) -> str:
    root = tmp_path_factory.mktemp("wds")
    write_webdataset_shard(str(root / "00000.tar"), exact_photos[:6])
    write_webdataset_shard(str(root / "00001.tar"), exact_photos[6:])
    return str(root / "{00000..00001}.tar")


@pytest.mark.parametrize("variant", ["shift_scale", "latents_mean_std"])
def test_kl_mode_parity(
    variant: str, tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str, exact_photos: list[ShardSample]
) -> None:
    from diffusers import AutoencoderKL

    model = tiny_models["kl" if variant == "shift_scale" else "kl_meanstd"]
    summary = run(_config(wds_shards, str(tmp_path / "out"), model))
    assert (summary.samples_ok, summary.samples_failed, summary.shards_done_now) == (10, 0, 2)

    table = pq.read_table(tmp_path / "out")
    stored = _by_key(table, "latent")
    assert table.schema.field("latent").type.extension_name == "arrow.fixed_shape_tensor"
    with torch.no_grad():
        mode = AutoencoderKL.from_pretrained(model).encode(_pixels(exact_photos)).latent_dist.mode()
    if variant == "shift_scale":
        expected = (mode - KL_SHIFT) * KL_SCALE
    else:
        mean = torch.tensor(KL_MEAN).view(1, -1, 1, 1)
        std = torch.tensor(KL_STD).view(1, -1, 1, 1)
        expected = (mode - mean) * KL_SCALE / std
    got = np.stack([stored[s.key] for s in exact_photos]).astype(np.float32)
    assert got.shape == (10, 4, RES // 8, RES // 8)
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)
    # Rows follow input order within each shard; geometry and captions pass through.
    assert table.column("key").to_pylist() == [s.key for s in exact_photos]
    assert table.column("caption").to_pylist() == [s.caption for s in exact_photos]
    assert set(table.column("width").to_pylist()) == {RES}

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["samples"] == {"ok": 10, "failed": 0, "reencoded_fp32": 0}
    assert manifest["encoder"]["constants"]["scaling_factor"] == KL_SCALE
    assert manifest["encoder"]["identity"]["sha256"]
    assert manifest["encoder"]["model_class"] == "AutoencoderKL" and manifest["encoder"]["preset"] is None


def test_kl_moments_are_raw(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str, exact_photos: list[ShardSample]
) -> None:
    from diffusers import AutoencoderKL

    run(_config(wds_shards, str(tmp_path / "out"), tiny_models["kl"], encoder={"sample": "moments"}))
    table = pq.read_table(tmp_path / "out")
    assert "latent" not in table.column_names
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(tiny_models["kl"]).encode(_pixels(exact_photos)).latent_dist
    for column, expected in (("mean", posterior.mean), ("logvar", posterior.logvar)):
        stored = _by_key(table, column)
        got = np.stack([stored[s.key] for s in exact_photos]).astype(np.float32)
        np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["encoder"]["constants"]["applied"] is False


def test_sample_mode_reruns_are_byte_identical_and_batch_sizes_agree_to_float16_rounding(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str
) -> None:
    # The README's promise, and nothing stronger: a rerun with the same configuration gives the
    # same bytes even when Ray forms other batches (here: other read blocks, so the encoder
    # actor receives batches of other composition); another batch size agrees to float16
    # rounding (one unit in the last place), since its convolution shape may round differently.
    variants = {
        "a": ({"batch_size": 4}, {}),
        "b": ({"batch_size": 4}, {"rows_per_block": 1}),
        "c": ({"batch_size": 3}, {}),
    }
    outs = {}
    for name, (encoder, input_section) in variants.items():
        out = tmp_path / name
        encoder = {"sample": "sample", "seed": 7, **encoder}
        run(_config(wds_shards, str(out), tiny_models["kl"], encoder=encoder, input=input_section))
        outs[name] = _by_key(pq.read_table(out), "latent")
    mode_out = tmp_path / "mode"
    run(_config(wds_shards, str(mode_out), tiny_models["kl"]))
    mode = _by_key(pq.read_table(mode_out), "latent")
    assert set(outs["a"]) == set(outs["b"]) == set(outs["c"]) == set(mode)
    for key, value in outs["a"].items():
        assert value.tobytes() == outs["b"][key].tobytes(), key
        np.testing.assert_array_max_ulp(value, outs["c"][key], maxulp=1)
        assert not np.array_equal(value, mode[key])


def test_decode_runs_in_the_read_tasks_never_in_the_encoder_actors(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str
) -> None:
    from latentize.pipeline import _build_dataset, plan

    p = plan(_config(wds_shards, str(tmp_path / "out"), tiny_models["kl"]))
    ds = _build_dataset(p).materialize()
    operators = [line for line in ds.stats().splitlines() if line.startswith("Operator ")]
    encode = [op for op in operators if "EncodeActor" in op]
    assert len(encode) == 1, operators
    # The encoder actors run nothing else: a fused read (with its decode) would be named here.
    assert "Read" not in encode[0] and "decode" not in encode[0].lower(), encode[0]
    assert any("Read" in op for op in operators if op is not encode[0]), operators


def test_vq_indices_to_webdataset(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str, exact_photos: list[ShardSample]
) -> None:
    import webdataset as wds
    from diffusers import VQModel

    out = tmp_path / "out"
    run(_config(wds_shards, str(out), tiny_models["vq"], encoder={"type": "vq"}, output={"format": "webdataset"}))
    tars = sorted((out / f"{RES}x{RES}").glob("*.tar"))
    # One tar per staged part of each shard, named <shard>-<first row index>.
    assert {t.name.split("-")[0] for t in tars} == {"00000", "00001"}
    assert all(re.fullmatch(r"0000[01]-\d{9}\.tar", t.name) for t in tars)
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [p.key for p in exact_photos]
    assert all(s["txt"] == p.caption for s, p in zip(samples, exact_photos, strict=False))
    vq = VQModel.from_pretrained(tiny_models["vq"])
    with torch.no_grad():
        h = vq.encode(_pixels(exact_photos)).latents
        indices = vq.quantize(h)[2][2].reshape(len(exact_photos), RES // 8, RES // 8).numpy()
    got = np.stack([s["indices.npy"] for s in samples])
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, indices)


def _shards_with_corruption(root: Path, fmt: str) -> tuple[str, list[str]]:
    photos = photo_samples()[:5]
    bad = corrupt_samples(shard=1)
    shards = [photos[:3], photos[3:] + bad]
    writer = write_webdataset_shard if fmt == "webdataset" else write_parquet_shard
    ext = "tar" if fmt == "webdataset" else "parquet"
    for i, samples in enumerate(shards):
        writer(str(root / f"{i:05d}.{ext}"), samples)
    return str(root / f"*.{ext}"), [s.key for s in photos + bad]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_corrupt_samples_are_error_rows_and_plain_pyarrow_reads(
    fmt: str, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    inputs, keys = _shards_with_corruption(tmp_path / "in", fmt)
    out = tmp_path / "out"
    cfg = _config(inputs, str(out), tiny_models["kl"], input={"image_field": "jpg", "format": fmt})
    summary = run(cfg)
    assert (summary.samples_ok, summary.samples_failed) == (5, 3)
    assert summary.complete

    # A fresh interpreter that never imports Ray reads the output with plain pyarrow.
    script = textwrap.dedent(
        f"""
        import json, sys
        import pyarrow.parquet as pq
        data = pq.read_table({str(out)!r})
        errors = pq.read_table({str(out / "_errors")!r})
        latent = data.column("latent").combine_chunks().to_numpy_ndarray()
        print(json.dumps({{
            "data": data.column("key").to_pylist(),
            "errors": errors.column("key").to_pylist(),
            "stages": errors.column("stage").to_pylist(),
            "messages": errors.column("error").to_pylist(),
            "shape": list(latent.shape), "finite": bool((latent == latent).all()),
            "ray_imported": "ray" in sys.modules,
        }}))
        """
    )
    result = json.loads(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    assert result["ray_imported"] is False
    assert sorted(result["data"] + result["errors"]) == sorted(keys)
    assert len(set(result["data"]) & set(result["errors"])) == 0
    assert len(result["errors"]) == 3 and set(result["stages"]) == {"decode"}
    assert any("truncated" in m for m in result["messages"])
    assert any("0 bytes" in m for m in result["messages"])
    assert result["shape"] == [5, 4, RES // 8, RES // 8] and result["finite"]


def test_gpu_decode_path_gives_the_rows_of_the_cpu_path(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    # preprocess.decode=gpu on a CPU actor runs the device path with torchvision's CPU decoder:
    # the same data rows, error rows and geometry as the exact CPU path, latents within
    # resampling noise, and the manifest says which path ran.
    inputs, keys = _shards_with_corruption(tmp_path / "in", "webdataset")
    tables = {}
    for decode in ("gpu", "cpu"):
        out = tmp_path / decode
        cfg = _config(inputs, str(out), tiny_models["kl"], preprocess={"decode": decode, "exact": True})
        summary = run(cfg)
        assert (summary.samples_ok, summary.samples_failed) == (5, 3)
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["runs"][-1]["decode"] == decode
        tables[decode] = (pq.read_table(out).sort_by("key"), pq.read_table(out / "_errors").sort_by("key"))
    (gpu, gpu_err), (cpu, cpu_err) = tables["gpu"], tables["cpu"]
    assert gpu_err.select(["key", "stage", "error"]).equals(cpu_err.select(["key", "stage", "error"]))
    for column in ("key", "width", "height", "crop_top", "crop_left", "notes"):
        assert gpu.column(column).to_pylist() == cpu.column(column).to_pylist(), column
    np.testing.assert_allclose(
        gpu.column("latent").combine_chunks().to_numpy_ndarray().astype(np.float32),
        cpu.column("latent").combine_chunks().to_numpy_ndarray().astype(np.float32),
        atol=0.05,
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_rerun_writes_nothing_and_other_config_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str
) -> None:
    out = tmp_path / "out"
    cfg = _config(wds_shards, str(out), tiny_models["kl"])
    first = run(cfg)
    assert not first.nothing_to_do
    # Where the execution's seconds went: the encoder's start-up, then the steady state.
    assert first.encoder_start_seconds is not None and first.encoding_seconds is not None
    assert first.encoder_start_seconds >= 0 and first.encoding_seconds > 0
    assert first.encoder_start_seconds + first.encoding_seconds <= first.execution_seconds
    record = json.loads((out / "_manifest.json").read_text())["runs"][-1]
    assert record["encoding_seconds"] == round(first.encoding_seconds, 3)
    assert record["encoder_start_seconds"] == round(first.encoder_start_seconds, 3)
    assert "encode_started" not in pq.read_table(out).column_names
    before = _snapshot(out)
    again = run(cfg)
    assert again.nothing_to_do and again.samples_ok == 10
    assert _snapshot(out) == before

    other = _config(wds_shards, str(out), tiny_models["kl"], encoder={"scaling_factor": 1.0})
    with pytest.raises(LatentizeError, match="--overwrite"):
        run(other)
    assert _snapshot(out) == before
    replaced = run(other, overwrite=True)
    assert replaced.samples_ok == 10
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["encoder"]["constants"]["scaling_factor"] == 1.0


def test_a_run_killed_after_its_last_commit_is_closed_by_the_next_run(
    tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str
) -> None:
    # What a driver killed between its last commit and its end leaves (the chaos soak met it):
    # every marker, staged parts the driver had not yet removed, a stale ledger, "running".
    out = tmp_path / "out"
    cfg = _config(wds_shards, str(out), tiny_models["kl"])
    done = run(cfg)
    manifest_path = out / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    folder = next(p for p in out.iterdir() if not p.name.startswith("_"))
    staged = out / "_staging" / "00000" / folder.name / "part-000000000-0123456789ab.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(next(folder.glob("*.parquet")).read_bytes())
    (out / "_ledger.parquet").unlink()
    manifest_path.write_text(json.dumps({**manifest, "status": "running", "shards": {}, "samples": {}}))

    again = run(cfg)
    assert again.nothing_to_do and again.samples_ok == done.samples_ok
    assert not (out / "_staging").exists()
    assert (out / "_ledger.parquet").exists()
    closed = json.loads(manifest_path.read_text())
    assert closed["status"] == "complete"
    assert (closed["shards"], closed["samples"]) == (manifest["shards"], manifest["samples"])
    assert closed["runs"] == manifest["runs"]  # closing is no run of its own
    before = _snapshot(out)
    assert run(cfg).nothing_to_do and _snapshot(out) == before  # a closed output: nothing written


def test_resume_redoes_only_uncommitted_shards(tmp_path: Path, tiny_models: dict[str, Path], wds_shards: str) -> None:
    out = tmp_path / "out"
    cfg = _config(wds_shards, str(out), tiny_models["kl"])
    run(cfg)
    first = pq.read_table(out).sort_by("key")
    # Simulate a crash of shard 00001's commit after its data file was published but before
    # its marker was written: the staged part is still there (staging goes only after the
    # marker), beside a second part of another grouping whose publishing never happened.
    marker1 = json.loads((out / "_shards" / "00001.json").read_text())
    (out / "_shards" / "00001.json").unlink()
    (published,) = [f for f in marker1["files"] if not f.startswith("_")]
    first_index = int(published.rsplit("-", 1)[1].split(".")[0])
    staged = out / "_staging" / "00001" / f"{RES}x{RES}" / f"part-{first_index:09d}-deadbeef.parquet"
    staged.parent.mkdir(parents=True)
    os.link(out / published, staged)
    (staged.parent / "part-000000007-cafe.parquet").write_bytes(b"partial")
    marker0 = (out / "_shards" / "00000.json").stat().st_mtime_ns
    summary = run(cfg)
    assert summary.shards_done_now == 1 and summary.samples_now == 4
    assert (out / "_shards" / "00000.json").stat().st_mtime_ns == marker0
    assert not (out / "_staging").exists()
    again = pq.read_table(out).sort_by("key")
    assert again.column("key").to_pylist() == first.column("key").to_pylist()
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_shards").glob("*.json")}
    listed = {f for m in markers.values() for f in m["files"]}
    assert {str(p.relative_to(out)) for p in out.glob(f"{RES}x{RES}/*")} == listed  # no orphan


def test_s3_in_and_out(
    s3: dict[str, Any], tiny_models: dict[str, Path], exact_photos: list[ShardSample], caplog: pytest.LogCaptureFixture
) -> None:
    import glob

    import fsspec

    # Distinctive credentials (moto accepts any) so a leak anywhere is found by search.
    secret = "latentize-s3cr3t-Zq81"
    creds = {**s3, "key": "AKIALATENTIZELEAKTEST", "secret": secret}
    prefix = f"s3://{S3_BUCKET}/e2e"
    write_webdataset_shard(f"{prefix}/in/00000.tar", exact_photos[:5], storage_options=creds)
    write_webdataset_shard(f"{prefix}/in/00001.tar", exact_photos[5:], storage_options=creds)
    cfg = _config(
        f"{prefix}/in/*.tar",
        f"{prefix}/out",
        tiny_models["kl"],
        input={"storage_options": creds},
        output={"storage_options": creds},
    )
    with caplog.at_level("INFO"), caplog.at_level("DEBUG", logger="latentize"):
        summary = run(cfg)
    assert (summary.samples_ok, summary.shards_done_now) == (10, 2)

    fs = fsspec.filesystem("s3", **creds)
    names = sorted(p.split("/e2e/out/")[1] for p in fs.find(f"{S3_BUCKET}/e2e/out"))
    data = [n for n in names if not n.startswith("_")]
    assert [n.split("/")[1].split("-")[0] for n in data] == ["00000", "00001"]
    assert [n for n in names if n.startswith("_")] == [
        "_inputs.parquet",
        "_ledger.parquet",
        "_manifest.json",
        "_shards/00000.json",
        "_shards/00001.json",
    ]
    table = pq.read_table(f"{S3_BUCKET}/e2e/out", filesystem=fs)
    assert sorted(table.column("key").to_pylist()) == sorted(p.key for p in exact_photos)
    manifest = json.loads(fs.cat(f"{S3_BUCKET}/e2e/out/_manifest.json"))
    assert manifest["config"]["input"]["storage_options"]["key"] == "***"
    assert manifest["config"]["input"]["storage_options"]["secret"] == "***"
    # Credentials never reach the output, the driver's logs (latentize's at any level, all at
    # INFO and up; botocore's own DEBUG dumps of request headers are out of our hands) or Ray's
    # worker logs.
    for name in names:
        assert secret.encode() not in fs.cat(f"{S3_BUCKET}/e2e/out/{name}"), name
    assert secret not in caplog.text and "AKIALATENTIZELEAKTEST" not in caplog.text
    for log in glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True):
        if not os.path.isfile(log):
            continue
        with open(log, "rb") as f:
            assert secret.encode() not in f.read(), log
