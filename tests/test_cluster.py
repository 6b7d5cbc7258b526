"""Many nodes: a two-node Ray cluster on loopback runs the real job (``tests/cluster_job.py``).

Local paths are refused on it unless declared shared; reads and commits run on both nodes; a
node killed mid-run (its raylet, SIGKILL) still ends, after Ray's retries or one rerun, with
every key exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET

from latentize.demo import ShardSample, photo_samples, write_webdataset_shard

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _shards(url: str, n: int, per_shard: int, s3: dict[str, Any]) -> list[str]:
    photos = photo_samples(resolution=64)
    keys = []
    for i in range(n):
        samples = []
        for j in range(per_shard):
            photo = photos[(i * per_shard + j) % len(photos)]
            samples.append(
                ShardSample(key=f"{i:05d}{j:04d}", image=photo.image, caption=photo.caption, meta=photo.meta)
            )
        write_webdataset_shard(f"{url}/{i:05d}.tar", samples, storage_options=s3)
        keys += [s.key for s in samples]
    return keys


def _committed(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    return {Path(p).stem: json.loads(fs.cat(p)) for p in fs.glob(f"{root}/_shards/*.json")}


def test_two_nodes(s3: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path) -> None:
    prefix = f"s3://{S3_BUCKET}/cluster"
    clean_keys = _shards(f"{prefix}/clean/in", 6, 2, s3)
    kill_keys = _shards(f"{prefix}/kill/in", 24, 2, s3)
    args = {
        "s3": s3,
        "model": str(tiny_models["kl"]),
        "clean_in": f"{prefix}/clean/in/*.tar",
        "clean_out": f"{prefix}/clean/out",
        "kill_in": f"{prefix}/kill/in/*.tar",
        "kill_out": f"{prefix}/kill/out",
        "local_out": str(tmp_path / "local-out"),
    }
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cluster_job.py"), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2

    # 1. A local output path on two nodes is refused, with the way out; declared shared, it runs.
    assert "ray.shared_filesystem" in result["refused"] and "object storage" in result["refused"]
    assert result["shared"] == {"complete": True, "ok": len(clean_keys)}

    # 2. Both nodes read and commit; the output is complete, every key once.
    fs = fsspec.filesystem("s3", **s3)
    assert result["clean"] == {"complete": True, "ok": len(clean_keys)}
    markers = _committed(fs, f"{S3_BUCKET}/cluster/clean/out")
    assert len(markers) == 6
    assert len({m["read_node"] for m in markers.values()}) == 2, markers
    assert len({m["commit_node"] for m in markers.values()}) == 2, markers
    table = pq.read_table(f"{S3_BUCKET}/cluster/clean/out", filesystem=fs)
    assert sorted(table.column("key").to_pylist()) == sorted(clean_keys)

    # 3. The second node died mid-run; Ray's retries (or one rerun) still give every key once.
    assert result["killed"].get("pid"), result
    assert result["alive_after"] == 1
    if not result["first_run"]["complete"]:
        assert result["rerun"]["complete"], result
    markers = _committed(fs, f"{S3_BUCKET}/cluster/kill/out")
    assert len(markers) == 24 and all(m["status"] == "ok" for m in markers.values())
    table = pq.read_table(f"{S3_BUCKET}/cluster/kill/out", filesystem=fs)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(kill_keys)
    assert not fs.exists(f"{S3_BUCKET}/cluster/kill/out/_errors")
