#!/usr/bin/env python
"""Chaos soak: a thousand shards through storage faults, actor kills and a driver kill.

Writes ``--shards`` WebDataset shards of ``--per-shard`` real-photo JPEGs (plus a truncated JPEG
in every 20th shard and an HTML page in every 50th) into moto's S3 server on loopback, then runs
``jobs/encode_laion.py`` twice with a tiny f8 encoder (``bench/_common.MODEL``): fault-free, and
through a fault-injecting proxy (seeded: 5 % of requests answered 503 SlowDown, 1 % of GET and
PUT connections reset half-way through the body, 2 % delayed 0.3 s) with the encoder actor
SIGKILLed every 20 s, the driver SIGKILLed once at 40 % of the shards committed, and the same
command rerun until it exits 0. It prints the checks (every key exactly once across data and
error rows, error rows only for the bad samples, latents byte-identical to the fault-free run,
no object outside the committed files, ``latentize status`` complete) and the figures (faults by
kind, retries, requests per shard, wall time and bytes uploaded against the fault-free run).
The harness is ``tests/chaos.py``; ``tests/test_soak.py`` runs a scaled-down version.

    python bench/soak.py                       # 1,000 shards of 16
    python bench/soak.py --shards 100 --json soak.json

Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from _common import save_model
    from chaos import Soak, SoakPlan

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-actor-every", type=float, default=20.0, help="seconds between encoder kills")
    parser.add_argument("--kill-driver-at", type=float, default=0.4, help="share of shards committed")
    parser.add_argument("--json", type=Path, help="write every figure and check here")
    parser.add_argument("--work", type=Path, help="keep the runs' configs and logs in this folder")
    args = parser.parse_args()
    plan = SoakPlan(
        shards=args.shards,
        per_shard=args.per_shard,
        seed=args.seed,
        kill_actor_every_s=args.kill_actor_every,
        kill_driver_at=args.kill_driver_at,
    )
    with tempfile.TemporaryDirectory(prefix="latentize-soak-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = save_model(work / "model")
        with Soak(work, plan, model) as soak:
            print(f"{plan.shards} shards of {plan.per_shard} written; {len(soak.bad_keys)} bad samples", flush=True)
            soak.run()
            checks = soak.verify()
            figures = soak.figures()
    print(json.dumps({"checks": checks, "figures": figures}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"checks": checks, "figures": figures}, indent=1))
    failed = [name for name, ok in checks.items() if ok is False]
    print("checks:", "all passed" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
