"""Driver work that does not grow with the shard count, each latent written once.

Requests are counted where they arrive, at moto's S3 server (``tests/s3server.py``), from the
driver and every Ray worker alike; nothing in fsspec or s3fs is mocked. The figures at realistic
N are ``bench/scale.py``'s; these tests check the properties at small N.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET
from s3server import CountingS3Server, Request

from latentize.config import Config, load_config
from latentize.demo import ShardSample, photo_samples, write_webdataset_shard
from latentize.pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

RES = 64


def _one_image_shards(url: str, n: int, s3: dict[str, Any]) -> list[str]:
    photos = photo_samples(resolution=RES)
    keys = []
    for i in range(n):
        photo = photos[i % len(photos)]
        key = f"{i:05d}0000"
        write_webdataset_shard(
            f"{url}/{i:05d}.tar",
            [ShardSample(key=key, image=photo.image, caption=photo.caption, meta=photo.meta)],
            storage_options=s3,
        )
        keys.append(key)
    return keys


def _config(prefix: str, n: int, model: Path, s3: dict[str, Any]) -> Config:
    return load_config(
        base={
            "input": {"urls": f"{prefix}/in/{{00000..{n - 1:05d}}}.tar", "storage_options": s3},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(model), "batch_size": 4},
            "output": {"path": f"{prefix}/out", "storage_options": s3},
        }
    )


def _startup(requests: list[Request], prefix: str) -> list[Request]:
    """The requests made before Ray's first read of an input shard (the driver's start-up)."""
    first_read = next(
        i for i, r in enumerate(requests) if r.kind in ("get", "head") and r.path.startswith(f"/{prefix}/in/")
    )
    return requests[:first_read]


def _object_sizes(s3: dict[str, Any], root: str) -> dict[str, int]:
    fs = fsspec.filesystem("s3", **s3)
    return {p: info["size"] for p, info in fs.find(root, detail=True).items()}


def test_request_budgets_at_the_server(
    s3: dict[str, Any], s3_server: CountingS3Server, tiny_models: dict[str, Path]
) -> None:
    fresh: dict[int, list[Request]] = {}
    # At least 8 shards: below that, expanding a brace range checks each file on its own.
    for n in (8, 16):
        prefix = f"{S3_BUCKET}/budget{n}"
        keys = _one_image_shards(f"s3://{prefix}/in", n, s3)
        cfg = _config(f"s3://{prefix}", n, tiny_models["kl"], s3)

        s3_server.reset()
        summary = run(cfg)
        assert summary.complete and summary.samples_ok == n
        fresh[n] = s3_server.requests()
        # Each latent is uploaded once: the staged parts are the data files, which reach their
        # final names by server-side copies (no byte through latentize) and nothing else.
        staged = sum(r.body_bytes for r in fresh[n] if r.kind == "put" and "/out/_staging/" in r.path)
        sizes = _object_sizes(s3, f"{prefix}/out")
        data = sum(size for path, size in sizes.items() if "/out/_" not in path)
        assert staged == data
        assert not any(r.kind == "get" and "/out/" in r.path and "/_staging/" in r.path for r in fresh[n])
        table = pq.read_table(f"{prefix}/out", filesystem=fsspec.filesystem("s3", **s3))
        assert sorted(table.column("key").to_pylist()) == keys

        # A rerun of the finished output: a handful of requests, not one per shard.
        s3_server.reset()
        again = run(cfg)
        assert again.nothing_to_do and again.samples_ok == n
        rerun = s3_server.requests()
        assert len(rerun) <= 20 + n / 100, [(r.method, r.path) for r in rerun]
        assert not any(r.kind == "get" and "/_shards/" in r.path for r in rerun)  # markers come from the ledger

    # Start-up requests do not grow with N; the whole run stays within 8 requests per shard.
    assert len(_startup(fresh[16], f"{S3_BUCKET}/budget16")) == len(_startup(fresh[8], f"{S3_BUCKET}/budget8"))
    per_shard = (len(fresh[16]) - len(fresh[8])) / 8
    assert per_shard <= 8, per_shard


def test_resume_lists_once_per_prefix_and_deletes_in_bulk(
    s3: dict[str, Any], s3_server: CountingS3Server, tiny_models: dict[str, Path]
) -> None:
    n = 10
    prefix = f"{S3_BUCKET}/resume"
    keys = _one_image_shards(f"s3://{prefix}/in", n, s3)
    cfg = _config(f"s3://{prefix}", n, tiny_models["kl"], s3)
    run(cfg)
    fs = fsspec.filesystem("s3", **s3)
    # Half the shards lose their markers (a crash before their commits finished); their data
    # files are still there, as are the staged parts they came from (staging goes last).
    for i in range(0, n, 2):
        marker = f"{prefix}/out/_shards/{i:05d}.json"
        files = [f for f in json.loads(fs.cat(marker))["files"] if not f.startswith("_")]
        for f in files:
            first = int(f.rsplit("-", 1)[1].split(".")[0])
            fs.cp_file(f"{prefix}/out/{f}", f"{prefix}/out/_staging/{i:05d}/{RES}x{RES}/part-{first:09d}-0a.parquet")
        fs.rm(marker)

    s3_server.reset()
    summary = run(cfg)
    assert summary.complete and summary.shards_done_now == n // 2
    requests = s3_server.requests()
    startup = _startup(requests, prefix)
    lists = [r for r in startup if r.kind == "list"]
    # The output's listings: the root, _shards/, _staging/, _errors/ (and the input's one).
    assert len(lists) <= 6, [(r.path, r.query) for r in lists]
    assert sum(r.kind == "bulk_delete" for r in startup) == 1
    assert not any(r.kind in ("get", "delete") and "/_shards/" in r.path for r in startup)
    table = pq.read_table(f"{prefix}/out", filesystem=fs)
    assert sorted(table.column("key").to_pylist()) == keys  # every key once: no leftover survived
    assert not fs.exists(f"{prefix}/out/_staging")
