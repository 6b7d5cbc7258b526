"""What the CPU pipeline benchmarks share: LAION-like shards, a small f8 model, timed processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["MODEL", "make_shards", "save_model", "timed"]

#: The small f8 model: diffusers' AutoencoderKL with narrow blocks (random weights), about
#: 10-20 ms per 256² image on two cores: decode and encode cost about the same, as on a GPU
#: node whose encoder is fast and whose CPUs decode.
MODEL = {
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}


def make_shards(folder: Path, images: int, per_shard: int, *, seed: int = 0) -> int:
    """Writes ``images`` LAION-like JPEGs (real photos, 0.04-4 MP, aspect 1:2 to 2:1) as
    WebDataset shards of ``per_shard`` into ``folder``; returns the number written."""
    from latentize.demo import ShardSample, laion_like_samples, write_webdataset_shard

    samples = laion_like_samples(images, seed=seed)
    for shard, start in enumerate(range(0, images, per_shard)):
        chunk = [
            ShardSample(key=f"{shard:05d}{j:04d}", image=s.image, caption=s.caption, meta=s.meta)
            for j, s in enumerate(samples[start : start + per_shard])
        ]
        write_webdataset_shard(str(folder / f"{shard:05d}.tar"), chunk)
    return len(samples)


def save_model(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    AutoencoderKL(**MODEL).save_pretrained(folder)
    return folder


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Runs ``cmd``; returns its wall seconds and stdout (raises with its stderr on failure)."""
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    return time.time() - started, proc.stdout
