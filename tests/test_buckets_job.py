"""The real job with aspect-ratio buckets, flipped latents and several resolutions, through the
session's local Ray: parity with diffusers, every key exactly once, plain pyarrow per folder, the
list tensor layout through the training reader and status."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import KL_MEAN, KL_SCALE, KL_STD
from PIL import Image

from latentize.config import Config, load_config
from latentize.demo import ShardSample, corrupt_samples, laion_like_samples, photo_images, write_webdataset_shard
from latentize.pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

BUCKETS = [[64, 64], [96, 64], [64, 96]]


def _config(inputs: str, out: Path, model: Path, **preprocess: Any) -> Config:
    return load_config(
        base={
            "input": {"urls": inputs, "image_field": "jpg;png"},
            "preprocess": preprocess,
            "encoder": {"model": str(model), "batch_size": 4},
            "output": {"path": str(out)},
        }
    )


def _by_key(table: Any, column: str) -> dict[str, np.ndarray]:
    values = table.column(column).combine_chunks().to_numpy_ndarray()
    return dict(zip(table.column("key").to_pylist(), values, strict=True))


def _exact_size_samples() -> list[ShardSample]:
    """Real photos saved at the size of one of the buckets each (nothing is resampled)."""
    out = []
    for i, (name, img) in enumerate(photo_images()[:9]):
        w, h = BUCKETS[i % 3]
        buf = io.BytesIO()
        img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(ShardSample(key=f"00000{i:04d}", image=buf.getvalue(), caption=name))
    return out


def test_buckets_at_their_size_and_flipped_match_diffusers(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    samples = _exact_size_samples()
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), samples)
    out = tmp_path / "out"
    summary = run(_config(str(tmp_path / "in" / "*.tar"), out, tiny_models["kl_meanstd"], buckets=BUCKETS, flip=True))
    assert summary.complete and summary.samples_ok == 9

    vae = AutoencoderKL.from_pretrained(tiny_models["kl_meanstd"]).eval()
    mean = torch.tensor(KL_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(KL_STD).view(1, -1, 1, 1)
    seen = 0
    for w, h in BUCKETS:
        table = pq.read_table(out / f"{w}x{h}")
        assert table.column("latent").type.shape == [4, h // 8, w // 8]
        latents, flipped = _by_key(table, "latent"), _by_key(table, "latent_flipped")
        for s in samples:
            if s.key not in latents:
                continue
            seen += 1
            pixels = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
            x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
            with torch.no_grad():
                want = (vae.encode(x).latent_dist.mean - mean) * KL_SCALE / std
                want_flipped = (vae.encode(torch.flip(x, dims=[3])).latent_dist.mean - mean) * KL_SCALE / std
            np.testing.assert_allclose(latents[s.key].astype(np.float32), want[0].numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(flipped[s.key].astype(np.float32), want_flipped[0].numpy(), atol=2e-3, rtol=2e-3)
            # A flipped latent is the latent of the flipped image, not the latent flipped.
            assert not np.allclose(flipped[s.key], latents[s.key][:, :, ::-1], atol=1e-2)
    assert seen == 9
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["preprocess"]["buckets"] == [BUCKETS]
    assert manifest["output"]["rows_by_folder"] == {"64x64": 3, "64x96": 3, "96x64": 3}
    assert manifest["output"]["folders"]["96x64"]["columns"]["latent_flipped"]["shape"] == [4, 8, 12]


def test_every_key_exactly_once_across_bucket_folders_and_errors(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    mixed = laion_like_samples(14, seed=5)
    bad = corrupt_samples(shard=1)
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), mixed[:7])
    write_webdataset_shard(
        str(tmp_path / "in" / "00001.tar"),
        [ShardSample(key=f"00001{i:04d}", image=s.image, caption=s.caption) for i, s in enumerate(mixed[7:])] + bad,
    )
    keys = [s.key for s in mixed[:7]] + [f"00001{i:04d}" for i in range(7)] + [s.key for s in bad]
    out = tmp_path / "out"
    summary = run(_config(str(tmp_path / "in" / "*.tar"), out, tiny_models["kl"], buckets=BUCKETS, flip=True))
    assert (summary.samples_ok, summary.samples_failed) == (14, 3)
    folders = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert len(folders) >= 2  # the mix spreads over several buckets

    # Plain pyarrow, in a process that never imports Ray nor latentize, reads each folder.
    script = textwrap.dedent(
        f"""
        import json, sys
        import pyarrow.parquet as pq
        out = {{}}
        for folder in {folders!r}:
            t = pq.read_table({str(out)!r} + "/" + folder)
            out[folder] = {{"keys": t.column("key").to_pylist(), "shape": t.column("latent").type.shape,
                           "flipped": t.column("latent_flipped").type.shape}}
        errors = pq.read_table({str(out / "_errors")!r}).column("key").to_pylist()
        print(json.dumps({{"folders": out, "errors": errors,
                          "imported": [m for m in ("ray", "latentize") if m in sys.modules]}}))
        """
    )
    result = json.loads(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    assert result["imported"] == []
    stored = [k for f in result["folders"].values() for k in f["keys"]]
    assert sorted(stored + result["errors"]) == sorted(keys)  # every key once, data or error
    for folder, found in result["folders"].items():
        w, h = (int(v) for v in folder.split("x"))
        assert found["shape"] == found["flipped"] == [4, h // 8, w // 8]


def test_each_resolution_folder_equals_a_single_resolution_run(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    samples = laion_like_samples(8, seed=7)
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), samples + corrupt_samples(shard=0)[:1])
    inputs = str(tmp_path / "in" / "*.tar")
    multi = tmp_path / "multi"
    # exact: the reduced-scale JPEG decode of one pass is as small as its largest size allows,
    # so its smaller sizes are resized from a larger decode than a run at that size alone would
    # use (closer to the exact path, not bit for bit that run's).
    summary = run(_config(inputs, multi, tiny_models["kl"], resolutions=[64, [96, 64]], exact=True))
    assert (summary.samples_ok, summary.samples_failed) == (8, 1)
    assert len(pq.read_table(multi / "_errors")) == 1  # one error row, not one per resolution
    for resolution, folder in ((64, "64x64"), ([96, 64], "96x64")):
        single = tmp_path / f"single-{folder}"
        run(_config(inputs, single, tiny_models["kl"], resolution=resolution, exact=True))
        got, want = pq.read_table(multi / folder).sort_by("key"), pq.read_table(single / folder).sort_by("key")
        assert got.column("key").to_pylist() == want.column("key").to_pylist() == sorted(s.key for s in samples)
        for column in ("width", "height", "crop_top", "crop_left"):
            assert got.column(column).to_pylist() == want.column(column).to_pylist()
        # The same crops and model; only the encoder's chunking may differ (float16 rounding).
        np.testing.assert_array_max_ulp(
            got.column("latent").combine_chunks().to_numpy_ndarray(),
            want.column("latent").combine_chunks().to_numpy_ndarray(),
            maxulp=1,
        )


def test_list_layout_job_is_read_by_the_reader_and_status(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """``output.tensor_type: list`` through the real job: nested lists in every folder, which the
    training reader and ``status`` read (every key once, one manifest shape per batch, the flipped
    twin chosen for some samples). QA of the list layout: tests/test_qa.py."""
    from latentize.data import LatentDataset
    from latentize.sinks.layout import OutputLayout
    from latentize.status import output_status

    samples = laion_like_samples(10, seed=11)
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), samples[:6])
    write_webdataset_shard(str(tmp_path / "in" / "00001.tar"), samples[6:])
    out = tmp_path / "out"
    cfg = load_config(
        base={
            "input": {"urls": str(tmp_path / "in" / "*.tar"), "image_field": "jpg;png"},
            "preprocess": {"buckets": BUCKETS, "flip": True},
            "encoder": {"model": str(tiny_models["kl"]), "batch_size": 4},
            "output": {"path": str(out), "tensor_type": "list"},
        }
    )
    assert run(cfg).samples_ok == 10
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["output"]["tensor_type"] == "list"
    stored: dict[str, np.ndarray] = {}
    for folder in manifest["output"]["rows_by_folder"]:
        table = pq.read_table(out / folder)
        assert str(table.schema.field("latent").type).startswith("fixed_size_list<")
        shape = manifest["output"]["folders"][folder]["columns"]["latent"]["shape"]
        for name in ("latent", "latent_flipped"):
            values = np.asarray(table.column(name).to_pylist(), dtype=np.float16)
            stored.update({f"{k}/{name}": v for k, v in zip(table.column("key").to_pylist(), values, strict=True)})
            assert values.shape[1:] == tuple(shape)

    seen: list[str] = []
    flips: set[bool] = set()
    per_folder: dict[str, int] = {}
    for rank in (0, 1):
        for batch in LatentDataset(str(out), 3, rank=rank, world_size=2, seed=4):
            folder = batch["folder"]
            shape = manifest["output"]["folders"][folder]["columns"]["latent"]["shape"]
            assert tuple(batch["latent"].shape) == (len(batch["key"]), *shape)
            for key, flipped, value in zip(
                batch["key"], batch["flipped"].tolist(), batch["latent"].numpy(), strict=True
            ):
                np.testing.assert_array_equal(value, stored[f"{key}/latent{'_flipped' if flipped else ''}"])
            seen += batch["key"]
            flips.update(batch["flipped"].tolist())
            per_folder[folder] = per_folder.get(folder, 0) + len(batch["key"])
    assert sorted(seen) == sorted(s.key for s in samples)
    assert per_folder == manifest["output"]["rows_by_folder"] and len(per_folder) >= 2

    status = output_status(OutputLayout(str(out)))
    assert status["complete"] and status["folders"] == per_folder
    assert flips == {False, True}
