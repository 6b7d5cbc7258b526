"""A chaos soak of ``latentize encode``: every fault at once, then proof that nothing was lost.

One :class:`Soak` holds moto's S3 server on loopback (requests counted at the server), the input
shards in its bucket, and a tiny encoder. :meth:`Soak.run` encodes the shards twice with the
real job (``jobs/encode_laion.py`` in a subprocess, each starting its own local Ray):

* a fault-free run, straight to the server;
* a chaos run through :class:`~faults.FaultyProxy` with seeded :class:`~faults.Chaos` (503
  SlowDown, connections reset half-way through a GET's or a PUT's body, delays), the encoder
  actor SIGKILLed every ``kill_actor_every_s`` seconds, the driver and its local Ray SIGKILLed
  once when ``kill_driver_at`` of the shards are committed, and the same command run again
  until it exits 0 (with ``--retry-failed`` after an exit 1).

:meth:`Soak.verify` then checks the chaos output against the shards and the fault-free run, and
:meth:`Soak.figures` gives what a user trusts: faults by kind, retries, requests per shard, wall
time against the fault-free run, bytes uploaded ÷ output bytes. ``bench/soak.py`` runs it at
scale; ``tests/test_soak.py`` runs a scaled-down version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from faults import Chaos, FaultyProxy
from s3server import CountingS3Server

__all__ = ["Attempt", "Soak", "SoakPlan"]

REPO = Path(__file__).resolve().parents[1]
BUCKET = "latentize-soak"
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
#: Bad samples: a truncated JPEG and an HTML page (what img2dataset keeps from a dead link).
_HTML = b"<!doctype html><html><body>404 Not Found</body></html>"


@dataclass(frozen=True)
class SoakPlan:
    """How big the soak is and which faults it injects.

    Attributes:
        shards: WebDataset shards of ``per_shard`` real-photo JPEGs each.
        per_shard: samples per shard.
        seed: the chaos seed (the same seed meets the same faults on the same attempts).
        slowdown, reset, delay: request shares answered 503, reset mid-body, delayed.
        kill_actor_every_s: seconds between SIGKILLs of the encoder actor.
        kill_driver_at: share of committed shards at which the driver is SIGKILLed once.
        resolution: crop side; batch_size: encoder batch; max_attempts: runs of the command.
    """

    shards: int = 1000
    per_shard: int = 16
    seed: int = 0
    slowdown: float = 0.05
    reset: float = 0.01
    delay: float = 0.02
    kill_actor_every_s: float = 20.0
    kill_driver_at: float = 0.4
    resolution: int = 64
    batch_size: int = 16
    max_attempts: int = 6


@dataclass
class Attempt:
    """One run of the command: exit code, seconds, how it ended, its log."""

    returncode: int
    seconds: float
    killed: bool
    retry_failed: bool
    log: str


@dataclass
class _Run:
    name: str
    attempts: list[Attempt] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    actor_kills: int = 0


class Soak:
    """Servers, shards and runs of one soak (a context manager)."""

    def __init__(self, work: Path, plan: SoakPlan, model: Path) -> None:
        self.work, self.plan, self.model = work, plan, model
        self.server = CountingS3Server()
        self.chaos = Chaos(seed=plan.seed, slowdown=plan.slowdown, reset=plan.reset, delay=plan.delay)
        self.keys: list[str] = []
        self.bad_keys: set[str] = set()
        self.runs: dict[str, _Run] = {}
        self.input_bytes = 0

    # -- set-up ---------------------------------------------------------------------------
    def __enter__(self) -> Soak:
        import boto3

        os.environ.update(_CREDENTIALS)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.server.start()
        boto3.client("s3", endpoint_url=self.server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        self._write_shards()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def storage(self, endpoint: str | None = None) -> dict[str, Any]:
        """fsspec storage options of the bucket, through ``endpoint`` (default: the server)."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint or self.server.endpoint, "region_name": "us-east-1"},
        }

    def fs(self) -> Any:
        import fsspec

        return fsspec.filesystem("s3", skip_instance_cache=True, **self.storage())

    def _write_shards(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from latentize.demo import ShardSample, photo_samples, write_webdataset_shard

        photos = photo_samples(resolution=2 * self.plan.resolution)
        per = self.plan.per_shard

        def shard(i: int) -> list[ShardSample]:
            out = []
            for j in range(per):
                photo = photos[(i * per + j) % len(photos)]
                image = photo.image
                if i % 20 == 3 and j == per // 2:
                    image = image[: len(image) // 2]  # truncated JPEG: a decode error row
                elif i % 50 == 11 and j == 0:
                    image = _HTML
                key = f"{i:05d}{j:04d}"
                if image is not photo.image:
                    self.bad_keys.add(key)
                out.append(ShardSample(key=key, image=image, caption=photo.caption, meta=photo.meta))
            return out

        samples = [shard(i) for i in range(self.plan.shards)]
        self.keys = [s.key for chunk in samples for s in chunk]
        self.input_bytes = sum(len(s.image or b"") for chunk in samples for s in chunk)
        storage = self.storage()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: write_webdataset_shard(
                        f"s3://{BUCKET}/in/{i:05d}.tar", samples[i], storage_options=storage
                    ),
                    range(self.plan.shards),
                )
            )

    def _config(self, name: str, endpoint: str) -> Path:
        storage = self.storage(endpoint)
        last = self.plan.shards - 1
        cfg = {
            "input": {"urls": f"s3://{BUCKET}/in/{{00000..{last:05d}}}.tar", "storage_options": storage},
            "preprocess": {"resolution": self.plan.resolution},
            "encoder": {"model": str(self.model), "batch_size": self.plan.batch_size},
            # Parts of one shard each: shards commit as they finish, not all at the end.
            "output": {
                "path": f"s3://{BUCKET}/{name}",
                "storage_options": storage,
                "rows_per_part": self.plan.per_shard,
            },
            "ray": {"address": "local"},
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    # -- runs -----------------------------------------------------------------------------
    def run(self) -> None:
        """The fault-free run, then the chaos run."""
        self._run("clean", self.server.endpoint, chaos=False)
        with FaultyProxy(self.server.endpoint, chaos=self.chaos) as proxy:
            self._run("chaos", proxy.url, chaos=True)

    def _run(self, name: str, endpoint: str, *, chaos: bool) -> None:
        cfg = self._config(name, endpoint)
        run = self.runs[name] = _Run(name)
        mark = len(self.server.requests())
        stop = threading.Event()
        job: list[subprocess.Popen[str]] = []
        killer = threading.Thread(target=self._kill_actors, args=(job, run, stop), daemon=True)
        if chaos:
            killer.start()
        retry_failed = False
        try:
            for attempt in range(self.plan.max_attempts):
                kill_at = self.plan.kill_driver_at if chaos and attempt == 0 else None
                result = self._attempt(cfg, name, job, retry_failed=retry_failed, kill_driver_at=kill_at)
                run.attempts.append(result)
                if result.returncode == 0:
                    break
                retry_failed = result.returncode == 1
        finally:
            stop.set()
            if killer.is_alive():
                killer.join(timeout=10)
        run.requests = self.server.requests()[mark:]

    def _attempt(
        self,
        cfg: Path,
        name: str,
        job: list[subprocess.Popen[str]],
        *,
        retry_failed: bool,
        kill_driver_at: float | None,
    ) -> Attempt:
        cmd = [sys.executable, str(REPO / "jobs" / "encode_laion.py"), "--config", str(cfg)]
        if retry_failed:
            cmd.append("--retry-failed")
        env = {
            **os.environ,
            **_CREDENTIALS,
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
        log = self.work / f"{name}-{len(self.runs[name].attempts)}.log"
        started = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            job[:] = [proc]
            killed = self._watch(proc, name, kill_driver_at)
            proc.wait()
        return Attempt(proc.returncode, time.time() - started, killed, retry_failed, log.read_text())

    def _watch(self, proc: subprocess.Popen[str], name: str, kill_at: float | None) -> bool:
        """Waits for ``proc``; SIGKILLs its process group once ``kill_at`` of the shards have a
        marker (counted from the marker PUTs the server answered: no request of its own)."""
        if kill_at is None:
            return False
        target = max(1, int(kill_at * self.plan.shards))
        marker = re.compile(rf"/{BUCKET}/{name}/_shards/[^/]+\.json$")
        seen: set[str] = set()
        index = 0
        while proc.poll() is None:
            requests = self.server.requests()
            seen.update(r.path for r in requests[index:] if r.method == "PUT" and marker.search(r.path))
            index = len(requests)
            if len(seen) >= target:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
                return True
            time.sleep(0.2)
        return False

    def _kill_actors(self, job: list[subprocess.Popen[str]], run: _Run, stop: threading.Event) -> None:
        """SIGKILLs the encoder actor of the running attempt every ``kill_actor_every_s``."""
        while not stop.wait(self.plan.kill_actor_every_s):
            if not job or job[0].poll() is not None:
                continue
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                with contextlib.suppress(OSError):
                    if "EncodeActor" in cmdline and os.getsid(proc.pid) == job[0].pid:
                        os.kill(proc.pid, signal.SIGKILL)
                        run.actor_kills += 1

    # -- checks ---------------------------------------------------------------------------
    def _table(self, name: str) -> tuple[pa.Table, list[str]]:
        fs = self.fs()
        table = pq.read_table(f"{BUCKET}/{name}", filesystem=fs, columns=["key", "latent"]).sort_by("key")
        errors: list[str] = []
        for path in fs.glob(f"{BUCKET}/{name}/_errors/*.parquet"):
            errors += pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist()
        return table, errors

    def verify(self) -> dict[str, Any]:
        """Checks of the chaos output (each True when it holds), with what was found."""
        chaos, chaos_errors = self._table("chaos")
        clean, clean_errors = self._table("clean")
        keys = chaos.column("key").to_pylist()
        every = sorted(keys + chaos_errors)
        same_keys = clean.column("key").to_pylist() == keys
        latents_equal = same_keys and _latent_bytes(clean) == _latent_bytes(chaos)
        stray = self._stray_objects("chaos")
        status = self._status("chaos")
        return {
            "every_key_exactly_once": every == sorted(self.keys),
            "error_rows_only_for_bad_samples": set(chaos_errors) == self.bad_keys
            and len(chaos_errors) == len(self.bad_keys),
            "clean_run_agrees": sorted(clean.column("key").to_pylist() + clean_errors) == sorted(self.keys),
            "latents_byte_identical_to_clean_run": latents_equal,
            "no_object_outside_the_committed_files": not stray,
            "status_complete": status.get("complete") is True,
            "stray_objects": stray[:20],
            "data_rows": len(keys),
            "error_rows": len(chaos_errors),
        }

    def _stray_objects(self, name: str) -> list[str]:
        """Objects under the output that no marker lists and that are not run-level files."""
        fs = self.fs()
        root = f"{BUCKET}/{name}/"
        objects = {p[len(root) :] for p in fs.find(root)}
        listed = {"_manifest.json", "_inputs.parquet", "_ledger.parquet"}
        for path in fs.glob(f"{root}_shards/*.json"):
            listed.add(path[len(root) :])
            listed.update(json.loads(fs.cat(path))["files"])
        missing = listed - objects - {"_ledger.parquet"}
        return sorted(objects - listed) + [f"missing: {m}" for m in sorted(missing)]

    def _status(self, name: str) -> dict[str, Any]:
        from latentize.sinks.layout import OutputLayout
        from latentize.status import output_status

        return output_status(OutputLayout(f"s3://{BUCKET}/{name}", storage_options=self.storage()))

    # -- figures --------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """What the soak measured, per run and as ratios of the chaos run to the clean one."""
        out: dict[str, Any] = {"plan": self.plan.__dict__, "input_bytes": self.input_bytes}
        for name, run in self.runs.items():
            out[name] = self._run_figures(name, run)
        out["faults_injected"] = {k: v for k, v in self.chaos.counts.items() if k != "requests"}
        out["requests_through_proxy"] = self.chaos.counts["requests"]
        clean, chaos = out.get("clean"), out.get("chaos")
        if clean and chaos:
            out["ratios"] = {
                "wall": round(chaos["seconds"] / clean["seconds"], 3),
                "requests_per_shard": round(chaos["requests_per_shard"] / clean["requests_per_shard"], 3),
                "bytes_uploaded": round(chaos["bytes_uploaded"] / clean["bytes_uploaded"], 3),
            }
        return out

    def _run_figures(self, name: str, run: _Run) -> dict[str, Any]:
        prefix = f"/{BUCKET}/{name}/"
        mine = [r for r in run.requests if r.path.startswith(prefix) or r.path.startswith(f"/{BUCKET}/in/")]
        uploaded = sum(r.body_bytes for r in mine if r.method == "PUT" and not r.copy_source)
        output = sum(self.fs().du(f"{BUCKET}/{name}", total=False).values())
        retries = sum(a.log.count("transient error") for a in run.attempts)
        return {
            "attempts": [
                {
                    "returncode": a.returncode,
                    "seconds": round(a.seconds, 1),
                    "killed": a.killed,
                    "retry_failed": a.retry_failed,
                }
                for a in run.attempts
            ],
            "seconds": round(sum(a.seconds for a in run.attempts), 1),
            "actor_kills": run.actor_kills,
            "latentize_retries": retries,
            "requests": len(mine),
            "requests_by_kind": dict(Counter(r.kind for r in mine)),
            "requests_per_shard": round(len(mine) / self.plan.shards, 2),
            "bytes_uploaded": uploaded,
            "output_bytes": output,
            "uploaded_per_output_byte": round(uploaded / output, 3) if output else None,
        }


def _latent_bytes(table: pa.Table) -> bytes:
    """The latent column's values as one byte string (rows in the table's order)."""
    from latentize.sinks.base import tensor_numpy

    return np.ascontiguousarray(tensor_numpy(table.column("latent"))).tobytes()
