"""The chaos soak, scaled down: tens of shards through seeded storage faults, encoder actor kills
and one driver kill, then every invariant a user relies on (``tests/chaos.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chaos import Soak, SoakPlan

pytestmark = pytest.mark.slow

PLAN = SoakPlan(shards=16, per_shard=4, seed=0, kill_actor_every_s=12.0, kill_driver_at=0.4, max_attempts=5)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Any:
    work = tmp_path_factory.mktemp("soak")
    with Soak(work, PLAN, tiny_models["kl"]) as s:
        s.run()
        yield s


def test_every_invariant_holds_after_the_chaos_run(soak: Soak) -> None:
    checks = soak.verify()
    assert checks.pop("stray_objects") == []
    assert checks.pop("data_rows") + checks.pop("error_rows") == PLAN.shards * PLAN.per_shard
    assert checks == dict.fromkeys(checks, True)


def test_the_chaos_run_met_every_kind_of_fault(soak: Soak) -> None:
    figures = soak.figures()
    chaos = figures["chaos"]
    assert chaos["attempts"][0]["killed"], "the driver was never killed"
    assert chaos["attempts"][-1]["returncode"] == 0
    assert chaos["actor_kills"] >= 1
    assert figures["faults_injected"].get("slowdown", 0) >= 1
    assert figures["clean"]["attempts"] == [
        {"returncode": 0, "seconds": figures["clean"]["attempts"][0]["seconds"], "killed": False, "retry_failed": False}
    ]
