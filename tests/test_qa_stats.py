"""Mergeable QA statistics: exactness against numpy, merge-order independence, serialisation."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import pytest

from latentize.qa.stats import CodeUsage, LatentStats, affine_summary

T = TypeVar("T", LatentStats, CodeUsage)

#: Uneven row boundaries for the (37, ...) test data, including a one-row block.
CUTS = [0, 1, 6, 7, 19, 30, 37]


def make_latents(seed: int = 0) -> np.ndarray:
    """(37, 4, 8, 8) float16 with per-channel means/stds and a few large values."""
    rng = np.random.default_rng(seed)
    mean = np.array([0.3, -2.0, 10.0, 0.0])[None, :, None, None]
    std = np.array([1.0, 0.5, 3.0, 0.01])[None, :, None, None]
    x = (rng.standard_normal((37, 4, 8, 8)) * std + mean).astype(np.float16)
    x[3, 1, 2, 2] = 30000.0
    x[20, 2, 0, 0] = -15000.0
    x[5, 0, 7, 7] = 0.0
    return x


def keys_for(n: int, start: int = 0) -> list[str]:
    return [f"k{i:03d}" for i in range(start, start + n)]


def per_channel(x: np.ndarray) -> np.ndarray:
    """(C, N * spatial) float64 view of (N, C, *spatial) data."""
    return np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)


def block_stats(x: np.ndarray, keys: Sequence[str], cuts: Sequence[int], **kw: object) -> list[LatentStats]:
    """One accumulator per block, each sent through bytes as a worker would."""
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        s = LatentStats(channels=x.shape[1], **kw)  # type: ignore[arg-type]
        s.update(x[a:b], keys[a:b])
        parts.append(LatentStats.from_bytes(s.to_bytes()))
    return parts


def tree_merge(parts: list[T], seed: int) -> T:
    """Merges pairs chosen at random (any tree shape), round-tripping merged states through bytes."""
    rng = np.random.default_rng(seed)
    parts = list(parts)
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False), reverse=True)
        b, a = parts.pop(i), parts.pop(j)
        merged = a.merge(b) if rng.random() < 0.5 else b.merge(a)
        parts.append(type(merged).from_bytes(merged.to_bytes()))
    return parts[0]


def merged_stats(x: np.ndarray, seed: int, **kw: object) -> LatentStats:
    return tree_merge(block_stats(x, keys_for(len(x)), CUTS, **kw), seed)


def test_latent_stats_equal_numpy() -> None:
    x = make_latents()
    ref = per_channel(x)
    s = merged_stats(x, seed=1)

    assert s.rows == 37 and s.nonfinite_rows == 0 and s.nonfinite_keys == []
    assert s.count.dtype == np.int64 and s.count.shape == (4,)
    assert np.all(s.count == ref.shape[1])
    assert np.all(s.min == ref.min(axis=1))
    assert np.all(s.max == ref.max(axis=1))
    np.testing.assert_allclose(s.mean, np.mean(ref, axis=1), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.std, np.std(ref, axis=1), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.var, np.var(ref, axis=1), rtol=1e-12, atol=0)
    assert np.all(s.nonfinite == 0)

    ov = s.overall()
    assert ov["count"] == ref.size
    assert ov["min"] == ref.min() and ov["max"] == ref.max()
    np.testing.assert_allclose(ov["mean"], np.mean(ref), rtol=1e-12, atol=0)
    np.testing.assert_allclose(ov["std"], np.std(ref), rtol=1e-12, atol=0)


def test_single_update_matches_merged_and_no_spatial_axes() -> None:
    x = make_latents()
    whole = LatentStats(channels=4)
    whole.update(x, keys_for(37))
    merged = merged_stats(x, seed=2)
    assert np.array_equal(whole.quantiles([0.1, 0.5, 0.9]), merged.quantiles([0.1, 0.5, 0.9]))
    np.testing.assert_allclose(whole.mean, merged.mean, rtol=1e-12)

    flat = np.random.default_rng(3).standard_normal((50, 3))  # (N, C): no spatial axes
    s = LatentStats(channels=3)
    s.update(flat, keys_for(50))
    s.update(flat[:0], [])
    assert np.all(s.count == 50) and np.all(s.max == flat.max(axis=0))
    np.testing.assert_allclose(s.mean, flat.mean(axis=0), rtol=1e-12)


def test_merge_order_independent() -> None:
    x = make_latents()
    a, b = merged_stats(x, seed=10), merged_stats(x, seed=11)
    qs = np.linspace(0, 1, 41)
    assert np.array_equal(a.quantiles(qs), b.quantiles(qs))
    assert np.array_equal(a.overall_quantiles(qs), b.overall_quantiles(qs))
    ca, ea = a.histogram()
    cb, eb = b.histogram()
    assert np.array_equal(ca, cb) and np.array_equal(ea, eb)
    assert np.array_equal(a.count, b.count)
    assert np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13)
    assert a.to_dict()["channels"][0]["percentiles"] == b.to_dict()["channels"][0]["percentiles"]


def assert_ddsketch_guarantee(est: np.ndarray, values: np.ndarray, qs: np.ndarray, accuracy: float) -> None:
    """DDSketch guarantees relative accuracy against the order statistic of 0-based rank
    floor(q (n - 1)) (numpy's method="lower"), for magnitudes inside the sketch window; below
    MIN_VALUE the zero bucket answers 0, an absolute error under MIN_VALUE."""
    true = np.quantile(values, qs, method="lower")
    bound = accuracy * np.abs(true) * (1 + 1e-9) + LatentStats.MIN_VALUE
    assert np.all(np.abs(est - true) <= bound), np.max(np.abs(est - true) / np.maximum(np.abs(true), 1e-300))


@pytest.mark.parametrize("accuracy", [0.01, 0.05])
def test_quantiles_within_relative_accuracy(accuracy: float) -> None:
    x = make_latents()
    s = merged_stats(x, seed=4, relative_accuracy=accuracy)
    qs = np.concatenate([np.linspace(0, 1, 201), [0.001, 0.999]])
    est = s.quantiles(qs)
    assert est.shape == (4, qs.size)
    ref = per_channel(x)
    for c in range(4):
        assert_ddsketch_guarantee(est[c], ref[c], qs, accuracy)
    assert_ddsketch_guarantee(s.overall_quantiles(qs), ref.ravel(), qs, accuracy)

    # Values spanning many decades and both signs, in float32 and float64.
    rng = np.random.default_rng(5)
    mags = np.exp(rng.uniform(np.log(1e-5), np.log(1e5), size=(200, 2, 16)))
    wide = mags * rng.choice([-1.0, 1.0], size=mags.shape)
    for dtype in (np.float32, np.float64):
        v = wide.astype(dtype)
        t = tree_merge(block_stats(v, keys_for(200), [0, 13, 90, 91, 200], relative_accuracy=accuracy), seed=6)
        est = t.quantiles(qs)
        for c in range(2):
            assert_ddsketch_guarantee(est[c], v[:, c].astype(np.float64).ravel(), qs, accuracy)


def test_histogram_from_sketch() -> None:
    x = make_latents()
    s = merged_stats(x, seed=7)
    counts, edges = s.histogram(bins=30)
    assert counts.shape == (4, 30) and counts.dtype == np.int64
    assert edges.shape == (31,) and edges.dtype == np.float64 and np.all(np.diff(edges) > 0)
    # The default range spans the 0.1..99.9th pooled percentiles, so it holds most values.
    assert counts.sum() >= 0.997 * s.count.sum()
    full, _ = s.histogram(bins=10, lo=-1e5, hi=1e5)
    assert np.array_equal(full.sum(axis=1), s.count)
    with pytest.raises(ValueError):
        s.histogram(lo=1.0, hi=1.0)


def test_nonfinite_counted_and_excluded() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    x[1, 0, 2, 3] = np.nan
    x[4, 2, 0, 0] = np.inf
    x[4, 2, 1, 1] = np.inf
    x[5, 1, 3, 3] = -np.inf
    keys = ["f", "b", "e", "a", "d", "c"]
    parts = block_stats(x, keys, [0, 2, 5, 6])
    s = tree_merge(parts, seed=9)

    assert s.nonfinite.tolist() == [1, 1, 2]
    assert s.rows == 6 and s.nonfinite_rows == 3
    assert s.nonfinite_keys == ["b", "c", "d"] and not s.nonfinite_keys_truncated
    ref = per_channel(x)
    for c in range(3):
        ok = ref[c][np.isfinite(ref[c])]
        assert s.count[c] == ok.size
        assert s.min[c] == ok.min() and s.max[c] == ok.max()
        np.testing.assert_allclose(s.mean[c], np.mean(ok), rtol=1e-12)
        np.testing.assert_allclose(s.std[c], np.std(ok), rtol=1e-12)
        assert_ddsketch_guarantee(s.quantiles([0, 0.5, 1])[c], ok, np.array([0, 0.5, 1]), 0.01)
    d = s.to_dict()
    assert d["nonfinite_keys"] == ["b", "c", "d"] and d["channels"][2]["nonfinite"] == 2

    # A channel with nothing finite yields NaN figures and None in JSON.
    e = LatentStats(channels=2)
    e.update(np.array([[[np.nan], [1.0]]]), ["z"])
    assert e.count.tolist() == [0, 1] and np.isnan(e.mean[0]) and np.isnan(e.min[0])
    assert np.isnan(e.quantiles([0.5])[0, 0]) and e.quantiles([0.5])[1, 0] == 1.0
    ch0 = json.loads(json.dumps(e.to_dict()))["channels"][0]
    assert ch0["mean"] is None and ch0["percentiles"]["50"] is None


def test_key_limit_keeps_smallest_regardless_of_order() -> None:
    rng = np.random.default_rng(12)
    keys = [f"key-{v:05d}" for v in rng.permutation(30000)[:30]]
    x = np.zeros((30, 2, 2), dtype=np.float32)
    x[:, 1, 0] = np.nan
    results = []
    for seed in range(4):
        cuts = [0, *sorted(np.random.default_rng(seed).choice(np.arange(1, 30), size=5, replace=False)), 30]
        results.append(tree_merge(block_stats(x, keys, cuts, key_limit=5), seed=seed))
    for s in results:
        assert s.nonfinite_keys == sorted(keys)[:5]
        assert s.nonfinite_keys_truncated and s.nonfinite_rows == 30

    exact = tree_merge(block_stats(x[:5], keys[:5], [0, 2, 5], key_limit=5), seed=0)
    assert exact.nonfinite_keys == sorted(keys[:5]) and not exact.nonfinite_keys_truncated


def test_affine_summary_matches_transformed_data() -> None:
    x = make_latents()
    s = merged_stats(x, seed=13)
    summary = s.to_dict()
    before = copy.deepcopy(summary)
    scale = np.array([0.5, 2.0, 1 / 0.18215, 3.0])
    offset = np.array([0.1, -1.0, 0.0, 5.0])
    raw_summary = affine_summary(summary, scale, offset)
    assert summary == before  # pure

    raw = per_channel(x) * scale[:, None] + offset[:, None]
    for c, ch in enumerate(raw_summary["channels"]):
        assert ch["count"] == raw.shape[1]
        np.testing.assert_allclose(ch["mean"], np.mean(raw[c]), rtol=1e-9)
        np.testing.assert_allclose(ch["std"], np.std(raw[c]), rtol=1e-9)
        np.testing.assert_allclose(ch["min"], raw[c].min(), rtol=1e-12)
        np.testing.assert_allclose(ch["max"], raw[c].max(), rtol=1e-12)
        for k, v in ch["percentiles"].items():
            np.testing.assert_allclose(v, summary["channels"][c]["percentiles"][k] * scale[c] + offset[c], rtol=1e-12)
    a = raw_summary["all"]
    assert a["count"] == raw.size
    np.testing.assert_allclose(a["mean"], np.mean(raw), rtol=1e-9)
    np.testing.assert_allclose(a["std"], np.std(raw), rtol=1e-9)
    np.testing.assert_allclose(a["min"], raw.min(), rtol=1e-12)
    np.testing.assert_allclose(a["max"], raw.max(), rtol=1e-12)
    assert set(a["percentiles"]) == set(summary["all"]["percentiles"])
    assert all(v is None for v in a["percentiles"].values())
    json.dumps(raw_summary, allow_nan=False)
    with pytest.raises(ValueError):
        affine_summary(summary, -scale, offset)


def test_latent_to_dict_json_ready() -> None:
    s = merged_stats(make_latents(), seed=14)
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    assert list(d["channels"][0]["percentiles"]) == ["0.1", "1", "5", "25", "50", "75", "95", "99", "99.9"]
    assert {"count", "mean", "std", "min", "max", "percentiles"} <= set(d["all"])
    assert d["rows"] == 37 and d["nonfinite_keys_truncated"] is False
    empty = LatentStats(channels=2).to_dict()
    json.dumps(empty, allow_nan=False)
    assert empty["all"]["mean"] is None and empty["channels"][1]["count"] == 0


def test_serialisation_is_not_pickle_and_checks_kind() -> None:
    s = LatentStats(channels=2)
    s.update(np.ones((1, 2, 3)), ["a"])
    data = s.to_bytes()
    assert isinstance(data, bytes)
    with np.load(__import__("io").BytesIO(data), allow_pickle=False) as npz:
        assert "sketch" in npz.files
    with pytest.raises(ValueError):
        CodeUsage.from_bytes(data)
    with pytest.raises(ValueError):
        LatentStats.from_bytes(b"not an archive")
    with pytest.raises(ValueError):
        LatentStats(channels=3).merge(s)
    with pytest.raises(ValueError):
        LatentStats(channels=2, relative_accuracy=0.02).merge(s)
    with pytest.raises(ValueError):
        s.update(np.ones((1, 3, 3)), ["a"])


def direct_usage(idx: np.ndarray, k: int) -> tuple[np.ndarray, int, float]:
    """counts, out_of_range and perplexity computed directly with numpy."""
    flat = idx.astype(np.int64).ravel()
    ok = flat[(flat >= 0) & (flat < k)]
    codes, cnt = np.unique(ok, return_counts=True)
    counts = np.zeros(k, dtype=np.int64)
    counts[codes] = cnt
    p = cnt / cnt.sum()
    return counts, flat.size - ok.size, float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.uint64])
def test_code_usage_matches_numpy(dtype: type) -> None:
    k = 300
    rng = np.random.default_rng(15)
    weights = 1.0 / np.arange(1, 251) ** 1.1  # Zipf-like over 250 codes: 50+ stay dead
    idx = rng.choice(250, size=(20, 8, 8), p=weights / weights.sum()).astype(np.int64)
    idx[0, 0, :3] = [300, 1000, 299]
    if np.issubdtype(dtype, np.signedinteger):
        idx[7, 3, 3] = -1
    idx = idx.astype(dtype)
    counts, oor, ppl = direct_usage(idx, k)

    parts = []
    for a, b in zip([0, 3, 4, 11], [3, 4, 11, 20], strict=False):
        u = CodeUsage(codebook_size=k)
        u.update(idx[a:b])
        parts.append(CodeUsage.from_bytes(u.to_bytes()))
    for seed in (0, 1):
        u = tree_merge(copy.deepcopy(parts), seed=seed)
        assert np.array_equal(u.counts, counts)
        assert u.out_of_range == oor and u.total == counts.sum()
        assert u.used == np.count_nonzero(counts) and u.dead == k - u.used
        assert u.usage == u.used / k
        assert u.dead_codes() == np.flatnonzero(counts == 0).tolist()
        assert u.dead_codes(5) == np.flatnonzero(counts == 0)[:5].tolist()
        np.testing.assert_allclose(u.perplexity, ppl, rtol=1e-12)
        np.testing.assert_allclose(u.to_dict()["entropy_bits"], np.log2(ppl), rtol=1e-12)

    top = u.top(5)
    order = sorted(range(k), key=lambda c: (-counts[c], c))[:5]
    assert [t["code"] for t in top] == order
    assert [t["count"] for t in top] == [int(counts[c]) for c in order]
    assert top[0]["fraction"] == counts[order[0]] / counts.sum()
    d = u.to_dict(top=3)
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert len(d["top"]) == 3 and d["counts"] == counts.tolist() and d["out_of_range"] == oor
    assert d["dead_codes_truncated"] is False and d["dead"] == len(d["dead_codes"])


def test_code_usage_edges() -> None:
    u = CodeUsage(codebook_size=4)
    d = u.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["perplexity"] is None and d["used"] == 0 and d["dead_codes"] == [0, 1, 2, 3]
    u.update(np.full((2, 3, 3), 2, dtype=np.int16))
    assert u.perplexity == 1.0 and u.top(10) == [{"code": 2, "count": 18, "fraction": 1.0}]
    u.update(np.array([[[0, 1, 3]]]))
    big = CodeUsage(codebook_size=500)
    assert big.to_dict()["dead_codes_truncated"] is True and len(big.to_dict()["dead_codes"]) == 200
    with pytest.raises(TypeError):
        u.update(np.zeros((1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        u.merge(CodeUsage(codebook_size=5))
