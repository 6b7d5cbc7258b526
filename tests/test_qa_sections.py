"""The typed sections of report.html (``latentize.qa.sections``): what each reads from the report
dict the QA builds, and what it derives for the page (totals, order, caps, collapsed tables).

The report parts here have the shape :mod:`latentize.qa.run` writes (checked key by key against
a real run's report); the page's HTML is tested in ``test_qa_report.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from latentize.qa.checks import Check
from latentize.qa.report import render_html
from latentize.qa.sections import (
    KEY_LIST_CAP,
    MAX_PAIRS,
    Alignment,
    Codebook,
    Folders,
    KeyList,
    Reconstruction,
    Scale,
    Statistics,
    build_page,
)

PERCENTILES = ("0.1", "1", "5", "25", "50", "75", "95", "99", "99.9")


def _figures(mean: float, std: float) -> dict[str, Any]:
    return {
        "count": 36,
        "mean": mean,
        "std": std,
        "min": mean - 2 * std,
        "max": mean + 2 * std,
        "percentiles": {p: mean for p in PERCENTILES},
    }


def _column(mean: float, std: float) -> dict[str, Any]:
    """A float column's statistics as a folder entry holds them (no histogram)."""
    stored = {
        "channels": [{"channel": 0, **_figures(mean, std), "nonfinite": 0}],
        "all": _figures(mean, std),
        "rows": 2,
        "nonfinite_rows": 0,
        "nonfinite_keys": [],
        "nonfinite_keys_truncated": False,
    }
    return {"dtype": "float16", "shape": [1, 6, 6], "stored": stored, "raw": None, "normalization": None}


def _folder(size: list[int], *, rows: int, mean: float, recon: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "size": size,
        "resolution": [32, 32],
        "slot": 0,
        "rows": rows,
        "marker_rows": rows,
        "columns": {"latent": {"shape": [1, 6, 6], "dtype": "float16"}},
        "statistics": {"latent": _column(mean, 0.5)} if rows else {},
        "codebook": None,
        "scale": {"column": "latent", "status": "fail", "normalized_mean": mean, "normalized_std": 0.5, "message": "x"}
        if rows
        else None,
        "reconstruction": recon,
    }


def _sample(key: str, psnr: float | None, folder: str | None = None) -> dict[str, Any]:
    sample = {"key": key, "shard": "00000", "psnr": psnr, "ssim": 0.5, "lpips": None}
    return sample if folder is None else {"key": key, "shard": "00000", "folder": folder, **sample}


@pytest.fixture
def folders_report() -> dict[str, Any]:
    """An output of two data folders, the second without data rows."""
    metrics = {s: {"mean": m, "median": m, "min": m, "max": m} for s, m in (("psnr", 21.0), ("ssim", 0.7))}
    return {
        "rows": {"data": 2, "errors": 0, "shards": 1, "samples": 2},
        "checks": [{"name": "scale", "status": "warn", "severity": "warning", "message": "m"}],
        "statistics": {"latent": {**_column(0.25, 0.5), "histogram": {"edges": [0.0, 1.0], "counts": [[36]]}}},
        "scale": {"applicable": True, "normalized_std": 0.5},
        "codebook": None,
        "reconstruction": {"sample": 2, "metrics": {**metrics, "lpips": None}},
        "folders": {
            "24x24": _folder([24, 24], rows=2, mean=0.25, recon={"sample": 2, "psnr": 21.0, "ssim": 0.7}),
            "40x24": _folder([40, 24], rows=0, mean=0.0, recon=None),
        },
    }


def test_page_verdict_header_and_checks() -> None:
    check = {"name": "finite", "status": "pass", "severity": "error", "message": "no NaN/inf latents"}
    report = {"passed": False, "rows": {"data": 3, "errors": 1, "shards": 2}, "checks": [check]}
    page = build_page(report, {})
    assert (page.verdict, page.verdict_class) == ("FAIL", "fail")
    assert page.rows is not None and (page.rows.data, page.rows.errors, page.rows.shards) == (3, 1, 2)
    assert page.checks == [Check("finite", "pass", "error", "no NaN/inf latents")]
    assert build_page({"passed": True}, {}).verdict == "PASS"
    # Only a boolean is a verdict: the report of a run that never decided has none.
    assert build_page({}, {}).verdict == build_page({"passed": "yes"}, {}).verdict == "UNKNOWN"


def test_sections_the_qa_did_not_write_are_left_out() -> None:
    # A VQ output with no data rows: the QA writes these parts as empty or None.
    report = {"statistics": {}, "scale": {"applicable": False}, "codebook": None, "reconstruction": None}
    page = build_page(report, {})
    assert [s.id for s in page.sections] == ["scale"]
    scale = page.sections[0].view
    assert isinstance(scale, Scale) and not scale.applicable and scale.message is None


def test_a_part_the_page_cannot_read_loses_only_its_section() -> None:
    # Statistics without the per-channel figures the QA always writes: that section says why it
    # is missing, the others are drawn.
    stored = {"rows": 1, "nonfinite_rows": 0, "nonfinite_keys": [], "nonfinite_keys_truncated": False}
    report = {"statistics": {"latent": {"stored": stored, "raw": None}}, "scale": {"applicable": False}}
    page = build_page(report, {})
    assert [(s.id, s.error) for s in page.sections] == [
        ("scale", None),
        ("statistics", "KeyError('channels')"),
        ("nonfinite", None),
    ]
    assert "This section could not be rendered: KeyError(&#x27;channels&#x27;)" in render_html(report)


def test_folders_table_reads_each_folder_and_the_totals(folders_report: dict[str, Any]) -> None:
    folders = Folders.read(folders_report)
    assert folders is not None and folders.columns == ["latent"] and not folders.codebook
    assert folders.headers[:7] == ["folder", "size", "resolution", "rows", "marker rows", "latent mean", "latent std"]
    first, empty, whole = folders.rows
    assert (first.name, first.size, first.resolution, first.rows) == ("24x24", "24 × 24", "32 × 32", 2)
    assert first.pooled == [(0.25, 0.5)] and (first.scale, first.sampled, first.psnr) == ("fail", 2, 21.0)
    # A folder without data rows: no statistics, no scale verdict, nothing decoded.
    assert empty.pooled == [(None, None)] and (empty.scale, empty.normalized_std, empty.psnr) == (None, None, None)
    # The whole output: the report's totals, the scale check's verdict, the mean scores.
    assert whole.total and (whole.name, whole.size, whole.rows, whole.marker_rows) == ("all", "", 2, 2)
    assert whole.pooled == [(0.25, 0.5)] and (whole.scale, whole.normalized_std) == ("warn", 0.5)
    assert (whole.sampled, whole.psnr, whole.ssim) == (2, 21.0, 0.7)
    assert folders.summary is None


def test_folders_total_without_markers_or_scores(folders_report: dict[str, Any]) -> None:
    folders_report["folders"]["40x24"]["marker_rows"] = None
    folders_report["reconstruction"] = {"sample": 0, "metrics": None}  # skipped: no scores
    folders_report["scale"] = {"applicable": False}
    folders = Folders.read(folders_report)
    assert folders is not None
    whole = folders.rows[-1]
    assert (whole.marker_rows, whole.normalized_std, whole.sampled, whole.psnr, whole.ssim) == (
        None,
        None,
        0,
        None,
        None,
    )


def test_statistics_and_nonfinite_read_each_part() -> None:
    column = _column(0.25, 0.5)
    column["stored"]["nonfinite_rows"] = 120
    column["stored"]["nonfinite_keys"] = [f"k{i:03d}" for i in range(100)]
    column["stored"]["nonfinite_keys_truncated"] = True
    column["histogram"] = {"edges": [0.0, 0.5, 1.0], "counts": [[20, 16]]}
    page = build_page({"statistics": {"latent": column}}, {})
    stats, nonfinite = (s.view for s in page.sections)
    assert isinstance(stats, Statistics)
    (col,) = stats.columns
    (part,) = col.parts
    assert (part.title, part.rows, part.nonfinite_rows) == ("Stored values (as written)", 2, 120)
    assert [(c.label, c.mean, c.p50) for c in part.channels] == [(0, 0.25, 0.25)]
    assert (part.pooled.label, part.pooled.nonfinite) == ("all", None)
    assert part.plot is not None and col.histogram is not None and col.channels == 1
    (block,) = nonfinite.blocks
    assert (block.column, block.kind, block.rows) == ("latent", "stored", 120)
    assert block.keys == KeyList(shown=[f"k{i:03d}" for i in range(KEY_LIST_CAP)], more=70, kept=100)


def test_alignment_counts_samples_and_collapses_many_shards() -> None:
    shards = [
        {"shard": f"{i:05d}", "status": "ok" if i else "pending", "data_rows": 4, "data_samples": 2}
        | {"error_rows": 0, "marker_ok": None if i == 0 else 2, "marker_failed": 0}
        for i in range(21)
    ]
    align = Alignment.read({"alignment": {"totals": {"data_rows": 84}, "problems": [], "shards": shards}})
    assert align is not None and align.samples and align.shards[0].data_samples == 2
    assert align.summary == "21 shards (1 not ok)"
    del shards[20]
    for s in shards:
        del s["data_samples"]
    align = Alignment.read({"alignment": {"totals": {}, "problems": ["p"], "shards": shards}})
    assert align is not None and not align.samples and align.summary is None and align.problems == ["p"]


def test_codebook_lists_top_and_dead_codes() -> None:
    counts = [0] * 60 + list(range(1, 69))
    top = [{"code": c, "count": counts[c], "fraction": counts[c] / 100} for c in range(127, 60, -1)]
    book = {
        "codebook_size": 128,
        "total": sum(counts),
        "out_of_range": 2,
        "used": 68,
        "usage": 68 / 128,
        "dead": 60,
        "dead_codes": list(range(60)),
        "dead_codes_truncated": False,
        "perplexity": 50.0,
        "entropy_bits": 5.6,
        "top": top,
        "counts": counts,
    }
    cb = Codebook.read({"codebook": book})
    assert cb is not None and cb.max_entropy_bits == 7.0 and cb.plot is not None
    assert len(cb.top) == KEY_LIST_CAP and cb.top[0] == (127, 68, 0.68)
    assert cb.dead_codes == KeyList(shown=[str(c) for c in range(KEY_LIST_CAP)], more=10, what="codes")


def test_reconstruction_worst_first_with_pairs() -> None:
    samples = [_sample("b", 30.0, "24x24"), _sample("a", None, "24x24"), _sample("c", 12.5, "40x24")]
    rec = {"sample": 3, "seed": 0, "decoder": "d", "metrics": None, "skipped": None}
    rec |= {"samples": samples, "failed": {f"f{i}": "gone" for i in range(KEY_LIST_CAP + 3)}}
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    images = {"c (40x24)": (image, image), "b (24x24)": (image, image), "extra": (image, image)}
    view = Reconstruction.read({"reconstruction": rec}, images)
    assert view is not None and view.folders
    # Worst PSNR first; identical images (null PSNR) last.
    assert [(s.key, s.psnr) for s in view.samples] == [("c", 12.5), ("b", 30.0), ("a", None)]
    assert [p.key for p in view.pairs] == ["c (40x24)", "b (24x24)", "extra"]
    assert view.pairs[0].caption == "PSNR 12.5 dB · SSIM 0.5 · shard 00000 · folder 40x24"
    assert view.pairs[2].caption == "no metrics" and view.images == 3 and view.undrawable == []
    assert len(view.failed) == KEY_LIST_CAP and view.failed_more == 3


def test_reconstruction_draws_at_most_max_pairs() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    images = {f"k{i:03d}": (image, image) for i in range(MAX_PAIRS + 2)}
    images["k000"] = (np.zeros(3), np.zeros(3))  # not an image: reported, and not counted as drawn
    samples = [_sample(k, float(i)) for i, k in enumerate(images)]
    rec = {"sample": len(samples), "seed": 0, "decoder": "d", "metrics": None, "samples": samples}
    view = Reconstruction.read({"reconstruction": {**rec, "failed": {}, "skipped": None}}, images)
    assert view is not None and view.undrawable == ["k000"] and view.images == MAX_PAIRS + 2
    assert [p.key for p in view.pairs] == [f"k{i:03d}" for i in range(1, MAX_PAIRS + 1)]
