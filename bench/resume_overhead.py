#!/usr/bin/env python
"""Resume overhead: throughput of a resumed run against a run that never resumes.

Both runs encode the same number of shards of the same real photos, side by side in one
process and one local Ray:

* fresh:   an empty output, K shards to encode;
* resumed: an output that already holds K committed shards plus K shards whose markers were
  lost in a "crash" (data files and stray staging parts left behind), rerun with the same
  command: it reads the ledger, discards the leftovers and encodes the K pending shards.

The target: the resumed run keeps >= 95 % of the fresh run's images per second. Each pair
is repeated and the median ratio printed.

    python bench/resume_overhead.py [--shards 8] [--per-shard 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    parser.add_argument("--shards", type=int, default=8, help="shards encoded by each run")
    parser.add_argument("--per-shard", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from conftest import build_models

    from latentize.config import load_config
    from latentize.demo import ShardSample, photo_samples, write_webdataset_shard
    from latentize.pipeline import run

    root = Path(tempfile.mkdtemp(prefix="latentize-bench-"))
    model = build_models(root / "models")["kl"]
    photos = photo_samples()
    k = args.shards
    for i in range(2 * k):
        samples = [
            ShardSample(key=f"{i:05d}{j:04d}", image=photos[(i + j) % len(photos)].image, caption="bench")
            for j in range(args.per_shard)
        ]
        write_webdataset_shard(str(root / "in" / f"{i:05d}.tar"), samples)

    def config(urls: str, out: Path):
        return load_config(
            base={
                "input": {"urls": urls},
                "preprocess": {"resolution": args.resolution},
                "encoder": {"model": str(model), "batch_size": 8},
                "output": {"path": str(out)},
            }
        )

    ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False, log_to_driver=False)
    fresh_urls = str(root / "in" / f"{{00000..{k - 1:05d}}}.tar")
    all_urls = str(root / "in" / f"{{00000..{2 * k - 1:05d}}}.tar")
    run(config(fresh_urls, root / "warmup"))  # warm caches, workers and imports once

    ratios = []
    for rep in range(args.repeats):
        fresh_out = root / f"fresh{rep}"
        fresh = run(config(fresh_urls, fresh_out))

        resumed_out = root / f"resumed{rep}"
        run(config(all_urls, resumed_out))
        for i in range(k, 2 * k):  # the crash: markers of the second half never landed
            (resumed_out / "_shards" / f"{i:05d}.json").unlink()
            stray = resumed_out / "_staging" / f"{i:05d}" / "part-000000000-stray.parquet"
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"partial")
        t0 = time.time()
        resumed = run(config(all_urls, resumed_out))
        assert resumed.shards_done_now == k and resumed.samples_now == fresh.samples_now
        ratio = resumed.images_per_second / fresh.images_per_second
        ratios.append(ratio)
        print(
            f"repeat {rep}: fresh {fresh.samples_now} img in {fresh.seconds:.2f}s = "
            f"{fresh.images_per_second:.1f} img/s; "
            f"resumed {resumed.samples_now} img in {resumed.seconds:.2f}s = {resumed.images_per_second:.1f} img/s "
            f"(ledger of {2 * k} shards, {k} committed); ratio {ratio:.3f} [{time.time() - t0:.1f}s]"
        )
        shutil.rmtree(fresh_out)
        shutil.rmtree(resumed_out)
    median = statistics.median(ratios)
    print(
        f"resumed/fresh throughput, median of {len(ratios)}: {median:.3f} "
        f"({'meets' if median >= 0.95 else 'misses'} the >= 0.95 target)"
    )
    ray.shutdown()
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
