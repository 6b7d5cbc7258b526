#!/usr/bin/env python
"""Aspect-ratio buckets against a single fixed crop of the same area, on the same images.

Both runs encode the same LAION-like JPEG shards (``latentize.demo.laion_like_samples``: real
photos at web-scraped sizes, aspect ratios from 1:2 to 2:1) with the same small f8 model
through ``python -m latentize.cli encode``, in fresh processes, alternating, repeated:

* fixed: ``preprocess.resolution: R`` (one R×R crop per image);
* buckets: ``preprocess.buckets: {area: R², step: 32}`` (each image in its nearest bucket, so
  batches reaching the encoder mix several shapes, which it splits by shape).

Printed, median of the repeats: images per second of each inside the Ray execution (as the
manifest records it) and for the whole run, their ratios (target: buckets >= 0.9x fixed), and
how the images spread over the buckets.

    python bench/buckets.py [--images 1024] [--per-shard 64] [--resolution 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import make_shards, repeat, report, save_model, timed  # noqa: E402


def _configs(root: Path, resolution: int) -> dict[str, Path]:
    import yaml

    model = save_model(root / "model")
    variants = {
        "fixed": {"resolution": resolution},
        "buckets": {"buckets": {"area": resolution * resolution, "step": 32, "min_ratio": 0.5, "max_ratio": 2.0}},
    }
    paths = {}
    for name, preprocess in variants.items():
        config = {
            "input": {"urls": str(root / "in" / "*.tar")},
            "preprocess": preprocess,
            "encoder": {"model": str(model), "batch_size": 32},
            "output": {"path": str(root / f"out-{name}")},
            "ray": {"actors": 1},
        }
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def _once(root: Path, configs: dict[str, Path], images: int, env: dict[str, str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, config in configs.items():
        shutil.rmtree(root / f"out-{name}", ignore_errors=True)
        whole_s, _ = timed([sys.executable, "-m", "latentize.cli", "encode", str(config)], env, REPO)
        manifest = json.loads((root / f"out-{name}" / "_manifest.json").read_text())
        figures[f"{name}_execution_img_s"] = images / manifest["runs"][-1]["execution_seconds"]
        figures[f"{name}_whole_img_s"] = images / whole_s
        figures[f"{name}_folders"] = manifest["output"]["rows_by_folder"]
    figures["execution_ratio"] = figures["buckets_execution_img_s"] / figures["fixed_execution_img_s"]
    figures["whole_ratio"] = figures["buckets_whole_img_s"] / figures["fixed_whole_img_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="latentize-buckets-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    try:
        images = make_shards(root / "in", args.images, args.per_shard, seed=1)
        configs = _configs(root, args.resolution)
        runs = repeat(
            lambda: _once(root, configs, images, env),
            args.repeats,
            lambda r: (
                f"fixed {r['fixed_execution_img_s']:.1f} img/s, buckets {r['buckets_execution_img_s']:.1f} img/s "
                f"in execution ({r['execution_ratio']:.2f}x); whole run {r['whole_ratio']:.2f}x"
            ),
        )
        title = f"{images} LAION-like images, buckets of area {args.resolution}² vs {args.resolution}² crops:"
        report(runs, title, images, args.json)
        print(f"  images per bucket: {runs[0]['buckets_folders']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
