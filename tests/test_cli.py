"""The entry points as a user runs them: `jobs/encode_laion.py`, `latentize encode`, and
`ray job submit` against a local `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from latentize.cli import main
from latentize.demo import photo_samples, write_webdataset_shard

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "encode_laion.py"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _write_config(path: Path, shards: str, out: Path, model: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": shards},
                "preprocess": {"resolution": 64},
                "encoder": {"model": str(model), "batch_size": 4},
                "output": {"path": str(out)},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cli-shards")
    photos = photo_samples()[:6]
    write_webdataset_shard(str(root / "00000.tar"), photos[:3])
    write_webdataset_shard(str(root / "00001.tar"), photos[3:])
    return str(root / "{00000..00001}.tar")


# Docstring markup that must not reach a terminal: roles (:func:`x`) and RST literals (``x``).
_MARKUP = re.compile(r":[a-z]+:`|``")


def _help_of(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """What ``argv`` (ending in --help) prints: ``latentize ...`` in-process, or a jobs/ script."""
    with pytest.raises(SystemExit) as exited:
        if argv[0].startswith("jobs/"):
            monkeypatch.setattr(sys, "argv", [str(REPO / argv[0]), *argv[1:]])
            monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repository
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
        else:
            main(argv)
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


@pytest.mark.parametrize(
    ("argv", "purpose"),
    [
        (["--help"], "autoencoder latents"),
        (["encode", "--help"], "Encode image shards"),
        (["qa", "--help"], "QA report of a latent dataset"),
        (["status", "--help"], "committed, failed or pending"),
        (["models", "--help"], "List the encoder presets"),
        (["plan", "--help"], "Dry run"),
        (["jobs/encode_laion.py", "--help"], "Encode image shards"),
        (["jobs/qa_report.py", "--help"], "QA report of a latent dataset"),
    ],
)
def test_help_is_plain_text_that_says_what_the_command_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], purpose: str
) -> None:
    text = _help_of(monkeypatch, capsys, argv)
    assert purpose in text
    assert not _MARKUP.search(text), _MARKUP.findall(text)


def test_unknown_key_fails_at_start_with_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("encoder:\n  batchsize: 3\noutput:\n  path: out\n")
    result = subprocess.run(
        [sys.executable, str(JOB), "--config", str(cfg)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 2
    assert "encoder.batchsize: unknown key" in result.stderr


def test_trimmed_text_for_a_family_that_attends_to_padding_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "flux.yaml"
    cfg.write_text(yaml.safe_dump({"output": {"path": str(tmp_path / "out")}, "text": {"preset": "flux1"}}))
    assert main(["encode", str(cfg), "--set", "text.storage=trimmed"]) == 2
    err = capsys.readouterr().err
    assert "latentize: error:" in err and "'trimmed' is refused for preset 'flux1'" in err and "attends" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_stops_at_once_and_says_how_to_fix(tmp_path: Path) -> None:
    started = time.time()
    result = subprocess.run(
        # The README's switch of the demo to the Stable Diffusion VAE, which comes from the hub.
        [sys.executable, str(JOB), "--set", "encoder.preset=sd15", "--set", f"output.path={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        env=_env(HF_HOME=str(tmp_path / "hf")),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "stabilityai/sd-vae-ft-mse" in result.stderr
    assert "--set encoder.model=" in result.stderr
    # Nothing was built or written before the model check.
    assert not (tmp_path / "demo_data").exists() and not (tmp_path / "out").exists()
    assert time.time() - started < 60


def test_a_plan_error_is_reported_as_such_while_ray_starts_beside_it(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    # The plan runs in a thread while the local Ray starts: its error, not Ray's, reaches the
    # user, with the exit code of a bad config, and the Ray just started is shut down.
    cfg = _write_config(tmp_path / "cfg.yaml", str(tmp_path / "none" / "*.tar"), tmp_path / "out", tiny_models["kl"])
    result = subprocess.run(
        [str(BIN / "latentize"), "encode", str(cfg)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "latentize: error: input.urls: no file matches" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_with_local_model_runs_end_to_end(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The README's demo command path switched to the SD VAE from a local folder: no config,
    embedded default, preset and model overridden; then the demo's QA report, which fails on
    these random weights (and so does the exit code)."""
    result = subprocess.run(
        [
            sys.executable,
            str(JOB),
            "--set",
            "encoder.preset=sd15",
            "--set",
            f"encoder.model={tiny_models['kl']}",
            "--set",
            "preprocess.resolution=64",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=600,
    )
    out = tmp_path / "demo_data" / "latents" / "sd15"
    assert f"latentize: latents in {out}" in result.stdout, result.stderr[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == len(photo_samples())
    assert "samples ok, 0 failed" in result.stdout
    assert "latentize qa: FAIL" in result.stdout and "mean reconstruction PSNR" in result.stdout
    assert result.returncode == 1


@pytest.mark.slow
def test_latentize_encode_cli_and_rerun(tmp_path: Path, shards: str, tiny_models: dict[str, Path]) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", shards, tmp_path / "out", tiny_models["kl"])
    cmd = [str(BIN / "latentize"), "encode", str(cfg), "--set", "encoder.batch_size=2"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 samples ok, 0 failed" in first.stdout and "img/s" in first.stdout
    assert re.search(r"encoder start-up [0-9.]+ s; then [0-9.]+ img/s while encoding", first.stdout), first.stdout
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["config"]["encoder"]["batch_size"] == 2
    # Its own local Ray (RAY_ADDRESS=local), and no error line from Ray about the encoder pool.
    assert STARTED_RAY in first.stderr and ACTOR_ARGS_LINE not in first.stderr, first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert second.returncode == 0
    assert "nothing to do" in second.stdout
    assert STARTED_RAY not in second.stderr, second.stderr[-3000:]  # nothing to do: no Ray at all
    bad = subprocess.run([*cmd, "--set", f"encoder.model={tmp_path / 'no-model'}"], **_captured())
    assert bad.returncode == 2 and "latentize: error:" in bad.stderr
    assert STARTED_RAY not in bad.stderr, bad.stderr[-3000:]  # a plan error: no Ray at all

    qa = subprocess.run([str(BIN / "latentize"), "qa", str(tmp_path / "out"), "--sample", "0"], **_captured())
    assert "latentize qa:" in qa.stdout, qa.stderr[-3000:]
    assert STARTED_RAY in qa.stderr and "View the dashboard" not in qa.stderr, qa.stderr[-3000:]


#: Ray's line when ray.init starts a local Ray (followed by the dashboard's URL when it runs one).
STARTED_RAY = "Started a local Ray instance."
#: Ray 2.60's error line about a Ray Data actor's ObjectRef constructor arguments.
ACTOR_ARGS_LINE = "has constructor arguments in the object store"


def _captured() -> dict[str, Any]:
    return {"capture_output": True, "text": True, "env": _env(), "timeout": 600}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(1)
    return False


def _submit(ray_cli: str, dashboard: int, env: dict[str, str], command: list[str]) -> subprocess.CompletedProcess[str]:
    """``ray job submit`` of ``command``; retried while the head's job agent is still starting
    (the dashboard port opens before the agent can take jobs: HTTP 500 "No available agent")."""
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(
            [
                ray_cli,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--working-dir",
                str(REPO),
                "--",
                *command,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_against_local_head(tmp_path: Path, shards: str, tiny_models: dict[str, Path]) -> None:
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    ray_cli = str(BIN / "ray")
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-head-{gcs}"  # short: Ray's socket paths have a length limit
    # This cluster is named by its address; the session's RAY_ADDRESS=local is not for it.
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    # --block keeps the head in the foreground of its own process group, so the test stops
    # exactly this cluster (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--num-gpus=1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # The session's own Ray holds the agents' default ports (52365...); a second node on this
            # machine needs others, or its job agent never starts ("No available agent").
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert _wait_for_port(dashboard, 180), "the Ray head's dashboard did not come up"
        cfg = _write_config(tmp_path / "cfg.yaml", shards, tmp_path / "out", tiny_models["kl"])
        submit = _submit(ray_cli, dashboard, env, ["python", "jobs/encode_laion.py", "--config", str(cfg)])
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "6 samples ok, 0 failed" in submit.stdout
        assert "succeeded" in submit.stdout
        assert pq.read_table(tmp_path / "out").num_rows == 6
        # The QA entry point on a cluster is tests/test_qa.py's (jobs/qa_report.py joining by
        # RAY_ADDRESS): a second submission here would add half a minute for nothing new.
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
