#!/usr/bin/env python
"""Decode paths: speed and fidelity of the default (reduced-scale JPEG) path, the exact path and the
device path run on the CPU, side by side in one process on the same LAION-like JPEGs.

The images come from :func:`latentize.demo.laion_like_samples` (real photos cropped and resized
to web-scraped sizes, 0.04-4 MP, median 0.28 MP, JPEG quality 70-95), a fixed seed. Measured:

* ms per image of ``preprocess_sample`` with ``preprocess.exact`` false (default) and true
  (exact), and of ``preprocess_on_device(device="cpu")`` in batches (torchvision's libjpeg-turbo
  decoder and torch's resize, on one thread, standing in for nvJPEG and the GPU); the median
  over the repeats of one pass over all images, and of one pass over the sources of at least
  1 MP, the three paths taking turns on each batch; and each path's speed-up over the exact
  path. Both the CPU time of this process (what a busy shared machine disturbs least: every
  path runs on one thread) and the wall time;
* PSNR (dB) of the default path against the exact path, over the images it decoded at a
  reduced scale (the others are bit-identical), and over all images (identical ones counted
  as 99 dB): median, 10th percentile, minimum;
* PSNR of the device path (on the CPU) against the exact path, over all images.

Targets: default >= 1.8x the exact path's speed on the whole mix and >= 3x on sources of at
least 1 MP; PSNR of default vs exact median >= 40 dB and 10th percentile >= 30 dB.

    python bench/decode.py [--count 300] [--resolution 256] [--repeats 5] [--min-cover 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IDENTICAL_DB = 99.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images; :data:`IDENTICAL_DB` when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return IDENTICAL_DB if mse == 0 else 10 * np.log10(255.0**2 / mse)


def summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {"n": 0}
    return {
        "n": int(arr.size),
        "median": float(np.median(arr)),
        "p10": float(np.percentile(arr, 10)),
        "min": float(arr.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="LAION-like JPEGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LAION-like sample set")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--crop", default="center")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="images per preprocess_on_device call (and per turn)")
    parser.add_argument(
        "--min-cover",
        type=int,
        default=None,
        help="override latentize.preprocess.REDUCED_MIN_COVER (the reduced decode's least size, in cover sizes)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import PIL
    import torch
    import torchvision
    from PIL import Image, features

    import latentize.preprocess
    from latentize.config import PreprocessConfig
    from latentize.demo import laion_like_samples
    from latentize.preprocess import preprocess_sample
    from latentize.preprocess.gpu import preprocess_on_device

    if args.min_cover is not None:
        latentize.preprocess.REDUCED_MIN_COVER = args.min_cover
    # One thread, as Pillow's paths use: CPU time then compares like for like.
    torch.set_num_threads(1)

    samples = laion_like_samples(args.count, seed=args.seed)
    keys = [s.key for s in samples]
    images = [s.image for s in samples]
    assert all(isinstance(image, bytes) for image in images)
    megapixels = [np.prod(Image.open(io.BytesIO(image)).size) / 1e6 for image in images]
    large = [i for i, mp in enumerate(megapixels) if mp >= 1.0]
    default = PreprocessConfig(resolution=args.resolution, crop=args.crop)
    exact = PreprocessConfig(resolution=args.resolution, crop=args.crop, exact=True)

    def cpu_path(config: PreprocessConfig) -> Callable[[list[int]], None]:
        def run(rows: list[int]) -> None:
            for i in rows:
                preprocess_sample(images[i], key=keys[i], config=config)

        return run

    def device_path(rows: list[int]) -> None:
        preprocess_on_device([images[i] for i in rows], [keys[i] for i in rows], config=default, device="cpu")

    paths = {"default": cpu_path(default), "exact": cpu_path(exact), "device_on_cpu": device_path}
    subsets = {"all": list(range(len(samples))), "ge_1mp": large}
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    times = {c: {p: {s: [] for s in subsets} for p in paths} for c in clocks}
    for run in paths.values():  # warm-up: imports, allocator, page cache
        run(subsets["all"][: args.batch])
    # The paths take turns on each batch of images (in a rotating order), so that the load of a
    # shared machine falls on all of them alike.
    names = list(paths)
    for _ in range(args.repeats):
        for subset, rows in subsets.items():
            spent = {c: dict.fromkeys(paths, 0.0) for c in clocks}
            for b, start in enumerate(range(0, len(rows), args.batch)):
                part = rows[start : start + args.batch]
                for name in names[b % len(names) :] + names[: b % len(names)]:
                    t0 = {c: clock() for c, clock in clocks.items()}
                    paths[name](part)
                    for c, clock in clocks.items():
                        spent[c][name] += clock() - t0[c]
            for c in clocks:
                for name in paths:
                    times[c][name][subset].append(spent[c][name] / max(1, len(rows)) * 1e3)
    ms = {c: {p: {s: statistics.median(v) for s, v in by.items()} for p, by in t.items()} for c, t in times.items()}

    ref = [preprocess_sample(images[i], key=keys[i], config=exact) for i in subsets["all"]]
    fast = [preprocess_sample(images[i], key=keys[i], config=default) for i in subsets["all"]]
    for r, f in zip(ref, fast, strict=True):
        geometry = (r.width, r.height, r.crop_top, r.crop_left, r.upscaled)
        assert geometry == (f.width, f.height, f.crop_top, f.crop_left, f.upscaled), "geometry differs"
    default_db = [psnr(f.pixels, r.pixels) for f, r in zip(fast, ref, strict=True)]
    reduced_db = [db for db in default_db if db != IDENTICAL_DB]
    device = preprocess_on_device(images, keys, config=default, device="cpu")
    device_db = [psnr(device.pixels[i].numpy(), r.pixels) for i, r in enumerate(ref)]

    figures: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "images": {"count": len(samples), "ge_1mp": len(large), "median_mp": float(np.median(megapixels))},
        "resolution": args.resolution,
        "crop": args.crop,
        "reduced_min_cover": latentize.preprocess.REDUCED_MIN_COVER,
        "repeats": args.repeats,
        "ms_per_image": ms,
        "speedup_vs_exact": {
            c: {p: {s: m["exact"][s] / m[p][s] for s in subsets} for p in paths} for c, m in ms.items()
        },
        "psnr_default_vs_exact": {"reduced": summary(reduced_db), "all": summary(default_db)},
        "psnr_device_vs_exact": summary(device_db),
        "device_rows": {"decoded": device.gpu_decoded, "cpu_fallback": device.cpu_fallback},
    }

    print(f"{len(samples)} LAION-like JPEGs (median {figures['images']['median_mp']:.2f} MP, {len(large)} >= 1 MP)")
    print(
        f"at {args.resolution}x{args.resolution} {args.crop}, median of {args.repeats} repeats, "
        f"reduced decodes at least {latentize.preprocess.REDUCED_MIN_COVER}x the cover size"
    )
    print(f"machine: {figures['machine']}")
    print()
    for clock, label in (("cpu", "CPU time of this process"), ("wall", "wall time")):
        print(f"ms/img, {label}")
        print(f"{'path':<16}{'all':>10}{'vs exact':>10}{'>= 1 MP':>10}{'vs exact':>10}")
        for p in paths:
            m, speed = ms[clock][p], figures["speedup_vs_exact"][clock][p]
            print(f"{p:<16}{m['all']:>10.2f}{speed['all']:>9.2f}x{m['ge_1mp']:>10.2f}{speed['ge_1mp']:>9.2f}x")
        print()
    print()

    def line(label: str, s: dict[str, float]) -> str:
        if not s["n"]:
            return f"{label:<44} (none)"
        return f"{label:<44}{s['n']:>5}{s['median']:>9.1f}{s['p10']:>9.1f}{s['min']:>9.1f}"

    print(f"{'PSNR (dB)':<44}{'n':>5}{'median':>9}{'p10':>9}{'min':>9}")
    print(line("default vs exact, reduced-scale decodes", figures["psnr_default_vs_exact"]["reduced"]))
    print(line(f"default vs exact, all (identical = {IDENTICAL_DB:.0f})", figures["psnr_default_vs_exact"]["all"]))
    print(line("device path (on CPU) vs exact, all", figures["psnr_device_vs_exact"]))
    print(f"device path rows: {device.gpu_decoded} decoded by torchvision, {device.cpu_fallback} by the CPU path")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
