"""The demo on a fresh clone with no hub and nothing beside it: the TAEF2 weights that ship with
latentize encode the demo shards, then the QA report gives its verdict and the mean PSNR.

``bash scripts/demo.sh`` is two steps: ``scripts/venv.sh`` (creates ``.venv`` and installs the
dependencies from PyPI: minutes, and a network this test must not need) and then
``python jobs/encode_laion.py "$@"``. The test checks that the script still ends in that call,
and runs that call itself, in a ``git clone`` of this repository in a temporary folder, with the
test session's Python (which has the dependencies) and ``PYTHONPATH`` pointing at the clone,
``HF_HUB_OFFLINE=1``, an empty Hugging Face cache and no ``../shared`` beside it. So whatever
the demo needs must be committed in the repository, inside the package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from latentize.demo import photo_samples

REPO = Path(__file__).resolve().parents[1]


def _clone(dest: Path) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of latentize to clone")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True, timeout=120)
    return dest


@pytest.mark.slow
def test_demo_runs_offline_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = _clone(tmp_path / "clone")
    assert not (tmp_path / "shared").exists()
    assert re.search(r'^exec \S*python jobs/encode_laion\.py "\$@"$', (clone / "scripts/demo.sh").read_text(), re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        {
            "RAY_ADDRESS": "local",  # its own Ray, never a `ray start` cluster on this machine
            "PYTHONPATH": str(clone),
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),  # an empty cache: nothing to fall back on
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
    )
    result = subprocess.run(
        [sys.executable, "jobs/encode_laion.py"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    out = clone / "demo_data" / "latents" / "taef2"
    assert f"latentize: latents in {out}" in result.stdout
    assert f"{len(photo_samples())} samples ok, 0 failed" in result.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    # The clone's own packaged weights, not a file of this checkout or of ../shared.
    encoder_file = clone / "latentize" / "weights" / "taef2" / "taef2_encoder.pth"
    assert manifest["config"]["encoder"]["model"] == str(encoder_file)
    assert pq.read_table(out, columns=["key"]).num_rows == len(photo_samples())

    assert "latentize qa: PASS" in result.stdout
    found = re.search(r"mean reconstruction PSNR ([0-9.]+) dB over (\d+) decoded samples", result.stdout)
    assert found, result.stdout[-2000:]
    report = json.loads((out / "_qa" / "report.json").read_text())
    assert float(found.group(1)) == pytest.approx(report["reconstruction"]["metrics"]["psnr"]["mean"], abs=0.01)
    # Real photos through TAEF2 at 256² reconstruct at about 30 dB; random weights give ~10 dB.
    assert float(found.group(1)) >= 24.0
    assert "taef2_decoder.pth" in report["reconstruction"]["decoder"]
