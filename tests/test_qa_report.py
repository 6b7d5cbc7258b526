"""QA report rendering (``latentize.qa.report``): self-contained HTML, escaping, JSON output, and
the page as headless Chromium actually draws it.

The report dicts are built the way the QA command builds them, from data: per-channel statistics,
histograms and the scale check come from pseudo-latents computed from the bundled real photos
(skimage/sklearn), the codebook section from Zipf-like code counts, and the reconstruction
section from real photos and blurred copies standing in for decodes, scored with real PSNR/SSIM.
The browser tests skip when no ``chromium``/``chromium-browser`` is on PATH.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import html
import io
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from latentize.qa.report import json_ready, render_html, write_report
from latentize.qa.sections import KEY_LIST_CAP

EVIL_KEY = "<script>alert('pwned')</script>"
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
SCALING = 0.18215


# --------------------------------------------------------------------------- report builders


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {f"{q:g}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=False)}


def latent_stats(x: np.ndarray, keys: list[str]) -> dict[str, Any]:
    """The ``statistics[column][kind]`` block for latents ``x`` (N, C, H, W), computed exactly."""
    n, c = x.shape[:2]
    per_channel = x.transpose(1, 0, 2, 3).reshape(c, -1)
    channels = []
    for ch in range(c):
        v = per_channel[ch]
        fin = v[np.isfinite(v)]
        channels.append(
            {
                "channel": ch,
                "count": int(fin.size),
                "mean": float(fin.mean()),
                "std": float(fin.std()),
                "min": float(fin.min()),
                "max": float(fin.max()),
                "nonfinite": int(v.size - fin.size),
                "percentiles": _percentiles(fin),
            }
        )
    fin = x[np.isfinite(x)]
    bad_rows = [keys[i] for i in range(n) if not np.isfinite(x[i]).all()]
    return {
        "channels": channels,
        "all": {
            "count": int(fin.size),
            "mean": float(fin.mean()),
            "std": float(fin.std()),
            "min": float(fin.min()),
            "max": float(fin.max()),
            "percentiles": _percentiles(fin),
        },
        "rows": n,
        "nonfinite_rows": len(bad_rows),
        "nonfinite_keys": bad_rows,
        "nonfinite_keys_truncated": False,
    }


def histogram(x: np.ndarray, bins: int = 60) -> dict[str, Any]:
    fin = x[np.isfinite(x)]
    edges = np.linspace(float(fin.min()), float(fin.max()), bins + 1)
    counts = []
    for ch in range(x.shape[1]):
        v = x[:, ch].ravel()
        counts.append(np.histogram(v[np.isfinite(v)], edges)[0].tolist())
    return {"edges": edges.tolist(), "counts": counts}


def pseudo_latents(photos: list[tuple[str, np.ndarray]], rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 4, 32, 32) "raw latents" from real photos: 8×8 blocks -> luma, two chroma
    differences and texture, so channels have the skewed, correlated, heavy-tailed look of real
    VAE latents; scaled to std ~5.5, like an SD-VAE latent before its 0.18215 scaling."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, 4, 32, 32), dtype=np.float32)
    for i in range(rows):
        img = photos[i % len(photos)][1].astype(np.float32) / 255.0
        if (i // len(photos)) % 2:
            img = img[:, ::-1]
        blocks = img.reshape(32, 8, 32, 8, 3)
        mean = blocks.mean(axis=(1, 3))
        luma = mean @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        texture = blocks.std(axis=(1, 3)).mean(axis=-1)
        out[i] = np.stack([luma - 0.45, mean[..., 0] - mean[..., 1], mean[..., 2] - luma, texture * 3 - 0.3])
        out[i] += rng.normal(0, 0.05, size=(4, 32, 32)).astype(np.float32)
    return out * 30.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray]]:
    pytest.importorskip("skimage", reason="the bundled photos come from scikit-image (latentize[demo])")
    pytest.importorskip("sklearn", reason="the bundled photos come from scikit-learn (latentize[demo])")
    from latentize.demo import photo_images

    out = []
    for name, im in photo_images():
        rgb = im.convert("RGBA").convert("RGB") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
        out.append((name, np.asarray(ImageOps.fit(rgb, (256, 256), Image.Resampling.BICUBIC))))
    return out


def reconstruction(photos: list[tuple[str, np.ndarray]], count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reconstruction section and its images: blurred photos stand in for decodes."""
    from skimage.metrics import structural_similarity

    images, samples = {}, []
    for i, (_name, original) in enumerate(photos[:count]):
        key = EVIL_KEY if i == 3 else f"0000{i // 8}{i % 8:04d}"
        radius = 0.6 + (i % 5) * 0.6
        decoded = np.asarray(Image.fromarray(original).filter(ImageFilter.GaussianBlur(radius)))
        images[key] = (original, decoded)
        samples.append(
            {
                "key": key,
                "shard": f"0000{i // 8}",
                "psnr": round(psnr(original, decoded), 3),
                "ssim": round(float(structural_similarity(original, decoded, channel_axis=-1, data_range=255)), 4),
                "lpips": None,
            }
        )
    samples.sort(key=lambda s: s["psnr"])
    metrics = {
        m: {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": float(np.min(v))}
        for m in ("psnr", "ssim")
        for v in [[s[m] for s in samples]]
    }
    metrics["lpips"] = None
    section = {
        "sample": count + 1,
        "seed": 0,
        "decoder": "TAESD decoder /x/taef2_decoder.pth",
        "metrics": metrics,
        "samples": samples,
        "failed": {"000010007": "not found in shard 00001"},
        "skipped": None,
    }
    return section, images


def encoder_section(**fields: Any) -> dict[str, Any]:
    """The ``encoder`` section with every key the QA writes, ``fields`` replacing some."""
    columns = {"latent": {"shape": [4, 32, 32], "dtype": "float16"}}
    base = {"type": "kl", "model": None, "preset": None, "model_class": None, "input_range": "[-1, 1]"}
    return {**base, "constants": {}, "columns": columns, **fields}


def nonfinite_column(keys: list[str], *, rows: int, nonfinite: int, truncated: bool = False) -> dict[str, Any]:
    """A ``statistics`` entry of a one-channel column without a finite value (``nonfinite`` of
    ``rows`` rows hold NaN/inf; ``keys`` lists them): no figure to plot, no histogram."""
    figures = {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    percentiles = {f"{q:g}": None for q in PERCENTILES}
    stored = {
        "channels": [{"channel": 0, **figures, "nonfinite": 16 * nonfinite, "percentiles": percentiles}],
        "all": {**figures, "percentiles": percentiles},
        "rows": rows,
        "nonfinite_rows": nonfinite,
        "nonfinite_keys": keys,
        "nonfinite_keys_truncated": truncated,
    }
    return {"stored": stored, "raw": None, "histogram": {"edges": [], "counts": []}}


def reconstruction_section(**fields: Any) -> dict[str, Any]:
    """The ``reconstruction`` section of a run that decoded nothing, ``fields`` replacing some."""
    base = {"sample": 0, "seed": 0, "decoder": None, "metrics": None, "samples": [], "failed": {}, "skipped": None}
    return {**base, **fields}


def checks(passed: bool, std: float) -> list[dict[str, Any]]:
    scale = f"stored std {std:.2f} within 1 ± 0.35" if passed else f"stored std {std:.2f} is not ≈ 1: unscaled?"
    return [
        {"name": "scale", "status": "pass" if passed else "fail", "severity": "error", "message": scale},
        {"name": "finite", "status": "pass", "severity": "error", "message": "no NaN/inf latents"},
        {"name": "outliers", "status": "warn", "severity": "warning", "message": "2 rows hold values beyond 6 std"},
        {"name": "reconstruction", "status": "skip", "severity": "warning", "message": "no decoder configured"},
    ]


def shard_row(shard: str, status: str, rows: int, errors: int, marker_ok: int) -> dict[str, Any]:
    return {
        "shard": shard,
        "status": status,
        "data_rows": rows,
        "error_rows": errors,
        "marker_ok": marker_ok,
        "marker_failed": errors,
    }


@pytest.fixture(scope="module")
def kl_case(photos: list[tuple[str, np.ndarray]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A failing KL report (latents stored without the scaling factor) with reconstructions."""
    rows = 120
    keys = [f"0000{i // 60}{i % 60:04d}" for i in range(rows)]
    keys[7] = EVIL_KEY
    # The bug this report catches: latents written without the scaling factor (std ~5.5, as
    # unscaled SD-VAE latents); "raw" is what the QA recovers by inverting the manifest formula.
    stored = pseudo_latents(photos, rows)
    stored[9, 2, 5, 5] = 31.5  # an outlier
    stored[7, 1, 0, :3] = np.nan  # a non-finite row (the hostile key)
    raw = stored / SCALING
    stored_stats = latent_stats(stored, keys)
    std, mean = stored_stats["all"]["std"], stored_stats["all"]["mean"]
    recon, images = reconstruction(photos, 12)
    constants = {"scaling_factor": SCALING, "shift_factor": 0.0, "formula": "(z - shift_factor) * scaling_factor"}
    report = {
        "format_version": 1,
        "output": "s3://bucket/latents",
        "generated_at": "2026-11-23T10:00:00Z",
        "latentize_version": "0.1.0",
        "passed": False,
        "checks": checks(False, std),
        "encoder": {
            "type": "kl",
            "model": "stabilityai/sd-vae-ft-mse",
            "preset": "sd15",
            "model_class": "AutoencoderKL",
            "input_range": "[-1, 1]",
            "constants": constants,
            "columns": {"latent": {"shape": [4, 32, 32], "dtype": "float16"}},
        },
        "rows": {"data": rows, "errors": 3, "shards": 2},
        "statistics": {
            "latent": {"stored": stored_stats, "raw": latent_stats(raw, keys), "histogram": histogram(stored)}
        },
        "outliers": {
            "threshold_std": 6.0,
            "rows": 1,
            "values": 1,
            "truncated": False,
            "worst": [{"key": keys[9], "channel": 2, "value": 31.5, "z": round((31.5 - mean) / std, 2)}],
        },
        "scale": {
            "applicable": True,
            "manifest": {"scaling_factor": SCALING, "shift_factor": 0.0},
            "recommended": {"scaling_factor": SCALING / std, "shift_factor": mean / std * SCALING},
            "normalized_std": std,  # the manifest says its constants were applied: stored = normalised
            "normalized_mean": mean,
            "stored_std": std,
            "stored_mean": mean,
            "raw_std": std / SCALING,
            "raw_mean": mean / SCALING,
            "ratio": std,
            "tolerance": 0.35,
            "shift_tolerance": 0.5,
            "message": f"stored std {std:.2f}: the latents look unscaled",
        },
        "duplicates": {
            "groups": 1,
            "rows": 2,
            "truncated": False,
            "examples": [{"digest": "ab12cd34ef56ab12cd34ef56", "keys": [keys[3], keys[26]]}],
        },
        "alignment": {
            "totals": {
                "data_rows": rows,
                "error_rows": 3,
                "marker_ok": rows,
                "marker_failed": 3,
                "manifest_ok": rows,
                "manifest_failed": 3,
                "shards_total": 2,
                "shards_committed": 2,
            },
            "problems": ["shard 00001: marker says 61 rows, data holds 60"],
            "shards": [shard_row("00000", "ok", 60, 1, 60), shard_row("00001", "mismatch", 60, 2, 61)],
        },
        "codebook": None,
        "reconstruction": recon,
    }
    return report, images


@pytest.fixture(scope="module")
def vq_case() -> tuple[dict[str, Any], dict[str, Any]]:
    """A passing VQ report: Zipf-like codebook usage with dead codes, 25 shards, reconstruction skipped."""
    rng = np.random.default_rng(1)
    size, total = 1024, 1000 * 16 * 16
    probs = np.zeros(size)
    probs[rng.permutation(size)[:900]] = (np.arange(900) + 5.0) ** -1.1
    counts = rng.multinomial(total, probs / probs.sum())
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    dead_codes = np.flatnonzero(counts == 0)
    top = np.argsort(-counts, kind="stable")[:10]
    report = {
        "format_version": 1,
        "output": "/data/vq-latents",
        "generated_at": "2026-11-23T11:00:00Z",
        "latentize_version": "0.1.0",
        "passed": True,
        "checks": checks(True, 1.01),
        "encoder": {
            "type": "vq",
            "model": "taming/vqgan-f16-1024",
            "preset": None,
            "model_class": "VQModel",
            "input_range": "[-1, 1]",
            "constants": {"num_vq_embeddings": size},
            "columns": {"indices": {"shape": [16, 16], "dtype": "int16"}},
        },
        "rows": {"data": 1000, "errors": 0, "shards": 25},
        "statistics": None,
        "outliers": None,
        "scale": {"applicable": False, "message": "VQ indices carry no scale"},
        "duplicates": {"groups": 0, "rows": 0, "examples": [], "truncated": False},
        "alignment": {
            "totals": {"data_rows": 1000, "error_rows": 0, "shards_total": 25, "shards_committed": 25},
            "problems": [],
            "shards": [shard_row(f"{i:05d}", "ok", 40, 0, 40) for i in range(25)],
        },
        # numpy values on purpose (np.float64 fractions, np.int64 counts): json_ready must convert them.
        "codebook": {
            "codebook_size": size,
            "total": total,
            "out_of_range": 0,
            "used": np.int64((counts > 0).sum()),
            "usage": (counts > 0).mean(),
            "dead": int(dead_codes.size),
            "dead_codes": dead_codes,
            "dead_codes_truncated": False,
            "perplexity": math.exp(entropy),
            "entropy_bits": entropy / math.log(2),
            "counts": counts,
            "top": [{"code": int(c), "count": counts[c], "fraction": counts[c] / total} for c in top],
        },
        "reconstruction": {
            "sample": 16,
            "seed": 0,
            "decoder": None,
            "metrics": None,
            "samples": [],
            "failed": {},
            "skipped": "no decoder for VQ indices configured",
        },
    }
    return report, {}


@pytest.fixture(scope="module")
def kl_html(kl_case: tuple[dict[str, Any], dict[str, Any]]) -> str:
    report, images = kl_case
    return render_html(report, images=images)


@pytest.fixture(scope="module")
def vq_html(vq_case: tuple[dict[str, Any], dict[str, Any]]) -> str:
    return render_html(vq_case[0])


# --------------------------------------------------------------------------- HTML inspection


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of <script> elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def parse(document: str) -> _Tags:
    parser = _Tags()
    parser.feed(document)
    parser.close()
    return parser


def img_srcs(document: str) -> list[str]:
    return [attrs.get("src") or "" for tag, attrs in parse(document).tags if tag == "img"]


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(data)).verify()  # checks chunk CRCs; the object is unusable after
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


CASES = ["kl", "vq"]


@pytest.fixture
def case_html(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_html")


# --------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("case_html", CASES, indirect=True)
def test_html_loads_nothing_external(case_html: str) -> None:
    doc = parse(case_html)
    assert case_html.startswith("<!DOCTYPE html>")
    assert "http://" not in case_html and "https://" not in case_html
    assert "url(" not in case_html and "@import" not in case_html
    for tag, attrs in doc.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base", "form"), tag
        for name, value in attrs.items():
            if name in ("src", "srcset", "data", "poster", "action"):
                assert (value or "").startswith("data:image/png;base64,"), (tag, name, (value or "")[:60])
            if name == "href":
                assert (value or "").startswith("#"), (tag, value)
    # Exactly one script, inline, and the CSP allows only it.
    scripts = [attrs for tag, attrs in doc.tags if tag == "script"]
    assert scripts == [{}]
    csp = [a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1 and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]
    assert "'unsafe-inline'" not in csp[0].split("script-src")[1].split(";")[0]
    assert 'class="section-error"' not in case_html


def test_kl_images_are_valid_pngs(kl_html: str, kl_case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    srcs = img_srcs(kl_html)
    images = [decode_png(s) for s in srcs]
    pairs = len(kl_case[1])
    # scale plot + stored mean/std + raw mean/std + histogram grid + one image per reconstruction pair.
    assert len(srcs) == 4 + pairs
    pair_images = images[4:]
    for image in pair_images:
        assert image.width <= 2 * 256 + 4 and image.height <= 256
        assert image.width > image.height  # original beside decode
    # Distinct plots, not the same picture repeated.
    assert len({s for s in srcs}) == len(srcs)


def test_vq_images_are_valid_pngs(vq_html: str) -> None:
    srcs = img_srcs(vq_html)
    # Only the codebook plot: no statistics, scale not applicable, reconstruction skipped.
    assert len(srcs) == 1
    plot = decode_png(srcs[0])
    assert plot.width > 600 and len(plot.convert("RGB").getcolors(1 << 24)) > 20


def test_sections_in_order(kl_html: str, vq_html: str) -> None:
    def order(document: str) -> list[str]:
        return [a["id"] for t, a in parse(document).tags if t in ("section", "header") and "id" in a]

    assert order(kl_html) == [
        "summary",
        "encoder",
        "scale",
        "statistics",
        "nonfinite",
        "duplicates",
        "alignment",
        "reconstruction",
    ]
    assert order(vq_html) == ["summary", "encoder", "scale", "duplicates", "alignment", "codebook", "reconstruction"]
    assert '<div class="verdict v-fail">FAIL</div>' in kl_html
    assert '<div class="verdict v-pass">PASS</div>' in vq_html
    for status in ("pass", "fail", "warn", "skip"):
        assert f'<span class="status s-{status}">{status}</span>' in kl_html
    assert "Reconstruction skipped: no decoder for VQ indices configured" in vq_html


def test_report_content(kl_html: str, kl_case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    report = kl_case[0]
    stats = report["statistics"]["latent"]["stored"]
    # The per-channel table: 4 channels + "all", each with p1/p50/p99 as reported.
    for ch in stats["channels"]:
        for q in ("1", "50", "99"):
            assert f"{ch['percentiles'][q]:.4g}" in kl_html
    assert '<tr class="all">' in kl_html
    # Reconstructions worst first, in the grid and the table.
    samples = report["reconstruction"]["samples"]
    captions = re.findall(r"<figcaption><code>(.*?)</code>", kl_html)
    assert len(captions) == len(samples)
    assert [s["psnr"] for s in samples] == sorted(s["psnr"] for s in samples)
    assert captions == [html.escape(s["key"]) for s in samples]
    assert "not found in shard 00001" in kl_html
    assert "shard 00001: marker says 61 rows, data holds 60" in kl_html
    assert "s3://bucket/latents" in kl_html and "stabilityai/sd-vae-ft-mse" in kl_html


def test_keys_are_escaped(kl_html: str) -> None:
    # The hostile key appears in non-finite keys, a reconstruction caption, the worst-k table.
    assert EVIL_KEY not in kl_html
    assert kl_html.count("&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;") >= 3
    assert kl_html.count("<script") == 1

    hostile = '"><img src=x onerror=alert(1)>'
    report = {
        "output": hostile,
        "passed": "maybe",
        "checks": [{"name": hostile, "status": hostile, "severity": hostile, "message": hostile}],
        "encoder": encoder_section(
            type=hostile,
            model=hostile,
            constants={hostile: hostile},
            columns={hostile: {"shape": [4], "dtype": hostile}},
        ),
        "duplicates": {
            "groups": 1,
            "rows": 2,
            "truncated": False,
            "examples": [{"digest": hostile, "keys": [hostile, EVIL_KEY]}],
        },
        "alignment": {"totals": {}, "problems": [hostile], "shards": [shard_row(hostile, hostile, 1, 0, 1)]},
        "reconstruction": reconstruction_section(skipped=hostile, decoder=hostile, failed={hostile: hostile}),
    }
    document = render_html(report)
    doc = parse(document)
    assert [t for t, _ in doc.tags].count("img") == 0
    assert all(not name.startswith("on") for _, attrs in doc.tags for name in attrs)
    assert document.count("<script") == 1 and EVIL_KEY not in document
    assert 'class="verdict v-unknown">UNKNOWN' in document
    # An unknown status gets a fixed class, never the text.
    assert '<span class="status s-warn">&quot;&gt;&lt;img src=x onerror=alert(1)&gt;</span>' in document


def test_template_escapes_every_report_string() -> None:
    """Keys, captions, names and messages reach report.html through the Jinja2 templates: each
    one holding markup or ``"&<>'`` must come out as text, in element content and attributes."""
    key = "\"&<>'<script>alert(1)</script>"
    report = {
        "output": f"s3://b/{key}",
        "passed": False,
        "checks": [{"name": "finite", "status": "fail", "severity": "error", "message": f"1 row: {key}"}],
        "encoder": encoder_section(constants={key: 1.0}),
        "statistics": {key: nonfinite_column([key], rows=1, nonfinite=1)},
        "alignment": {"totals": {}, "problems": [f"shard {key}: no marker"], "shards": []},
        "reconstruction": reconstruction_section(
            sample=1,
            samples=[{"key": key, "shard": key, "psnr": 21.5, "ssim": 0.5, "lpips": None}],
            failed={key: f"read: {key}"},
        ),
    }
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    document = render_html(report, images={key: (image, image)})
    escaped = html.escape(key, quote=True)
    assert key not in document and "<script>alert" not in document
    assert document.count("<script") == 1  # the page's own script only
    # Title, header, check message, constant, column heading, non-finite chip, problem, caption,
    # sample and failure tables: every place the key is shown holds it escaped.
    assert document.count(escaped) >= 10
    assert "&quot;&amp;&lt;&gt;&#x27;&lt;script&gt;" in document
    doc = parse(document)
    assert [t for t, _ in doc.tags].count("script") == 1
    (alt,) = [a["alt"] for t, a in doc.tags if t == "img"]
    assert alt == f"original and decoded {key}"  # the attribute parses back to the exact text
    captions = re.findall(r"<figcaption><code>(.*?)</code><br>(.*?)</figcaption>", document)
    assert [(html.unescape(k), html.unescape(c)) for k, c in captions] == [
        (key, f"PSNR 21.5 dB · SSIM 0.5 · shard {key}")
    ]


def test_csp_admits_exactly_the_inline_script(vq_html: str) -> None:
    doc = parse(vq_html)
    (script,) = doc.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    (csp,) = [a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert f"script-src 'sha256-{digest}'" in (csp or "")


def test_missing_and_null_sections() -> None:
    assert "UNKNOWN" in render_html({})
    everything_null = dict.fromkeys(
        [
            "output",
            "generated_at",
            "passed",
            "checks",
            "encoder",
            "rows",
            "statistics",
            "outliers",
            "scale",
            "duplicates",
            "alignment",
            "codebook",
            "reconstruction",
        ]
    )
    document = render_html(everything_null)
    assert [a.get("id") for t, a in parse(document).tags if t == "section"] == []
    assert "No checks recorded." in document

    # Every figure the QA may find NaN or ±inf (report.json: null), or leave uncomputed (None).
    nan, inf = float("nan"), float("inf")
    figures = ["normalized_std", "normalized_mean", "stored_std", "stored_mean", "raw_std", "raw_mean"]
    unplotted = nonfinite_column(["a"], rows=1, nonfinite=1)
    no_data = {"edges": [0.0, 0.5, 1.0], "counts": [[0, 0]]}  # one channel, no finite value to count
    numbers_null = {
        "scale": {
            "applicable": True,
            "message": "normalised latents: std nan is outside 0.74..1.35",
            "manifest": {"scaling_factor": SCALING, "shift_factor": None},
            "recommended": {},
            **dict.fromkeys(figures, nan),
            "tolerance": 0.35,
            "shift_tolerance": 0.5,
        },
        "statistics": {"latent": {**unplotted, "histogram": no_data}},
        "outliers": {
            "threshold_std": 6.0,
            "rows": 1,
            "values": 1,
            "truncated": False,
            "worst": [{"key": "a", "channel": 0, "value": inf, "z": nan}],
        },
        "codebook": {
            "codebook_size": 3,
            "total": 0,
            "out_of_range": 0,
            "used": 0,
            "usage": 0.0,
            "dead": 3,
            "dead_codes": [0, 1, 2],
            "dead_codes_truncated": False,
            "perplexity": nan,
            "entropy_bits": nan,
            "top": [],
            "counts": [0, 0, 0],
        },
        "alignment": {
            "totals": {"manifest_ok": None},
            "problems": [],
            "shards": [{**shard_row("00000", "pending", 0, 0, 0), "marker_ok": None, "marker_failed": None}],
        },
        "reconstruction": reconstruction_section(
            sample=1,
            metrics={"psnr": dict.fromkeys(["mean", "median", "min", "max"], inf), "lpips": None},
            samples=[{"key": "a", "shard": "00000", "psnr": inf, "ssim": nan, "lpips": None}],
        ),
    }
    document = render_html(numbers_null, images={"a": (np.zeros((2, 2, 3)), np.full((2, 2), 0.5))})
    assert 'class="section-error"' not in document
    for src in img_srcs(document):
        decode_png(src)
    with pytest.raises(TypeError):
        render_html([])  # type: ignore[arg-type]


def test_malformed_image_is_reported_not_fatal(kl_case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    report, images = kl_case
    bad = dict(images)
    bad[report["reconstruction"]["samples"][0]["key"]] = (np.zeros((4,)), np.zeros((4,)))
    document = render_html({"reconstruction": report["reconstruction"]}, images=bad)
    assert len(img_srcs(document)) == len(images) - 1
    assert "Images could not be drawn for" in document


def test_key_lists_are_capped() -> None:
    keys = [f"key-{i:04d}" for i in range(120)]
    report = {"statistics": {"latent": nonfinite_column(keys, rows=1000, nonfinite=300, truncated=True)}}
    document = render_html(report)
    section = document.split('<section id="nonfinite">')[1].split("</section>")[0]
    assert section.count("<code>key-") == KEY_LIST_CAP
    assert "key-0049" in section and "key-0050" not in section
    assert "… and 250 more" in section
    assert "kept only the first 120 keys" in section


def test_alignment_collapses_many_shards(kl_html: str, vq_html: str) -> None:
    kl_alignment = kl_html.split('<section id="alignment">')[1].split("</section>")[0]
    vq_alignment = vq_html.split('<section id="alignment">')[1].split("</section>")[0]
    assert "<details>" not in kl_alignment and "00001" in kl_alignment
    assert "<details><summary>25 shards (0 not ok)</summary>" in vq_alignment
    assert vq_alignment.count('<span class="status s-pass">ok</span>') == 25
    assert '<span class="status s-fail">mismatch</span>' in kl_alignment


def test_json_ready() -> None:
    value = {
        "a": float("nan"),
        "b": [float("inf"), -float("inf"), 1.5],
        "c": np.float32(2.5),
        "d": np.int64(7),
        "e": np.array([[1.0, np.nan]], dtype=np.float16),
        "f": (np.bool_(True), None, "x"),
        np.int64(3): "k",
        float("nan"): 1,
        "g": {"h": np.float64("nan")},
        "i": Path("/tmp/x"),
    }
    out = json_ready(value)
    assert out == {
        "a": None,
        "b": [None, None, 1.5],
        "c": 2.5,
        "d": 7,
        "e": [[1.0, None]],
        "f": [True, None, "x"],
        3: "k",
        "nan": 1,
        "g": {"h": None},
        "i": "/tmp/x",
    }
    assert type(out["c"]) is float and type(out["d"]) is int and type(out["f"][0]) is bool
    json.dumps(out, allow_nan=False)
    assert math.isnan(value["a"])  # the input is untouched


def test_write_report(tmp_path: Path, kl_case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    report, images = kl_case
    report = {
        **report,
        "scale": {**report["scale"], "ratio": float("nan"), "stored_std": np.float32(np.inf)},
        "extra": np.array([1.0, np.nan]),
    }
    fs = fsspec.filesystem("file")
    directory = str(tmp_path / "qa" / "nested")
    json_path, html_path = write_report(report, fs=fs, directory=directory, images=images)
    assert (json_path, html_path) == (f"{directory}/report.json", f"{directory}/report.html")

    def no_constants(token: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {token}")

    text = Path(json_path).read_text(encoding="utf-8")
    data = json.loads(text, parse_constant=no_constants)
    assert data["scale"]["ratio"] is None and data["scale"]["stored_std"] is None
    assert data["extra"] == [1.0, None]
    assert data["statistics"]["latent"]["stored"]["nonfinite_keys"] == [EVIL_KEY]
    assert text == json.dumps(data, indent=2, allow_nan=False)
    document = Path(html_path).read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>") and len(img_srcs(document)) == 4 + len(images)
    assert math.isnan(report["scale"]["ratio"])  # the caller's dict is untouched


def test_thread_safe_and_no_pyplot_state(vq_case: tuple[dict[str, Any], dict[str, Any]], vq_html: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda _: render_html(vq_case[0]), range(3)))
    # Byte-identical pages from concurrent renders: nothing shared between calls.
    assert outputs == [vq_html] * 3
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


# --------------------------------------------------------------------------- browser


def _chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium not installed (no chromium or chromium-browser on PATH)")
    return path


def _chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def _body_attrs(dom: str) -> dict[str, str]:
    match = re.search(r"<body([^>]*)>", dom)
    assert match, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


def _colour_pixels(image: Image.Image, rgb: tuple[int, int, int], tol: int = 12) -> int:
    a = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_browser_renders_report(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    exe = _chromium_path()
    report, images = request.getfixturevalue(f"{case}_case")
    _, html_path = write_report(report, fs=fsspec.filesystem("file"), directory=str(tmp_path / "qa"), images=images)
    expected = len(img_srcs(Path(html_path).read_text(encoding="utf-8")))
    assert expected > 0
    url = Path(html_path).resolve().as_uri()

    shot = tmp_path / "shot.png"
    _chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.is_file()
    with Image.open(shot) as image:
        image.load()
        assert image.width == 1280 and image.height >= 1000
        colours = image.convert("RGB").getcolors(1 << 24)
        assert colours is not None and len(colours) > 500, "screenshot looks blank"
        assert float(np.asarray(image.convert("L")).std()) > 15
        # The verdict banner is drawn in its colour (red FAIL, green PASS).
        banner = (0xCF, 0x22, 0x2E) if report["passed"] is False else (0x1A, 0x7F, 0x37)
        assert _colour_pixels(image, banner) > 20_000

    dom = _chromium(exe, tmp_path, "--dump-dom", "--virtual-time-budget=5000", url).stdout
    attrs = _body_attrs(dom)
    assert attrs.get("data-images-loaded") == f"{expected}/{expected}", attrs
    assert attrs.get("data-images-failed") == "0"


@pytest.mark.slow
def test_browser_flags_broken_image(tmp_path: Path, vq_html: str, kl_html: str) -> None:
    exe = _chromium_path()
    # A valid data URI whose bytes are not an image: the page's own check must catch it.
    broken = kl_html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    total = len(img_srcs(broken))
    dom = _chromium(exe, tmp_path, "--dump-dom", "--virtual-time-budget=5000", page.as_uri()).stdout
    attrs = _body_attrs(dom)
    assert attrs.get("data-images-loaded") == f"{total - 1}/{total}"
    assert attrs.get("data-images-failed") == "1"
    assert 'class="plot img-failed"' in dom
    assert f"1 of {total} images failed to load" in dom
