"""QA and status of an output of several data folders: aspect-ratio buckets at two resolutions
with flipped latents, built once by the real job with the tiny KL model.

The report must give each folder its rows, statistics, scale verdict and reconstruction scores
beside the totals; a key stored once per resolution is not a repeat, but a key stored twice at
one resolution (in two bucket folders) is, and a key with no row at one resolution is named.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentize.qa import QAOptions, run_qa
from latentize.sinks import OutputLayout

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

#: Scaled to the area of each resolution: 24x24, 40x24, 24x40 and 56x56, 80x56, 56x80.
BUCKETS = [[64, 64], [96, 64], [64, 96]]
RESOLUTIONS = [32, 64]
COLUMNS = ("latent", "latent_flipped")


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert len(found) == 1, report["checks"]
    return found[0]


def _samples(shard: int) -> list[Any]:
    """Three photos, one at the ratio of each bucket, so every bucket folder gets rows."""
    from latentize.demo import ShardSample, photo_images

    out = []
    for i, (name, img) in enumerate(photo_images()[3 * shard : 3 * shard + 3]):
        w, h = BUCKETS[i]
        buf = io.BytesIO()
        img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(ShardSample(key=f"{shard:05d}{i:04d}", image=buf.getvalue(), caption=name))
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], ray_session: None) -> Path:
    """Two shards of three photos each (plus one corrupt image, an error row) at two resolutions."""
    from latentize.config import load_config
    from latentize.demo import corrupt_samples, write_webdataset_shard
    from latentize.pipeline import run

    root = tmp_path_factory.mktemp("qa_folders")
    write_webdataset_shard(str(root / "in" / "00000.tar"), _samples(0))
    write_webdataset_shard(str(root / "in" / "00001.tar"), _samples(1) + corrupt_samples(shard=1)[1:2])
    cfg = load_config(
        base={
            "input": {"urls": str(root / "in" / "{00000..00001}.tar")},
            "preprocess": {"resolutions": RESOLUTIONS, "buckets": BUCKETS, "flip": True},
            "encoder": {"type": "kl", "model": str(tiny_models["kl"]), "batch_size": 4},
            "output": {"path": str(root / "out")},
        }
    )
    summary = run(cfg)
    assert (summary.samples_ok, summary.samples_failed) == (6, 1)
    return root / "out"


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "_manifest.json").read_text())


@pytest.fixture(scope="module")
def clean(output: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    report_dir = tmp_path_factory.mktemp("qa_folders_report")
    report = run_qa(str(output), options=QAOptions(sample=8, report=str(report_dir), min_psnr=0)).report
    report["_html"] = (report_dir / "report.html").read_text()
    return report


def _values(table: Any, column: str) -> np.ndarray:
    return table.column(column).combine_chunks().to_numpy_ndarray()


def _pooled(values: np.ndarray) -> tuple[float, float]:
    flat = values.astype(np.float64).ravel()
    return float(flat.mean()), float(flat.std())


def test_each_folder_has_its_rows_statistics_and_scale_and_the_totals_hold_them_all(
    output: Path, clean: dict[str, Any]
) -> None:
    folders = _manifest(output)["output"]["folders"]
    assert len(folders) == 6 and {f["slot"] for f in folders.values()} == {0, 1}
    assert set(clean["folders"]) == set(folders)
    everything: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    for name, entry in clean["folders"].items():
        table = pq.read_table(output / name)
        assert entry["rows"] == entry["marker_rows"] == table.num_rows == 2, name
        assert entry["size"] == folders[name]["size"] and entry["slot"] == folders[name]["slot"]
        for column in COLUMNS:
            values = _values(table, column)
            everything[column].append(values.ravel())
            want_mean, want_std = _pooled(values)
            stored = entry["statistics"][column]["stored"]["all"]
            assert stored["mean"] == pytest.approx(want_mean, rel=1e-6, abs=1e-9), (name, column)
            assert stored["std"] == pytest.approx(want_std, rel=1e-6), (name, column)
            assert entry["statistics"][column]["shape"] == list(values.shape[1:])
        # The scale verdict judges this folder's latents alone (stored = normalised for KL).
        assert entry["scale"]["column"] == "latent"
        assert entry["scale"]["normalized_std"] == pytest.approx(_pooled(_values(table, "latent"))[1], rel=1e-6)
        assert entry["scale"]["status"] in {"pass", "warn", "fail"}
    # The totals: every folder's rows, a sample counted once across its two resolutions.
    assert clean["rows"]["data"] == 12 and clean["rows"]["samples"] == 6 and clean["rows"]["errors"] == 1
    for column in COLUMNS:
        want_mean, want_std = _pooled(np.concatenate(everything[column]))
        total = clean["statistics"][column]["stored"]["all"]
        assert total["mean"] == pytest.approx(want_mean, rel=1e-6, abs=1e-9)
        assert total["std"] == pytest.approx(want_std, rel=1e-6)
        # Bucket folders differ in shape: the whole output has none.
        assert clean["statistics"][column]["shape"] is None
    # The HTML report has the per-folder table with every folder and a total row.
    html = clean["_html"]
    assert "Data folders" in html and all(f"<code>{name}</code>" in html for name in folders)
    assert '<tr class="all">' in html


def test_reconstructions_are_decoded_and_scored_per_folder(output: Path, clean: dict[str, Any]) -> None:
    recon = clean["reconstruction"]
    assert recon["sample"] == 8 and len(recon["samples"]) == 8 and not recon["failed"]
    folders = _manifest(output)["output"]["folders"]
    slots = {folders[s["folder"]]["slot"] for s in recon["samples"]}
    assert slots == {0, 1}  # the sample is drawn over rows, so both resolutions are decoded
    assert sum(f["sample"] for f in recon["folders"].values()) == 8
    for name, scored in recon["folders"].items():
        mine = [s["psnr"] for s in recon["samples"] if s["folder"] == name]
        assert scored["sample"] == len(mine)
        assert scored["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(mine))
        entry = clean["folders"][name]["reconstruction"]
        assert entry["sample"] == len(mine) and entry["psnr"] == pytest.approx(np.mean(mine))
    # Folders outside the sample say so (None), not zero.
    unsampled = set(folders) - set(recon["folders"])
    assert all(clean["folders"][name]["reconstruction"] is None for name in unsampled)


def test_a_key_in_every_resolution_folder_is_not_a_repeat(clean: dict[str, Any]) -> None:
    assert clean["alignment"]["problems"] == []
    assert clean["alignment"]["duplicate_keys"] == [] and clean["alignment"]["missing_keys"] == []
    for name in ("counts", "keys_unique", "complete"):
        assert _check(clean, name)["status"] == "pass", clean["checks"]
    shards = {s["shard"]: s for s in clean["alignment"]["shards"]}
    assert (shards["00000"]["data_rows"], shards["00000"]["data_samples"]) == (6, 3)
    assert shards["00001"]["error_rows"] == 1


def _file_with(out: Path, folder: str, key: str) -> Path:
    for path in sorted((out / folder).iterdir()):
        if key in pq.read_table(path, columns=["key"]).column("key").to_pylist():
            return path
    raise AssertionError(f"{key} is in no file of {folder}")


def _edit_marker(out: Path, shard: str, folder: str, delta: int, add: str | None = None) -> None:
    path = out / "_shards" / f"{shard}.json"
    marker = json.loads(path.read_text())
    marker["rows"][folder] += delta
    if add is not None:
        marker["files"].append(add)
    path.write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def broken(output: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the output where key 000000000 is stored again in a second bucket folder of
    resolution 64 and key 000000001 lost its row at resolution 64 (markers edited to match, so
    only the keys tell)."""
    out = tmp_path_factory.mktemp("qa_folders_broken") / "out"
    shutil.copytree(output, out)
    (out / "_ledger.parquet").unlink(missing_ok=True)  # the edited marker files are the truth
    folders = _manifest(out)["output"]["folders"]
    big = sorted(name for name, f in folders.items() if f["slot"] == 1)
    holds = {name: pq.read_table(out / name, columns=["key"]).column("key").to_pylist() for name in big}
    home = next(name for name in big if "000000000" in holds[name])
    other = next(name for name in big if name != home and any(k.startswith("00000") for k in holds[name]))
    # A row of the other bucket (its shape) under the repeated key.
    donor = pq.read_table(_file_with(out, other, next(k for k in holds[other] if k.startswith("00000"))))
    again = donor.slice(0, 1).set_column(donor.schema.get_field_index("key"), "key", [["000000000"]])
    pq.write_table(again, out / other / "repeat.parquet")
    _edit_marker(out, "00000", other, +1, add=f"{other}/repeat.parquet")
    # Key 000000001 loses its row at resolution 64 (and its error row never was).
    lost_in = next(name for name in big if "000000001" in holds[name])
    path = _file_with(out, lost_in, "000000001")
    table = pq.read_table(path)
    keep = [k != "000000001" for k in table.column("key").to_pylist()]
    pq.write_table(table.filter(keep), path)
    _edit_marker(out, "00000", lost_in, -1)
    report = run_qa(str(out), options=QAOptions(sample=0, report=str(out.parent / "rep"))).report
    return {"report": report, "lost_in": lost_in, "out": out}


def test_a_key_twice_at_one_resolution_or_missing_from_one_is_flagged(broken: dict[str, Any]) -> None:
    report = broken["report"]
    assert [g[0] for g in report["alignment"]["duplicate_keys"]] == ["000000000"]
    assert _check(report, "keys_unique")["status"] == "fail"
    assert report["alignment"]["missing_keys"] == [["000000001", 1]]
    problems = report["alignment"]["problems"]
    assert any("000000001 at resolution 1" in p and broken["lost_in"] in p for p in problems), problems
    assert _check(report, "counts")["status"] == "fail"


def test_status_counts_data_rows_per_folder(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from latentize.cli import main
    from latentize.status import output_status

    status = output_status(OutputLayout(str(output)))
    rows = _manifest(output)["output"]["rows_by_folder"]
    assert status["folders"] == rows and sum(rows.values()) == 12
    assert status["samples"] == {"ok": 6, "failed": 1}
    assert main(["status", str(output)]) == 0
    text = capsys.readouterr().out
    assert "data rows per folder:" in text
    for name, n in rows.items():
        assert any(line.split() == [name, str(n)] for line in text.splitlines()), text
