#!/usr/bin/env python
"""QA throughput: rows per second of the QA report's Ray passes against a Ray Data pass that only
reads the same latents, side by side in one process and one local Ray.

The output is planted (``tests/qa_outputs.py``): SD-like latents of 256² images (4×32×32
float16, as `latentize encode` stores them) in Parquet files, one per shard. Printed per repeat:

* read:   a Ray Data pass over the data files that reads the latent column and counts rows;
* stats:  QA pass 1 (exact per-channel moments, sketch, sample selection; Ray's aggregate);
* find:   QA pass 2 (digests, outliers, the shuffle on digest and key);
* report: the whole `latentize qa` with `--sample 0` (both passes, checks, plots, HTML).

    python bench/qa_throughput.py [--rows 20000] [--shards 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    args = parser.parse_args()

    import numpy as np
    import ray
    from qa_outputs import kl_constants, sd_like_raw, write_output

    from latentize.qa import QAOptions, run_qa
    from latentize.qa.run import _columns
    from latentize.qa.scan import DataFilesDatasource, find_rows, list_files, scan_statistics
    from latentize.sinks.contract import read_manifest, run_markers

    root = Path(tempfile.mkdtemp(prefix="latentize-qa-bench-"))
    stored = (sd_like_raw(args.rows, shape=(4, 32, 32)) * 0.18215).astype(np.float16)
    layout = write_output(str(root / "out"), "latent", stored, constants=kl_constants(0.18215), shards=args.shards)
    del stored
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    manifest = read_manifest(layout)
    assert manifest is not None
    columns = _columns(manifest.encoder)
    markers = run_markers(layout, manifest)
    files, _, _ = list_files(layout, markers, ["64x64"])
    mb = sum(layout.fs.size(f.path) for f in files) / 1e6
    print(
        f"{args.rows} rows of 4x32x32 float16 in {len(files)} Parquet files ({mb:.0f} MB), "
        f"{int(ray.cluster_resources()['CPU'])} Ray CPUs"
    )

    def dataset():
        return ray.data.read_datasource(
            DataFilesDatasource(layout=layout, files=files, fmt="parquet", columns=columns),
            override_num_blocks=len(files),
        )

    def read_only() -> None:
        n = dataset().map_batches(lambda b: {"n": [b.num_rows]}, batch_format="pyarrow", batch_size=None).sum("n")
        assert n == args.rows

    state = None

    def stats() -> None:
        nonlocal state
        state = scan_statistics(dataset(), columns=columns, sample=16, seed=0)

    def find() -> None:
        s = state.stats["latent"]
        found = find_rows(
            dataset(),
            None,
            columns=columns,
            mean={"latent": s.mean.tolist()},
            std={"latent": s.std.tolist()},
            outlier_std=6.0,
            sampled=frozenset(),
            partitions=1,
        )
        assert not found.duplicate_keys

    def report() -> None:
        assert run_qa(layout.url, options=QAOptions(sample=0)).passed

    timings: dict[str, list[float]] = {"read": [], "stats": [], "find": [], "report": []}
    read_only()  # warm the workers once
    for repeat in range(args.repeats):
        for name, fn in (("read", read_only), ("stats", stats), ("find", find), ("report", report)):
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
        line = ", ".join(f"{k} {args.rows / v[-1]:,.0f} rows/s" for k, v in timings.items())
        print(f"repeat {repeat + 1}: {line}")
    base = statistics.median(timings["read"])
    for name, values in timings.items():
        med = statistics.median(values)
        print(f"{name:>6}: median {med:6.2f} s, {args.rows / med:10,.0f} rows/s, {med / base:5.2f}x the read-only pass")
    ray.shutdown()


if __name__ == "__main__":
    main()
