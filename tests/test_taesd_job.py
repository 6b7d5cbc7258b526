"""The real TAEF2 weights through the whole job: preset ``taef2`` (the weights that ship with
latentize, found without ``encoder.model``), real photos at 256², stored latents decoded with
the TAEF2 decoder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from latentize.config import load_config
from latentize.demo import photo_samples, write_webdataset_shard
from latentize.encoders import ENCODERS
from latentize.encoders.taesd_net import load_tiny_decoder
from latentize.pipeline import run
from latentize.preprocess import preprocess_sample
from latentize.weights import TAEF2_DECODER, TAEF2_ENCODER, packaged_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def reconstruction_psnr(latents: np.ndarray, originals: np.ndarray) -> float:
    """Mean PSNR (dB) of TAEF2 decodes of ``latents`` (N, 32, h, w) against ``originals``
    (N, H, W, 3) uint8."""
    decoder = load_tiny_decoder(packaged_weights(TAEF2_DECODER))
    with torch.no_grad():
        images = decoder(torch.from_numpy(latents.astype(np.float32))).clamp(0, 1)
    target = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 255.0
    mse = ((images - target) ** 2).flatten(1).mean(dim=1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def test_taef2_preset_through_the_job_reconstructs_real_photos(tmp_path: Path) -> None:
    photos = [p for p in photo_samples() if p.key][:8]
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), photos)
    cfg = load_config(
        base={
            "input": {"urls": str(tmp_path / "in" / "00000.tar")},
            "preprocess": {"resolution": 256},
            "encoder": {"preset": "taef2", "batch_size": 4},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    assert cfg.encoder.model == str(packaged_weights(TAEF2_ENCODER))
    summary = run(cfg)
    assert summary.samples_ok == len(photos)

    table = pq.read_table(tmp_path / "out")
    latents = table.column("latent").combine_chunks().to_numpy_ndarray()
    assert latents.shape == (len(photos), 32, 32, 32)
    keys = table.column("key").to_pylist()
    by_key = {p.key: p for p in photos}
    originals = np.stack([preprocess_sample(by_key[k].image, key=k, config=cfg.preprocess).pixels for k in keys])
    good = reconstruction_psnr(latents, originals)
    assert good >= 24.0, good

    # The same check on latents made with the wrong input range must fail.
    spec = ENCODERS.get("tiny").inspect(cfg)
    wrong = ENCODERS.get("tiny")(config=cfg, spec=dataclasses.replace(spec, input_range="[-1, 1]"))
    bad_latents = wrong.encode(originals, keys).arrays["latent"]
    bad = reconstruction_psnr(bad_latents, originals)
    assert bad < 24.0 and good - bad > 10, (good, bad)
