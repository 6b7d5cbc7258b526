#!/usr/bin/env python
"""Pipeline overhead: `latentize encode` against an independent single-process loop.

Both encode the same LAION-like JPEG shards (``latentize.demo.laion_like_samples``: real
photos at web-scraped sizes, 0.04-4 MP, median 0.28 MP) with the same small f8 model (a random
diffusers ``AutoencoderKL``, 4 latent channels), the same preprocess function and the same
encoder class, each in a fresh process, alternating, repeated:

* loop: one process reads each tar, calls ``latentize.preprocess.preprocess_sample`` per image,
  ``encoder.encode`` per batch (torch using every core) and writes a Parquet file per shard;
* latentize: ``python -m latentize.cli encode CONFIG`` (a local Ray started by the job).

Printed, median of the repeats: whole-run images per second of each (process start, imports,
Ray start and the commit tail included) and their ratio; two in-execution ratios, the loop's
loop (which starts after its imports and model load) against

* ``execution``: the Ray execution as a whole, as the manifest's ``execution_seconds`` records
  it (the encoder actor's start-up, a process importing torch and diffusers and loading the
  model, and the commit tail included);
* ``encoding``: the manifest's ``encoding_seconds``, from the first encoder call to the last
  part staged (start-up and commit tail excluded, as the loop's own timer excludes them): the
  steady-state ratio;

the fixed seconds of each, side by side: the whole run less its steady state (the loop's
process start, imports, model load and exit; latentize's also Ray's start and stop, the encoder
actor's start-up and the commit tail); the encoder's start-up (``encoder_start_seconds``) and
the stage rates of the loop (decode alone, encode alone) for context. Targets on the 2-core
machine: whole-run >= 0.8x the loop, in-execution (start-up and commit tail excluded) >= 1.0x.

``--cluster`` adds two runs to each repeat: the same job submitted twice to a Ray cluster that
is already running, as production jobs run (``ray job submit``): ``ray start --head`` on this
machine, started after the local run and stopped after these two, so that the loop and the
local run never share the cores with an idle cluster. The first job on the fresh cluster
(``cluster_first_*``) also creates Ray Data's detached helper actors, which the second
(``cluster_*``) reuses, as every later job on a long-running cluster does. Their whole-run
ratios leave out what a local Ray costs each job (starting and stopping it) but keep the
driver's connection, Ray Data's start and the encoder actor's start-up. The local run always
passes ``ray.address=local``, so that it starts its own Ray whatever runs here.

``--baseline-tree PATH`` adds one run to each repeat: the same job by another checkout of
latentize (``git worktree add PATH COMMIT``), its own code on ``PYTHONPATH``, in the same
environment; the two runs swap order from one repeat to the next. ``baseline_*`` figures and the
ratios ``vs_baseline_*`` (this tree's images per second over the baseline's) show whether a change
slowed the pipeline, measured side by side.

    python bench/pipeline.py [--images 1536] [--per-shard 64] [--resolution 256] [--repeats 3] [--cluster]
                             [--baseline-tree PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import make_shards, repeat, report, save_model, timed  # noqa: E402

LOOP = textwrap.dedent(
    """
    import glob, io, json, sys, time, warnings
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    import fsspec
    from latentize.config import load_config
    from latentize.encoders import ENCODERS
    from latentize.preprocess import preprocess_sample
    from latentize.sinks.base import tensor_array
    from latentize.sources import SOURCES

    cfg = load_config(sys.argv[1])
    out = sys.argv[2]
    cls = ENCODERS.get(cfg.encoder.type)
    encoder = cls(config=cfg, spec=cls.inspect(cfg))
    reader = SOURCES.get("webdataset")
    batch = cfg.encoder.batch_size or encoder.chunk_size
    decode_s = encode_s = 0.0
    n = 0
    started = time.time()
    for i, url in enumerate(sorted(glob.glob(cfg.input.urls))):
        keys, pixels = [], []
        with fsspec.open(url, "rb") as f:
            for sample in reader(f, config=cfg.input):
                t = time.perf_counter()
                cropped = preprocess_sample(sample.image, key=sample.key, config=cfg.preprocess)
                decode_s += time.perf_counter() - t
                keys.append(sample.key)
                pixels.append(cropped.pixels)
        latents = []
        t = time.perf_counter()
        for s in range(0, len(keys), batch):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                latents.append(encoder.encode(np.stack(pixels[s : s + batch]), keys[s : s + batch]).arrays["latent"])
        encode_s += time.perf_counter() - t
        table = pa.table({"key": keys, "latent": tensor_array(np.concatenate(latents))})
        pq.write_table(table, f"{out}/{i:05d}.parquet", compression="zstd")
        n += len(keys)
    print(json.dumps({"images": n, "loop_s": time.time() - started, "decode_s": decode_s, "encode_s": encode_s}))
    """
)


def _make_inputs(root: Path, images: int, per_shard: int, resolution: int) -> tuple[Path, int]:
    import yaml

    count = make_shards(root / "in", images, per_shard)
    config = {
        "input": {"urls": str(root / "in" / "*.tar")},
        "preprocess": {"resolution": resolution},
        "encoder": {"model": str(save_model(root / "model")), "batch_size": 32},
        "output": {"path": str(root / "out")},
        "ray": {"actors": 1},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, count


def _encode(
    root: Path, config: Path, images: int, env: dict[str, str], address: str, tree: Path = REPO
) -> tuple[float, dict[str, Any]]:
    """One ``latentize encode`` of the checkout ``tree`` into an empty output; its wall seconds
    and its last run's record."""
    shutil.rmtree(root / "out", ignore_errors=True)
    cmd = [sys.executable, "-m", "latentize.cli", "encode", str(config)]
    run_s, _ = timed([*cmd, "--set", f"ray.address={address}"], {**env, "PYTHONPATH": str(tree)}, tree)
    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    assert manifest["samples"]["ok"] + manifest["samples"]["failed"] == images, manifest["samples"]
    return run_s, manifest["runs"][-1]


def _baseline(root: Path, config: Path, images: int, env: dict[str, str], tree: Path) -> dict[str, Any]:
    seconds, last = _encode(root, config, images, env, "local", tree)
    return {
        "baseline_whole_img_s": images / seconds,
        "baseline_encoding_img_s": images / last["encoding_seconds"],
        "baseline_encoder_start_s": float(last["encoder_start_seconds"]),
        "baseline_seconds": seconds,
    }


def _once(
    root: Path, config: Path, images: int, env: dict[str, str], cluster: bool, baseline: Path | None, index: int
) -> dict[str, Any]:
    # The baseline runs before this tree's runs in odd repeats and after them in even ones, so
    # that neither side always meets the page cache or the machine's load first.
    base = _baseline(root, config, images, env, baseline) if baseline and index % 2 else {}
    figures = _measure(root, config, images, env, cluster)
    if baseline and not index % 2:
        base = _baseline(root, config, images, env, baseline)
    if not base:
        return figures
    return (
        figures
        | base
        | {
            "vs_baseline_whole": figures["latentize_whole_img_s"] / base["baseline_whole_img_s"],
            "vs_baseline_encoding": figures["latentize_encoding_img_s"] / base["baseline_encoding_img_s"],
        }
    )


def _measure(root: Path, config: Path, images: int, env: dict[str, str], cluster: bool) -> dict[str, Any]:
    loop_out = root / "loop-out"
    shutil.rmtree(loop_out, ignore_errors=True)
    loop_out.mkdir()
    loop_s, stdout = timed([sys.executable, "-c", LOOP, str(config), str(loop_out)], env, REPO)
    loop = json.loads(stdout.strip().splitlines()[-1])
    # "local": a Ray of its own even where `ray start` runs one (ray.init would join that).
    run_s, last = _encode(root, config, images, env, "local")
    execution_s, encoding_s = last["execution_seconds"], last["encoding_seconds"]
    on_cluster: dict[str, Any] = {}
    if cluster:
        with _running_cluster(root, env) as address:
            for prefix in ("cluster_first", "cluster"):
                cluster_s, cluster_last = _encode(root, config, images, env, address)
                on_cluster |= {
                    f"{prefix}_whole_img_s": images / cluster_s,
                    f"{prefix}_whole_ratio": loop_s / cluster_s,
                    f"{prefix}_execution_ratio": loop["loop_s"] / cluster_last["execution_seconds"],
                    f"{prefix}_encoder_start_s": float(cluster_last["encoder_start_seconds"]),
                    f"{prefix}_seconds": cluster_s,
                }
    return {
        "loop_whole_img_s": images / loop_s,
        "loop_inside_img_s": images / loop["loop_s"],
        "latentize_whole_img_s": images / run_s,
        "latentize_execution_img_s": images / execution_s,
        "whole_ratio": loop_s / run_s,
        "execution_ratio": loop["loop_s"] / execution_s,
        "latentize_encoding_img_s": images / encoding_s,
        "encoding_ratio": loop["loop_s"] / encoding_s,
        "encoder_start_seconds": float(last["encoder_start_seconds"]),
        # Fixed seconds: everything outside the steady state. The loop's are its process start,
        # imports, model load and exit; latentize's add Ray's start and stop, the encoder actor's
        # start-up and the commit tail.
        "loop_fixed_seconds": loop_s - loop["loop_s"],
        "latentize_fixed_seconds": run_s - encoding_s,
        "decode_alone_img_s": images / loop["decode_s"],
        "encode_alone_img_s": images / loop["encode_s"],
        "latentize_seconds": run_s,
        "loop_seconds": loop_s,
        "decode": last["decode"],
        "batch_size": last["batch_size"],
        **on_cluster,
    }


#: Seconds between the cluster's answering ``ray status`` and the job's start.
SETTLE_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _running_cluster(root: Path, env: dict[str, str]) -> Iterator[str]:
    """A Ray head on this machine for the length of the block (``ray start --block``, stopped
    through its own process, never ``ray stop``, which would stop every Ray of the user)."""
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    # A temp folder of its own: `ray start` records its address there, where a plain
    # `ray.init()` never looks (after SIGTERM it stays; only `ray stop` would remove it). Short,
    # for the length limit of Unix socket paths under it.
    temp = tempfile.mkdtemp(prefix="lzray", dir="/tmp")
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}"]
    log = (root / "ray-start.log").open("w")
    head = subprocess.Popen(
        [*cmd, "--include-dashboard=false", "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(ray_bin), "status", f"--address={address}"], env=env, capture_output=True).returncode:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {(root / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(1)
        # A running cluster is an idle one: let its agents finish starting before the job.
        time.sleep(SETTLE_S)
        yield address
    finally:
        head.terminate()
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cluster", action="store_true", help="also submit to an already running Ray cluster")
    parser.add_argument("--baseline-tree", type=Path, help="also run the job by this checkout of latentize")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="latentize-pipeline-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    try:
        config, images = _make_inputs(root, args.images, args.per_shard, args.resolution)
        count = iter(range(args.repeats))
        runs = repeat(
            lambda: _once(root, config, images, env, args.cluster, args.baseline_tree, next(count)),
            args.repeats,
            _line,
        )
        report(runs, f"{images} LAION-like images at {args.resolution}², median of {args.repeats}:", images, args.json)
        print(f"  decode path: {runs[0]['decode']}, encoder batch: {runs[0]['batch_size']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _line(r: dict[str, Any]) -> str:
    line = (
        f"loop {r['loop_whole_img_s']:.1f} img/s whole ({r['loop_inside_img_s']:.1f} inside); "
        f"latentize {r['latentize_whole_img_s']:.1f} img/s whole ({r['latentize_execution_img_s']:.1f} in "
        f"execution, {r['latentize_encoding_img_s']:.1f} while encoding after a "
        f"{r['encoder_start_seconds']:.1f} s encoder start-up); ratios {r['whole_ratio']:.2f} whole, "
        f"{r['execution_ratio']:.2f} in execution, {r['encoding_ratio']:.2f} while encoding; fixed seconds "
        f"{r['loop_fixed_seconds']:.1f} (loop) / {r['latentize_fixed_seconds']:.1f} (latentize)"
    )
    if "cluster_whole_ratio" in r:
        line += (
            f"; on a running cluster, first job {r['cluster_first_whole_img_s']:.1f} img/s whole, ratio "
            f"{r['cluster_first_whole_ratio']:.2f} ({r['cluster_first_encoder_start_s']:.1f} s encoder start-up), "
            f"second {r['cluster_whole_img_s']:.1f} img/s, ratio {r['cluster_whole_ratio']:.2f} "
            f"({r['cluster_encoder_start_s']:.1f} s)"
        )
    if "vs_baseline_whole" in r:
        line += (
            f"; baseline tree {r['baseline_whole_img_s']:.1f} img/s whole, {r['baseline_encoding_img_s']:.1f} while "
            f"encoding: this tree {r['vs_baseline_whole']:.2f}x whole, {r['vs_baseline_encoding']:.2f}x while encoding"
        )
    return line


if __name__ == "__main__":
    main()
