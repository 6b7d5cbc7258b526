#!/usr/bin/env python
"""Scale: object-store requests, driver start-up time and bytes written, against the shard count.

A real S3 API (moto's server on loopback, reached through s3fs), with every request counted at
the server (``tests/s3server.py``), from the driver and every Ray worker alike. For each N it
writes N one-image WebDataset shards, then measures, side by side in one process and one Ray:

* fresh run: requests per shard over the whole run (input reads included), and the driver's
  start-up requests (before Ray's first read of an input shard);
* rerun of the finished output: requests in total;
* resume with half the shards committed (the other half lost their markers in a "crash",
  their data files and staged parts left behind): requests in total and at start-up;
* the driver's seconds from ``run()`` until the first sample is encoded;
* bytes uploaded to the output ÷ the final output's bytes (all objects, and data files alone).

``--plan N`` measures planning alone for N pending shards (a synthetic list of empty local
files; nothing is encoded): seconds and the driver's resident memory after planning, after
building the read tasks, and with a committed marker per shard held by the driver (as the
Committer holds them: JSON text).

    python bench/scale.py                 # N = 100, 1000
    python bench/scale.py --large         # and N = 10000
    python bench/scale.py --plan 100000   # planning only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUCKET = "latentize-scale"
RES = 64


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_encode_actor(stamp: Path) -> Any:
    from latentize.pipeline import EncodeActor

    class Timed(EncodeActor):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            if not stamp.exists():
                stamp.write_text(repr(time.time()))
            return super().__call__(batch)

    return Timed


def _write_shards(fs: Any, prefix: str, n: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from latentize.demo import ShardSample, photo_samples, write_webdataset_shard

    photos = photo_samples(resolution=RES)
    opts = fs.storage_options

    def one(i: int) -> None:
        p = photos[i % len(photos)]
        sample = ShardSample(key=f"{i:06d}0000", image=p.image, caption=p.caption, meta=p.meta)
        write_webdataset_shard(f"s3://{prefix}/in/{i:06d}.tar", [sample], storage_options=opts)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


def _crash_half(fs: Any, out: str, n: int) -> None:
    """Every other shard loses its marker; its data files stay, with the staged parts they were
    published from (as a crash between a commit's copies and its marker leaves them)."""
    for i in range(0, n, 2):
        marker = f"{out}/_shards/{i:06d}.json"
        for f in json.loads(fs.cat(marker))["files"]:
            if f.startswith("_"):
                continue
            first = int(f.rsplit("-", 1)[1].split(".")[0])
            fs.cp_file(f"{out}/{f}", f"{out}/_staging/{i:06d}/{RES}x{RES}/part-{first:09d}-0a.parquet")
        fs.rm(marker)


def _fresh_process_caches() -> None:
    """Forget cached filesystems and listings, as a new driver process starts without them."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _startup(requests: list[Any], prefix: str) -> int:
    for i, r in enumerate(requests):
        if r.kind in ("get", "head") and r.path.startswith(f"/{prefix}/in/"):
            return i
    return len(requests)


def measure(n: int, server: Any, s3: dict[str, Any], model: Path, work: Path) -> dict[str, Any]:
    import fsspec

    from latentize.config import load_config
    from latentize.pipeline import run

    fs = fsspec.filesystem("s3", **s3)
    prefix = f"{BUCKET}/n{n}"
    _write_shards(fs, prefix, n)
    cfg = load_config(
        base={
            "input": {"urls": f"s3://{prefix}/in/{{000000..{n - 1:06d}}}.tar", "storage_options": s3},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(model), "batch_size": 16},
            "output": {"path": f"s3://{prefix}/out", "storage_options": s3},
            "ray": {"commit_parallelism": 8},
        }
    )
    stamp = work / f"first-encode-{n}"
    _fresh_process_caches()
    server.reset()
    started = time.time()
    summary = run(cfg, encode_actor=_first_encode_actor(stamp))
    fresh_s = time.time() - started
    fresh = server.requests()
    assert summary.complete and summary.samples_ok == n, summary
    first_encode_s = float(stamp.read_text()) - started
    out = f"{prefix}/out"
    sizes = {p: i["size"] for p, i in fs.find(out, detail=True).items()}
    uploaded = sum(r.body_bytes for r in fresh if r.kind == "put" and r.path.startswith(f"/{out}/"))
    staged = sum(r.body_bytes for r in fresh if r.kind == "put" and r.path.startswith(f"/{out}/_staging/"))
    data = sum(s for p, s in sizes.items() if not p[len(out) + 1 :].startswith("_"))

    _fresh_process_caches()
    server.reset()
    again = run(cfg)
    assert again.nothing_to_do
    rerun = server.requests()

    _crash_half(fs, out, n)
    _fresh_process_caches()
    server.reset()
    resumed = run(cfg)
    assert resumed.complete and resumed.shards_done_now == (n + 1) // 2
    resume = server.requests()
    return {
        "shards": n,
        "fresh_requests": len(fresh),
        "fresh_requests_per_shard": len(fresh) / n,
        "fresh_startup_requests": _startup(fresh, prefix),
        "fresh_seconds": fresh_s,
        "driver_seconds_to_first_encode": first_encode_s,
        "rerun_requests": len(rerun),
        "rerun_budget": 20 + n / 100,
        "resume_requests": len(resume),
        "resume_startup_requests": _startup(resume, prefix),
        "uploaded_bytes_over_final": uploaded / sum(sizes.values()),
        "staged_bytes_over_data_bytes": staged / data,
        "final_bytes": sum(sizes.values()),
        "by_kind_fresh": _kinds(fresh),
    }


def _kinds(requests: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in requests:
        out[r.kind] = out.get(r.kind, 0) + 1
    return dict(sorted(out.items()))


def plan_only(n: int, model: Path, work: Path) -> dict[str, Any]:
    """Planning ``n`` pending shards: seconds and resident memory (MiB) of this driver process."""
    from latentize.config import load_config
    from latentize.pipeline import plan
    from latentize.sources.datasource import ShardDatasource

    folder = work / "plan-in"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:06d}.tar").touch()
    cfg = load_config(
        base={
            "input": {"urls": f"{folder}/{{000000..{n - 1:06d}}}.tar"},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(model)},
            "output": {"path": str(work / "plan-out")},
        }
    )
    import torch  # noqa: F401 - imported before the baseline, as the driver always has it

    baseline = _rss_mib()
    t0 = time.time()
    p = plan(cfg)
    plan_s = time.time() - t0
    after_plan = _rss_mib()
    t0 = time.time()
    tasks = ShardDatasource(shards=p.pending, fmt=p.fmt, config=cfg.input).get_read_tasks(len(p.pending))
    tasks_s = time.time() - t0
    after_tasks = _rss_mib()
    markers = {
        shard: json.dumps(
            {
                "shard": shard,
                "url": url,
                "status": "ok",
                "error": None,
                "samples": 10000,
                "ok": 9990,
                "failed": 10,
                "failed_by_stage": {"decode": 10},
                "reencoded_fp32": 0,
                "rows": {"256x256": 9990},
                "files": [f"256x256/{shard}-{k * 2048:09d}.parquet" for k in range(5)] + [f"_errors/{shard}.parquet"],
                "bytes": 81_000_000,
                "read_node": "f" * 56,
                "commit_node": "e" * 56,
                "fingerprint": p.fingerprint,
                "committed_at": "2026-11-28T00:00:00Z",
            },
            separators=(",", ":"),
        )
        for url, shard in p.pending
    }
    after_markers = _rss_mib()
    assert len(tasks) == n and len(markers) == n
    return {
        "shards": n,
        "plan_seconds": plan_s,
        "read_tasks_seconds": tasks_s,
        "rss_mib_baseline": baseline,
        "rss_mib_after_plan": after_plan,
        "rss_mib_after_read_tasks": after_tasks,
        "rss_mib_with_all_markers": after_markers,
        "peak_rss_mib": _peak_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also N = 10000")
    parser.add_argument("--sizes", type=int, nargs="*", help="shard counts (default 100 1000)")
    parser.add_argument("--plan", type=int, metavar="N", help="measure planning N pending shards only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from conftest import build_models

    work = Path(tempfile.mkdtemp(prefix="latentize-scale-"))
    try:
        model = build_models(work / "models")["kl"]
        if args.plan:
            results: Any = plan_only(args.plan, model, work)
            print(json.dumps(results, indent=2))
        else:
            results = run_sizes(args.sizes or ([100, 1000, 10000] if args.large else [100, 1000]), model, work)
            _print_table(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sizes(sizes: list[int], model: Path, work: Path) -> list[dict[str, Any]]:
    import logging

    import boto3
    import ray
    from s3server import CountingS3Server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = CountingS3Server()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        s3 = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": server.endpoint}}
        ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
        return [measure(n, server, s3, model, work) for n in sizes]
    finally:
        ray.shutdown()
        server.stop()


def _print_table(results: list[dict[str, Any]]) -> None:
    rows = [
        ("fresh run: requests per shard (target <= 8)", "fresh_requests_per_shard", "{:.2f}"),
        ("fresh run: driver start-up requests", "fresh_startup_requests", "{:d}"),
        ("rerun of the finished output: requests", "rerun_requests", "{:d}"),
        ("  budget 20 + N/100", "rerun_budget", "{:.0f}"),
        ("resume, half committed: requests", "resume_requests", "{:d}"),
        ("resume: driver start-up requests", "resume_startup_requests", "{:d}"),
        ("driver seconds before the first sample is encoded", "driver_seconds_to_first_encode", "{:.1f}"),
        ("fresh run: seconds in all", "fresh_seconds", "{:.1f}"),
        ("bytes uploaded / final output bytes (target <= 1.1)", "uploaded_bytes_over_final", "{:.3f}"),
        ("staged bytes / data file bytes", "staged_bytes_over_data_bytes", "{:.3f}"),
    ]
    header = f"{'N':<52}" + "".join(f"{r['shards']:>10}" for r in results)
    print(header)
    for label, key, fmt in rows:
        print(f"{label:<52}" + "".join(f"{fmt.format(r[key]):>10}" for r in results))
    for r in results:
        print(f"N={r['shards']} fresh requests by kind: {r['by_kind_fresh']}")


if __name__ == "__main__":
    main()
