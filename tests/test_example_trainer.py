"""examples/train_on_latents.py: a small diffusers UNet trained on a latentize output through
latentize.data.LatentDataset; the noise-prediction loss falls within 30 steps."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

from latentize.config import load_config
from latentize.demo import photo_samples, write_webdataset_shard
from latentize.pipeline import run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_on_latents.py"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def _example() -> object:
    spec = importlib.util.spec_from_file_location("train_on_latents", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_loss_falls_within_30_steps(tmp_path: Path) -> None:
    photos = photo_samples(resolution=64)
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), photos[:12])
    write_webdataset_shard(str(tmp_path / "in" / "00001.tar"), photos[12:])
    cfg = load_config(
        base={
            "input": {"urls": str(tmp_path / "in" / "{00000..00001}.tar")},
            "preprocess": {"resolution": 64},
            "encoder": {"preset": "taef2", "batch_size": 8},  # the packaged weights: 32x8x8 latents
            "output": {"path": str(tmp_path / "out")},
        }
    )
    assert run(cfg).samples_ok == len(photos)

    losses = _example().train(  # type: ignore[attr-defined]
        str(tmp_path / "out"), steps=30, batch_size=8, workers=1, seed=0, device="cpu", log_every=10
    )
    assert len(losses) == 30
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    # About 1.06 to 0.82 on the development machine; an example that does not learn stays at 1.
    assert last < 0.9 * first, losses
