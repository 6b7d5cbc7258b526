"""When and how Ray starts: never for a run that fails its plan (nor, see test_img2dataset.py,
for one with nothing to do); a local Ray of the tests' own; no error line from Ray about the
Ray Data actors' constructor arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from latentize.config import load_config
from latentize.demo import photo_samples, write_webdataset_shard
from latentize.errors import LatentizeError
from latentize.pipeline import run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("problem", ["model", "input", "output"])
def test_a_run_whose_plan_fails_starts_no_ray(tmp_path: Path, no_ray: list[str], problem: str) -> None:
    shard = tmp_path / "in" / "00000.tar"
    write_webdataset_shard(str(shard), photo_samples(resolution=64)[:1])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a latentize output")
    base: dict[str, Any] = {
        "input": {"urls": str(shard)},
        "encoder": {"preset": "taef2"},
        "output": {"path": str(tmp_path / "out")},
    }
    if problem == "model":
        base["encoder"] = {"model": str(tmp_path / "no-such-model"), "type": "kl"}
    elif problem == "input":
        base["input"]["urls"] = str(tmp_path / "nothing-here" / "*.tar")
    else:
        base["output"]["path"] = str(tmp_path / "taken")
    with pytest.raises(LatentizeError):
        run(load_config(base=base))
    assert no_ray == []


def test_the_tests_start_a_local_ray_of_their_own() -> None:
    """conftest.py: the session's Ray and every subprocess's run start their own local Ray
    (``RAY_ADDRESS=local``) instead of joining a cluster that ``ray start`` runs here."""
    assert os.environ.get("RAY_ADDRESS") == "local"


_ACTOR_POOL = textwrap.dedent(
    """
    import ray
    from ray.data import ActorPoolStrategy

    from latentize.raystart import init_ray

    assert init_ray(address="local", dashboard=False)


    class Identity:
        def __call__(self, batch):
            return batch


    print("rows", ray.data.range(8).map_batches(Identity, compute=ActorPoolStrategy(size=1)).count(), flush=True)
    """
)


@pytest.mark.slow
def test_a_ray_data_actor_pool_logs_no_constructor_argument_error(tmp_path: Path) -> None:
    """Ray 2.60 logs "... has constructor arguments in the object store and max_restarts > 0"
    for every Ray Data actor pool; a Ray started by latentize has spent it on a throwaway actor."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _ACTOR_POOL], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0 and "rows 8" in proc.stdout, proc.stderr[-3000:]
    assert "Started a local Ray instance." in proc.stderr
    assert "has constructor arguments in the object store" not in proc.stderr, proc.stderr[-3000:]
