"""A two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``) running latentize.

Run by ``tests/test_cluster.py`` in its own process (one Ray per process): argv[1] is a JSON
object with the S3 storage options, the model folder, the input/output URLs and a local folder;
the script prints one JSON line with what it saw. Steps:

1. a local ``output.path`` on the two nodes is refused at start, and accepted with
   ``ray.shared_filesystem``;
2. a run over S3 with both nodes alive (the markers name the nodes that read and committed);
3. a run whose second node's raylet is killed (SIGKILL, by process id) once a few shards are
   committed, then, if it did not finish, the same run again on the surviving node.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import fsspec  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from latentize.config import load_config  # noqa: E402
from latentize.errors import LatentizeError  # noqa: E402
from latentize.pipeline import run  # noqa: E402


def _config(args: dict[str, Any], inputs: str, out: str, storage: dict[str, Any], **ray_section: Any) -> Any:
    return load_config(
        base={
            "input": {"urls": inputs, "storage_options": args["s3"]},
            "preprocess": {"resolution": 64},
            "encoder": {"model": args["model"], "batch_size": 2},
            "output": {"path": out, "storage_options": storage, "rows_per_part": 4},
            "ray": {"commit_parallelism": 4, **ray_section},
        }
    )


def _kill_when_committed(node: Any, fs: Any, markers: str, after: int, killed: dict[str, Any]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            done = len(fs.ls(markers, detail=False, refresh=True))
        except FileNotFoundError:
            done = 0
        if done >= after:
            pid = node.all_processes["raylet"][0].process.pid
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, markers=done)
            return
        time.sleep(0.2)


def _alive_once_settled(*, expected: int, timeout_s: float = 60.0) -> int:
    """Alive nodes once the GCS has noticed a death (at most ``timeout_s``).

    The run can finish before the health checks (0.5 s x 4 failures) mark the killed node dead,
    most often on a loaded machine when the kill lands near the run's end.
    """
    deadline = time.time() + timeout_s
    while True:
        alive = len([n for n in ray.nodes() if n["Alive"]])
        if alive <= expected or time.time() > deadline:
            return alive
        time.sleep(0.5)


def main() -> None:
    args = json.loads(sys.argv[1])
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": fast_health})
    second = cluster.add_node(num_cpus=2)
    cluster.connect()
    result: dict[str, Any] = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}

    try:
        run(_config(args, args["clean_in"], args["local_out"], {}))
        result["refused"] = None
    except LatentizeError as exc:
        result["refused"] = str(exc)
    shared = run(_config(args, args["clean_in"], args["local_out"], {}, shared_filesystem=True))
    result["shared"] = {"complete": shared.complete, "ok": shared.samples_ok}

    clean = run(_config(args, args["clean_in"], args["clean_out"], args["s3"]))
    result["clean"] = {"complete": clean.complete, "ok": clean.samples_ok}

    fs = fsspec.filesystem("s3", **args["s3"])
    killed: dict[str, Any] = {}
    watcher = threading.Thread(
        target=_kill_when_committed,
        args=(second, fs, args["kill_out"].removeprefix("s3://") + "/_shards", 3, killed),
        daemon=True,
    )
    watcher.start()
    cfg = _config(args, args["kill_in"], args["kill_out"], args["s3"])
    try:
        first = run(cfg)
        result["first_run"] = {"complete": first.complete, "error": None}
    except Exception as exc:  # noqa: BLE001 - whatever the node's death raised; the rerun follows
        result["first_run"] = {"complete": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    watcher.join(timeout=5)
    result["killed"] = killed
    result["alive_after"] = _alive_once_settled(expected=1)
    if not result["first_run"]["complete"]:
        again = run(cfg)
        result["rerun"] = {"complete": again.complete, "shards_done_now": again.shards_done_now}
    print(json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
