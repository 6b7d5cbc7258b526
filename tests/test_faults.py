"""Exactly-once under faults: transient and permanent object-store errors, an encoder actor
killed mid-run, the driver killed mid-run and rerun, and ``--retry-failed``."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import S3_BUCKET
from faults import FaultRule, FaultyProxy

from latentize.cli import main as cli_main
from latentize.config import Config, load_config
from latentize.demo import ShardSample, photo_samples, write_webdataset_shard
from latentize.pipeline import EncodeActor, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

RES = 64
REPO = Path(__file__).resolve().parents[1]


def _config(
    inputs: str, out: str, model: Path, storage: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> Config:
    base: dict[str, Any] = {
        "input": {"urls": inputs, "storage_options": storage or {}},
        "preprocess": {"resolution": RES},
        "encoder": {"model": str(model), "batch_size": 2},
        "output": {"path": out, "storage_options": storage or {}},
    }
    for name, values in sections.items():
        base[name].update(values)
    return load_config(base=base)


def _via(s3: dict[str, Any], endpoint: str) -> dict[str, Any]:
    return {**s3, "client_kwargs": {**s3["client_kwargs"], "endpoint_url": endpoint}}


def _samples(n_shards: int, per_shard: int) -> list[list[ShardSample]]:
    photos = photo_samples(resolution=RES)
    shards = []
    for i in range(n_shards):
        chunk = [photos[(i * per_shard + j) % len(photos)] for j in range(per_shard)]
        shards.append(
            [
                ShardSample(key=f"{i:05d}{j:04d}", image=s.image, caption=s.caption, meta=s.meta)
                for j, s in enumerate(chunk)
            ]
        )
    return shards


def _keys_once(table: Any, errors: list[str], expected: list[str]) -> None:
    keys = table.column("key").to_pylist() + errors
    assert sorted(keys) == sorted(expected)
    assert len(keys) == len(set(keys))


def test_transient_object_store_errors_are_retried(s3: dict[str, Any], tiny_models: dict[str, Path]) -> None:
    prefix = f"s3://{S3_BUCKET}/transient"
    shards = _samples(3, 5)
    for i, samples in enumerate(shards):
        write_webdataset_shard(f"{prefix}/in/{i:05d}.tar", samples, storage_options=s3)
    rules = [
        # More consecutive 503s than botocore retries by itself, so latentize's reopen runs.
        FaultRule(rf"GET /{S3_BUCKET}/transient/in/00000\.tar", "slowdown", times=7),
        FaultRule(rf"GET /{S3_BUCKET}/transient/in/00001\.tar", "reset", times=3),
        FaultRule(rf"PUT /{S3_BUCKET}/transient/out/_staging/", "slowdown", every=2, times=4),
        FaultRule(rf"PUT /{S3_BUCKET}/transient/out/{RES}x{RES}/", "reset", times=2),
        FaultRule(rf"PUT /{S3_BUCKET}/transient/out/_shards/", "slowdown", times=2),
    ]
    with FaultyProxy(s3["client_kwargs"]["endpoint_url"], rules) as proxy:
        storage = _via(s3, proxy.url)
        summary = run(_config(f"{prefix}/in/*.tar", f"{prefix}/out", tiny_models["kl"], storage))
    assert all(rule.failed > 0 for rule in rules), list(proxy.failures())
    assert summary.complete and (summary.samples_ok, summary.samples_failed) == (15, 0)

    fs = fsspec.filesystem("s3", **s3)
    files = sorted(p.split("/transient/out/")[1] for p in fs.find(f"{S3_BUCKET}/transient/out"))
    assert [f for f in files if f.startswith("_")] == sorted(
        ["_manifest.json", "_inputs.parquet", "_ledger.parquet"] + [f"_shards/{i:05d}.json" for i in range(3)]
    )
    data = [f for f in files if not f.startswith("_")]
    assert {re.fullmatch(rf"{RES}x{RES}/(\d{{5}})-\d{{9}}\.parquet", f).group(1) for f in data} == {
        f"{i:05d}" for i in range(3)
    }
    table = pq.read_table(f"{S3_BUCKET}/transient/out", filesystem=fs)
    _keys_once(table, [], [s.key for shard in shards for s in shard])


def test_unreadable_shards_fail_alone_then_retry_failed_redoes_only_them(
    s3: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    prefix = f"s3://{S3_BUCKET}/perm"
    shards = _samples(4, 5)
    write_webdataset_shard(f"{prefix}/in/00000.tar", shards[0], storage_options=s3)
    buf = io.BytesIO()
    local = tmp_path / "full.tar"
    write_webdataset_shard(str(local), shards[1])
    full = local.read_bytes()
    fs = fsspec.filesystem("s3", **s3)
    fs.pipe(f"{prefix}/in/00001.tar", full[: len(full) // 2])  # truncated tar
    # 00002.tar is missing from the bucket; 00003.tar exists but access is denied.
    write_webdataset_shard(f"{prefix}/in/00003.tar", shards[3], storage_options=s3)
    del buf

    deny = FaultRule(rf"(GET|HEAD) /{S3_BUCKET}/perm/in/00003\.tar", "deny")
    cfg_path = tmp_path / "cfg.yaml"
    with FaultyProxy(s3["client_kwargs"]["endpoint_url"], [deny]) as proxy:
        storage = _via(s3, proxy.url)
        cfg = {
            "input": {"urls": f"{prefix}/in/{{00000..00003}}.tar", "storage_options": storage},
            "preprocess": {"resolution": RES},
            "encoder": {"model": str(tiny_models["kl"]), "batch_size": 2},
            "output": {"path": f"{prefix}/out", "storage_options": storage},
        }
        cfg_path.write_text(yaml.safe_dump(cfg))
        assert cli_main(["encode", str(cfg_path)]) == 1  # non-zero: shards failed

        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "latentize.cli",
                "status",
                f"{prefix}/out",
                "--json",
                "--storage-options",
                json.dumps(storage),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 1
        report = json.loads(status.stdout)
        assert report["complete"] is False
        assert report["shards"]["committed"] == 1 and report["shards"]["failed"] == 3
        reasons = report["shards"]["failed_shards"]
        assert "ReadError" in reasons["00001"] or "truncated" in reasons["00001"].lower()
        assert "FileNotFoundError" in reasons["00002"]
        assert "PermissionError" in reasons["00003"]
        marker0 = fs.info(f"{prefix}/out/_shards/00000.json")["LastModified"]

    # Fix the bucket, then redo only the failed shards.
    fs.pipe(f"{prefix}/in/00001.tar", full)
    write_webdataset_shard(f"{prefix}/in/00002.tar", shards[2], storage_options=s3)
    summary = run(
        load_config(
            base={
                **cfg,
                "input": {**cfg["input"], "storage_options": s3},
                "output": {**cfg["output"], "storage_options": s3},
            }
        ),
        retry_failed=True,
    )
    assert summary.complete
    assert (summary.shards_done_now, summary.samples_now) == (3, 15)
    assert fs.info(f"{prefix}/out/_shards/00000.json")["LastModified"] == marker0
    table = pq.read_table(f"{S3_BUCKET}/perm/out", filesystem=fs)
    _keys_once(table, [], [s.key for shard in shards for s in shard])


def _crash_once_actor(flag: Path) -> type[EncodeActor]:
    """An encoder actor whose first replica to reach its second batch creates ``flag`` and kills
    its own process, as a GPU fault or an OOM kill would (defined here, so Ray pickles it by value)."""

    class CrashOnce(EncodeActor):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._batches = 0

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            self._batches += 1
            if self._batches >= 2:
                try:
                    with open(flag, "x"):
                        pass
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return super().__call__(batch)

    return CrashOnce


def test_encoder_actor_killed_mid_run_redoes_its_batch(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    shards = _samples(3, 6)
    for i, samples in enumerate(shards):
        write_webdataset_shard(str(tmp_path / "in" / f"{i:05d}.tar"), samples)
    inputs = str(tmp_path / "in" / "*.tar")
    clean = run(_config(inputs, str(tmp_path / "clean"), tiny_models["kl"]))
    assert clean.complete

    flag = tmp_path / "crashed"
    summary = run(_config(inputs, str(tmp_path / "out"), tiny_models["kl"]), encode_actor=_crash_once_actor(flag))
    assert flag.exists(), "the actor never crashed"
    assert summary.complete and summary.samples_ok == 18
    got = pq.read_table(tmp_path / "out").sort_by("key")
    want = pq.read_table(tmp_path / "clean").sort_by("key")
    assert got.column("key").to_pylist() == want.column("key").to_pylist()
    assert got.column("latent").equals(want.column("latent"))


def test_driver_killed_mid_run_then_same_command_finishes(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    n_shards = 12
    shards = _samples(n_shards, 4)
    for i, samples in enumerate(shards):
        write_webdataset_shard(str(tmp_path / "in" / f"{i:05d}.tar"), samples)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": str(tmp_path / "in" / "*.tar")},
                "preprocess": {"resolution": RES},
                "encoder": {"model": str(tiny_models["kl"]), "batch_size": 1},
                "output": {"path": str(out), "rows_per_part": 2},
                "ray": {"commit_parallelism": 1},
            }
        )
    )
    cmd = [sys.executable, str(REPO / "jobs" / "encode_laion.py"), "--config", str(cfg)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    markers = out / "_shards"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if markers.exists() and len(list(markers.glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait(timeout=60)

    committed = {p.stem: json.loads(p.read_text()) for p in markers.glob("*.json")}
    assert 1 <= len(committed) < n_shards
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = re.search(r"this run read (\d+) samples from (\d+) shard", rerun.stdout)
    assert done, rerun.stdout
    # Only the shards without a marker were encoded again.
    assert int(done.group(2)) == n_shards - len(committed)
    assert int(done.group(1)) == 4 * (n_shards - len(committed))
    table = pq.read_table(out)
    _keys_once(table, [], [s.key for shard in shards for s in shard])
    assert not (out / "_staging").exists()
