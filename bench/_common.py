"""What the CPU pipeline benchmarks share: LAION-like shards, a small f8 model, timed processes."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MODEL", "make_shards", "repeat", "report", "save_model", "timed"]

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


def repeat(
    once: Callable[[], dict[str, Any]], repeats: int, line: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """Runs ``once`` ``repeats`` times, printing ``line(figures)`` after each; returns the figures."""
    runs = []
    for i in range(repeats):
        runs.append(once())
        print(f"repeat {i}: {line(runs[-1])}", flush=True)
    return runs


def report(runs: list[dict[str, Any]], title: str, images: int, json_path: Path | None) -> dict[str, float]:
    """Prints the median of every float figure under ``title``; writes them all to ``json_path``."""
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    print(f"\n{title}")
    for key, value in median.items():
        print(f"  {key:<28} {value:8.2f}")
    if json_path:
        json_path.write_text(json.dumps({"images": images, "runs": runs, "median": median}, indent=2))
    return median
