"""Exact, mergeable statistics for the latent dataset QA report.

Both accumulators are built for Ray Data aggregations: every worker folds its blocks in with
``update``, partial accumulators are combined with ``merge`` in any order or tree shape, and
they travel between processes as ``bytes`` (``to_bytes`` / ``from_bytes``: an ``.npz`` archive
holding plain arrays plus a JSON header, never pickle, so a byte string from an untrusted or
newer worker cannot execute code). Every result except the float rounding of mean and standard
deviation is independent of how the data was split into blocks and of the merge order.

* :class:`LatentStats`: per-channel count, mean, variance, min, max, non-finite counts and a
  DDSketch-style quantile sketch of float latents.
* :func:`affine_summary`: maps a :meth:`LatentStats.to_dict` summary of stored (scaled) latents
  to the raw latent space.
* :class:`CodeUsage`: codebook usage, perplexity and dead codes of VQ indices.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CodeUsage", "LatentStats", "affine_summary"]

logger = logging.getLogger(__name__)

#: Version of the serialised layout; bumped whenever the arrays or header change meaning.
_FORMAT_VERSION = 1


def _pack(kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive of ``arrays`` plus ``meta`` as UTF-8 JSON in a uint8 array."""
    header = {"format": kind, "version": _FORMAT_VERSION, **meta}
    buf = io.BytesIO()
    # Compressed because the sketch arrays are mostly zeros: a 4-channel sketch shrinks from
    # ~90 kB to a few kB, which matters when one travels per block through the object store.
    np.savez_compressed(
        buf,
        __meta__=np.frombuffer(json.dumps(header, allow_nan=False).encode("utf-8"), dtype=np.uint8),
        # numpy's stub: the unpacked names could bind its keyword-only `allow_pickle: bool`;
        # they are the sketch's array names.
        **arrays,  # type: ignore[arg-type]
    )
    return buf.getvalue()


def _unpack(kind: str, data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`_pack`; raises ``ValueError`` for another kind or version."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile/numpy raise a variety of types for corrupt input
        raise ValueError(f"not a serialised {kind}: {exc}") from exc
    if "__meta__" not in arrays:
        raise ValueError(f"not a serialised {kind}: no header")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    if meta.get("format") != kind:
        raise ValueError(f"not a serialised {kind}: format {meta.get('format')!r}")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{kind}: unsupported format version {meta.get('version')!r} (expected {_FORMAT_VERSION})")
    return meta, arrays


def _json_float(value: float) -> float | None:
    """A plain Python float, or ``None`` for NaN/±Inf (JSON has no such numbers)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _pooled(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[int, float, float]:
    """Pools per-group (count, mean, M2) into (count, mean, M2) of the union.

    Uses the exact decomposition M2 = sum M2_g + sum n_g (mean_g - mean)^2 rather than averaging
    the group figures, so the result equals the moments of the concatenated data.
    """
    count = np.asarray(count, dtype=np.int64)
    used = count > 0
    n = int(count.sum())
    if n == 0:
        return 0, math.nan, math.nan
    c = count[used].astype(np.float64)
    mu = float(np.sum(c * mean[used]) / n)
    total_m2 = float(np.sum(m2[used]) + np.sum(c * (mean[used] - mu) ** 2))
    return n, mu, total_m2


class LatentStats:
    """Per-channel statistics of float latents, mergeable across workers.

    Accumulates, per channel ``c`` of data shaped ``(N, C, *spatial)``:

    * exact ``count`` of finite values, ``min`` and ``max`` (int64 / float64, shape ``(C,)``);
    * ``mean`` and population ``var`` / ``std`` from float64 (count, mean, M2) triples merged
      with Chan et al.'s parallel formula (exact up to float rounding);
    * ``nonfinite``: NaN/±Inf values per channel, excluded from everything else;
    * a DDSketch-style log-bucket sketch (Masson et al., VLDB 2019) for :meth:`quantiles` and
      :meth:`histogram`, answering within ``relative_accuracy`` of the true order statistic for
      magnitudes in ``[MIN_VALUE, MAX_VALUE]``;
    * ``rows`` / ``nonfinite_rows`` and up to ``key_limit`` keys of rows with non-finite values.

    The sketch is hand-written rather than taken from the ``ddsketch`` package because that
    package adds values one at a time in Python, far too slow for the billions of values of a
    latent dataset; here a whole batch is bucketed with one vectorised log and one bincount,
    and the dense fixed-size layout makes merging a plain array addition.

    The sketch is a dense int64 array of shape ``(C, L)`` whose buckets are ordered by value:
    ``L // 2`` negative buckets from the most negative up, one zero bucket (``|x| < MIN_VALUE``),
    then ``L // 2`` positive buckets. With the default accuracy 0.01, ``L`` is 2765.
    """

    #: Magnitudes below this share the zero bucket (their quantiles are off by < MIN_VALUE).
    MIN_VALUE: float = 1e-6
    #: Magnitudes above this share the outermost bucket (their quantiles are only clamped to min/max).
    MAX_VALUE: float = 1e6

    _KIND = "latentize.LatentStats"

    def __init__(self, *, channels: int, relative_accuracy: float = 0.01, key_limit: int = 100) -> None:
        """
        Args:
            channels: C, the size of axis 1 of every ``update`` array (>= 1).
            relative_accuracy: ``a`` in (0, 1): quantile answers are within a factor ``1 ± a``
                of the true value. The sketch holds ``~2 ln(1e12) / ln((1+a)/(1-a))`` buckets
                per channel, so very small values cost memory.
            key_limit: how many keys of rows with non-finite values to keep (>= 0).
        """
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 < float(relative_accuracy) < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy}")
        if int(key_limit) < 0:
            raise ValueError(f"key_limit must be >= 0, got {key_limit}")
        self.channels = int(channels)
        self.relative_accuracy = float(relative_accuracy)
        self.key_limit = int(key_limit)

        self._gamma = (1.0 + self.relative_accuracy) / (1.0 - self.relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        # Bucket i holds magnitudes in (gamma^(i-1), gamma^i]; the window's first and last index.
        self._imin = math.ceil(math.log(self.MIN_VALUE) / self._log_gamma)
        self._imax = math.ceil(math.log(self.MAX_VALUE) / self._log_gamma)
        self._half = self._imax - self._imin + 1  # buckets per sign
        width = 2 * self._half + 1

        c = self.channels
        self._count = np.zeros(c, dtype=np.int64)
        self._mean = np.zeros(c, dtype=np.float64)
        self._m2 = np.zeros(c, dtype=np.float64)
        # +inf / -inf are the identities of min / max, so empty accumulators merge without cases.
        self._min = np.full(c, np.inf, dtype=np.float64)
        self._max = np.full(c, -np.inf, dtype=np.float64)
        self._nonfinite = np.zeros(c, dtype=np.int64)
        self._sketch = np.zeros((c, width), dtype=np.int64)
        self._rows = 0
        self._nonfinite_rows = 0
        self._keys: list[str] = []
        self._keys_truncated = False
        self._reps: np.ndarray | None = None

    # ------------------------------------------------------------------ accumulation

    def update(self, values: npt.ArrayLike, keys: Sequence[str]) -> None:
        """Folds in one batch.

        Args:
            values: ``(N, C, *spatial)`` real array (float16/32/64; integers are accepted), one
                row per sample; any value range, NaN/±Inf allowed. Converted to float64.
            keys: the N sample keys, in row order (used only for rows with non-finite values).
        """
        x = np.asarray(values)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"values must be shaped (N, {self.channels}, ...), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"values must be a real float or integer array, got {x.dtype}")
        n = x.shape[0]
        if len(keys) != n:
            raise ValueError(f"got {len(keys)} keys for {n} rows")
        if n == 0:
            return
        spatial = int(np.prod(x.shape[2:], dtype=np.int64))
        x = x.astype(np.float64, copy=False).reshape(n, self.channels, spatial)
        self._rows += n

        finite = np.isfinite(x)
        all_finite = bool(finite.all())
        if all_finite:
            count = np.full(self.channels, n * spatial, dtype=np.int64)
            xs = x
        else:
            bad = ~finite
            self._nonfinite += bad.sum(axis=(0, 2), dtype=np.int64)
            bad_rows = np.flatnonzero(bad.any(axis=(1, 2)))
            self._nonfinite_rows += int(bad_rows.size)
            self._add_keys([str(keys[i]) for i in bad_rows.tolist()])
            count = finite.sum(axis=(0, 2), dtype=np.int64)
            xs = np.where(finite, x, 0.0)

        # Two-pass moments within the batch (mean, then squared deviations) avoid the
        # cancellation of sum-of-squares formulas; batches then merge with Chan's formula.
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = xs.sum(axis=(0, 2)) / count
        dev = x - mean[None, :, None]
        if not all_finite:
            dev = np.where(finite, dev, 0.0)
        m2 = np.einsum("ncs,ncs->c", dev, dev)
        self._merge_moments(count, np.where(count > 0, mean, 0.0), m2)

        if all_finite:
            self._min = np.minimum(self._min, x.min(axis=(0, 2)))
            self._max = np.maximum(self._max, x.max(axis=(0, 2)))
        else:
            self._min = np.minimum(self._min, np.where(finite, x, np.inf).min(axis=(0, 2)))
            self._max = np.maximum(self._max, np.where(finite, x, -np.inf).max(axis=(0, 2)))

        pos = self._bucket_positions(x if all_finite else xs)
        pos += (np.arange(self.channels, dtype=np.int64) * self._sketch.shape[1])[None, :, None]
        flat = pos.ravel() if all_finite else pos[finite]
        self._sketch += np.bincount(flat, minlength=self._sketch.size).reshape(self._sketch.shape)
        if logger.isEnabledFor(logging.DEBUG):
            outside = int(np.count_nonzero(np.abs(xs) > self.MAX_VALUE))
            if outside:
                logger.debug("%d values beyond the sketch window (|x| > %g)", outside, self.MAX_VALUE)

    def _bucket_positions(self, x: np.ndarray) -> np.ndarray:
        """Sketch column (int64, same shape as ``x``) of every value of the float64 array ``x``.

        Non-finite values must have been replaced beforehand; they would land anywhere.
        """
        mag = np.abs(x)
        with np.errstate(divide="ignore"):
            idx = np.ceil(np.log(mag) / self._log_gamma)
        # Clamping keeps the state fixed-size: below the window only the zero bucket is used
        # (masked next), above it values share the outermost bucket.
        np.clip(idx, self._imin, self._imax, out=idx)
        off = idx.astype(np.int64) - self._imin
        zero = self._half
        pos = np.where(x > 0, zero + 1 + off, zero - 1 - off)
        pos[mag < self.MIN_VALUE] = zero
        return pos

    def _add_keys(self, new: Sequence[str]) -> None:
        """Keeps the ``key_limit`` lexicographically smallest distinct keys.

        Keeping the smallest (not the first seen) makes the kept set, and the truncation flag,
        independent of block split and merge order: the flag ends up set exactly when more
        than ``key_limit`` distinct keys exist overall.
        """
        if not new:
            return
        merged = sorted(set(self._keys).union(new))
        if len(merged) > self.key_limit:
            self._keys_truncated = True
            merged = merged[: self.key_limit]
        self._keys = merged

    def _merge_moments(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s parallel update of (count, mean, M2) per channel."""
        na = self._count.astype(np.float64)
        nb = count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean - self._mean
            new_mean = self._mean + delta * (nb / n)
            new_m2 = self._m2 + m2 + delta * delta * (na * nb / n)
        empty = n == 0
        self._mean = np.where(empty, 0.0, new_mean)
        self._m2 = np.where(empty, 0.0, new_m2)
        self._count = self._count + count

    def merge(self, other: LatentStats) -> LatentStats:
        """Adds ``other`` into this accumulator (in place) and returns ``self``.

        Both must have the same channels and relative accuracy; the smaller ``key_limit`` wins.
        """
        if not isinstance(other, LatentStats):
            raise TypeError(f"cannot merge {type(other).__name__} into LatentStats")
        if other.channels != self.channels:
            raise ValueError(f"channel mismatch: {self.channels} vs {other.channels}")
        if other.relative_accuracy != self.relative_accuracy or other._sketch.shape != self._sketch.shape:
            raise ValueError(f"relative_accuracy mismatch: {self.relative_accuracy} vs {other.relative_accuracy}")
        self._merge_moments(other._count, other._mean, other._m2)
        self._min = np.minimum(self._min, other._min)
        self._max = np.maximum(self._max, other._max)
        self._nonfinite = self._nonfinite + other._nonfinite
        self._sketch = self._sketch + other._sketch
        self._rows += other._rows
        self._nonfinite_rows += other._nonfinite_rows
        if other.key_limit < self.key_limit:
            self.key_limit = other.key_limit
            if len(self._keys) > self.key_limit:
                self._keys = self._keys[: self.key_limit]
                self._keys_truncated = True
        self._keys_truncated = self._keys_truncated or other._keys_truncated
        self._add_keys(other._keys)
        return self

    # ------------------------------------------------------------------ serialisation

    def to_bytes(self) -> bytes:
        """The full state as an ``.npz`` byte string (no pickle); see :meth:`from_bytes`."""
        meta = {
            "channels": self.channels,
            "relative_accuracy": self.relative_accuracy,
            "key_limit": self.key_limit,
            "min_value": self.MIN_VALUE,
            "max_value": self.MAX_VALUE,
            "rows": self._rows,
            "nonfinite_rows": self._nonfinite_rows,
            "keys": self._keys,
            "keys_truncated": self._keys_truncated,
        }
        arrays = {
            "count": self._count,
            "mean": self._mean,
            "m2": self._m2,
            "min": self._min,
            "max": self._max,
            "nonfinite": self._nonfinite,
            "sketch": self._sketch,
        }
        return _pack(self._KIND, meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentStats:
        """Rebuilds an accumulator from :meth:`to_bytes` output.

        Raises:
            ValueError: ``data`` is not a serialised ``LatentStats`` of this format version, or
                was written with another sketch window.
        """
        meta, arrays = _unpack(cls._KIND, data)
        if meta.get("min_value") != cls.MIN_VALUE or meta.get("max_value") != cls.MAX_VALUE:
            raise ValueError("LatentStats: serialised with another sketch window")
        out = cls(
            channels=int(meta["channels"]),
            relative_accuracy=float(meta["relative_accuracy"]),
            key_limit=int(meta["key_limit"]),
        )
        c = out.channels
        expected = {
            "count": ((c,), np.int64),
            "mean": ((c,), np.float64),
            "m2": ((c,), np.float64),
            "min": ((c,), np.float64),
            "max": ((c,), np.float64),
            "nonfinite": ((c,), np.int64),
            "sketch": (out._sketch.shape, np.int64),
        }
        for name, (shape, dtype) in expected.items():
            arr = arrays.get(name)
            if arr is None or arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"LatentStats: array {name!r} missing or malformed")
            setattr(out, f"_{name}", arr.copy())
        out._rows = int(meta["rows"])
        out._nonfinite_rows = int(meta["nonfinite_rows"])
        out._keys = [str(k) for k in meta["keys"]]
        out._keys_truncated = bool(meta["keys_truncated"])
        return out

    # ------------------------------------------------------------------ results

    @property
    def count(self) -> np.ndarray:
        """(C,) int64: finite values seen per channel."""
        return self._count.copy()

    @property
    def mean(self) -> np.ndarray:
        """(C,) float64: mean of the finite values; NaN where ``count == 0``."""
        return np.where(self._count > 0, self._mean, np.nan)

    @property
    def var(self) -> np.ndarray:
        """(C,) float64: population variance (ddof=0) of the finite values; NaN where empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._m2 / self._count, np.nan)

    @property
    def std(self) -> np.ndarray:
        """(C,) float64: population standard deviation (ddof=0); NaN where empty."""
        return np.sqrt(self.var)

    @property
    def min(self) -> np.ndarray:
        """(C,) float64: exact minimum of the finite values; NaN where empty."""
        return np.where(self._count > 0, self._min, np.nan)

    @property
    def max(self) -> np.ndarray:
        """(C,) float64: exact maximum of the finite values; NaN where empty."""
        return np.where(self._count > 0, self._max, np.nan)

    @property
    def nonfinite(self) -> np.ndarray:
        """(C,) int64: NaN and ±Inf values seen per channel."""
        return self._nonfinite.copy()

    @property
    def rows(self) -> int:
        """Rows (samples) seen."""
        return self._rows

    @property
    def nonfinite_rows(self) -> int:
        """Rows with at least one non-finite value in any channel."""
        return self._nonfinite_rows

    @property
    def nonfinite_keys(self) -> list[str]:
        """Sorted keys of rows with non-finite values: the ``key_limit`` smallest when truncated."""
        return list(self._keys)

    @property
    def nonfinite_keys_truncated(self) -> bool:
        """True when more than ``key_limit`` distinct keys had non-finite values."""
        return self._keys_truncated

    def overall(self) -> dict[str, float | int]:
        """The figures pooled over all channels: ``count`` (int), ``mean``, ``std``, ``min``,
        ``max`` (floats, NaN when nothing finite was seen); moments are merged exactly."""
        n, mu, m2 = _pooled(self._count, self._mean, self._m2)
        if n == 0:
            return {"count": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
        return {
            "count": n,
            "mean": mu,
            "std": math.sqrt(m2 / n),
            "min": float(self._min.min()),
            "max": float(self._max.max()),
        }

    def _representatives(self) -> np.ndarray:
        """(L,) float64 value of each sketch column, ascending.

        ``2 gamma^i / (gamma + 1)`` is within relative distance ``a`` of every magnitude in
        ``(gamma^(i-1), gamma^i]``, which is where the DDSketch guarantee comes from.
        """
        if self._reps is None:
            idx = np.arange(self._imin, self._imax + 1, dtype=np.float64)
            mags = 2.0 * np.exp(idx * self._log_gamma) / (self._gamma + 1.0)
            self._reps = np.concatenate([-mags[::-1], [0.0], mags])
        return self._reps

    @staticmethod
    def _check_qs(qs: Sequence[float]) -> np.ndarray:
        q = np.asarray(qs, dtype=np.float64).reshape(-1)
        if not np.all((q >= 0.0) & (q <= 1.0)):
            raise ValueError(f"quantiles must be in [0, 1], got {qs}")
        return q

    def _sketch_quantiles(self, sketch: np.ndarray, q: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """Quantiles of one (L,) sketch, clamped to the exact [lo, hi] range."""
        cum = np.cumsum(sketch)
        n = int(cum[-1]) if cum.size else 0
        if n == 0:
            return np.full(q.shape, np.nan)
        # DDSketch's definition: the value of 0-based rank floor(q (n - 1)), i.e. numpy's
        # method="lower"; the first column whose cumulative count exceeds the rank holds it.
        rank = np.floor(q * (n - 1)).astype(np.int64)
        col = np.searchsorted(cum, rank, side="right")
        # Clamping to the exact range can only move an answer towards the true value, and it
        # rescues the extremes when they lie beyond the sketch window.
        return np.clip(self._representatives()[col], lo, hi)

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """Approximate per-channel quantiles.

        Args:
            qs: quantile levels in [0, 1].

        Returns:
            ``(C, len(qs))`` float64. Entry ``[c, j]`` is within relative accuracy ``a`` of the
            order statistic of 0-based rank ``floor(qs[j] * (count[c] - 1))`` of channel c (what
            ``np.quantile(..., method="lower")`` returns) when its magnitude lies in
            ``[MIN_VALUE, MAX_VALUE]``; within ``MIN_VALUE`` absolute below that. NaN for empty
            channels.
        """
        q = self._check_qs(qs)
        out = np.full((self.channels, q.size), np.nan)
        for c in range(self.channels):  # C is small; each channel is one cumsum + searchsorted
            out[c] = self._sketch_quantiles(self._sketch[c], q, self._min[c], self._max[c])
        return out

    def overall_quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """``(len(qs),)`` float64 quantiles of all channels pooled; same guarantee as :meth:`quantiles`."""
        q = self._check_qs(qs)
        return self._sketch_quantiles(self._sketch.sum(axis=0), q, float(self._min.min()), float(self._max.max()))

    def histogram(
        self, *, bins: int = 60, lo: float | None = None, hi: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel histogram on a common linear grid, built from the sketch.

        Each sketch column's count goes to the linear bin of its representative value, so bin
        boundaries are exact only to the sketch's relative accuracy. Columns whose
        representative falls outside ``[lo, hi]`` are left out, as ``np.histogram`` does.

        Args:
            bins: number of linear bins (>= 1).
            lo, hi: grid range; by default the 0.1th and 99.9th percentiles over all channels,
                widened by 5 % of their span on each side (a constant gets +-max(5 %, 0.5)).

        Returns:
            ``counts`` ``(C, bins)`` int64 and ``edges`` ``(bins + 1,)`` float64 ascending.
        """
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        bins = int(bins)
        if lo is None or hi is None:
            if int(self._count.sum()) == 0:
                dlo, dhi = 0.0, 1.0
            else:
                dlo, dhi = (float(v) for v in self.overall_quantiles([0.001, 0.999]))
                span = dhi - dlo
                pad = 0.05 * span if span > 0 else max(0.05 * abs(dlo), 0.5)
                dlo, dhi = dlo - pad, dhi + pad
            lo = dlo if lo is None else float(lo)
            hi = dhi if hi is None else float(hi)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"histogram range must be finite with hi > lo, got [{lo}, {hi}]")
        edges = np.linspace(lo, hi, bins + 1)
        reps = self._representatives()
        inside = (reps >= lo) & (reps <= hi)
        idx = np.minimum(((reps[inside] - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
        counts = np.zeros((self.channels, bins), dtype=np.int64)
        # Indexing the transposed view adds whole (C,) columns per sketch column, in int64.
        np.add.at(counts.T, idx, self._sketch[:, inside].T)
        return counts, edges

    def to_dict(self, *, percentiles: Sequence[float] = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)) -> dict[str, Any]:
        """JSON-ready summary (plain ints/floats, ``None`` for NaN).

        Args:
            percentiles: levels in percent, [0, 100]; keyed by ``f"{p:g}"`` in the output.

        Returns:
            ``{"channels": [{"channel", "count", "mean", "std", "min", "max", "nonfinite",
            "percentiles": {...}}, ...], "all": {"count", "mean", "std", "min", "max",
            "percentiles"}, "rows", "nonfinite_rows", "nonfinite_keys",
            "nonfinite_keys_truncated"}``.
        """
        ps = [float(p) for p in percentiles]
        if any(not 0.0 <= p <= 100.0 for p in ps):
            raise ValueError(f"percentiles must be in [0, 100], got {list(percentiles)}")
        names = [f"{p:g}" for p in ps]
        qs = [p / 100.0 for p in ps]
        per = self.quantiles(qs)
        mean, std, lo, hi = self.mean, self.std, self.min, self.max
        channels = [
            {
                "channel": c,
                "count": int(self._count[c]),
                "mean": _json_float(mean[c]),
                "std": _json_float(std[c]),
                "min": _json_float(lo[c]),
                "max": _json_float(hi[c]),
                "nonfinite": int(self._nonfinite[c]),
                "percentiles": {name: _json_float(v) for name, v in zip(names, per[c], strict=False)},
            }
            for c in range(self.channels)
        ]
        ov = self.overall()
        pooled = self.overall_quantiles(qs)
        overall = {
            "count": int(ov["count"]),
            **{k: _json_float(ov[k]) for k in ("mean", "std", "min", "max")},
            "percentiles": {name: _json_float(v) for name, v in zip(names, pooled, strict=False)},
        }
        return {
            "channels": channels,
            "all": overall,
            "rows": self._rows,
            "nonfinite_rows": self._nonfinite_rows,
            "nonfinite_keys": list(self._keys),
            "nonfinite_keys_truncated": self._keys_truncated,
        }

    def __repr__(self) -> str:
        return (
            f"LatentStats(channels={self.channels}, rows={self._rows}, "
            f"count={int(self._count.sum())}, nonfinite_rows={self._nonfinite_rows})"
        )


def affine_summary(summary: Mapping[str, Any], scale: npt.ArrayLike, offset: npt.ArrayLike) -> dict[str, Any]:
    """Maps a :meth:`LatentStats.to_dict` summary of stored latents to the raw values.

    With ``raw = stored * scale[c] + offset[c]`` per channel (``scale > 0``, so order is kept):
    means, minima, maxima and percentiles map affinely, standard deviations scale. The pooled
    ``all`` entry is recomputed exactly from the per-channel counts, means and stds; its min/max
    are the extremes over channels and its percentiles ``None`` (pooled quantiles of differently
    scaled channels cannot be derived from per-channel figures). Counts, rows and keys are
    copied. The input is not modified.

    Args:
        summary: a ``LatentStats.to_dict()`` result with C channels.
        scale: ``(C,)`` positive floats.
        offset: ``(C,)`` floats.

    Returns:
        A new dict with the same structure, JSON-ready.
    """
    out = copy.deepcopy(dict(summary))
    chans = out["channels"]
    c = len(chans)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    o = np.asarray(offset, dtype=np.float64).reshape(-1)
    if s.shape != (c,) or o.shape != (c,):
        raise ValueError(f"scale and offset must be shaped ({c},), got {s.shape} and {o.shape}")
    if not np.all(np.isfinite(s) & (s > 0)) or not np.all(np.isfinite(o)):
        raise ValueError("scale must be finite and > 0, offset finite")

    def lin(v: float | None, i: int) -> float | None:
        return None if v is None else _json_float(float(v) * s[i] + o[i])

    for i, ch in enumerate(chans):
        ch["mean"] = lin(ch["mean"], i)
        ch["std"] = None if ch["std"] is None else _json_float(float(ch["std"]) * s[i])
        ch["min"] = lin(ch["min"], i)
        ch["max"] = lin(ch["max"], i)
        ch["percentiles"] = {k: lin(v, i) for k, v in ch["percentiles"].items()}

    valid = [ch for ch in chans if ch["count"] > 0 and ch["mean"] is not None and ch["std"] is not None]
    counts = np.array([ch["count"] for ch in valid], dtype=np.int64)
    means = np.array([ch["mean"] for ch in valid], dtype=np.float64)
    m2 = counts * np.array([ch["std"] for ch in valid], dtype=np.float64) ** 2
    n, mu, total_m2 = _pooled(counts, means, m2)
    mins = [ch["min"] for ch in chans if ch["min"] is not None]
    maxs = [ch["max"] for ch in chans if ch["max"] is not None]
    out["all"] = {
        "count": int(sum(int(ch["count"]) for ch in chans)),
        "mean": _json_float(mu) if n else None,
        "std": _json_float(math.sqrt(total_m2 / n)) if n else None,
        "min": min(mins) if mins else None,
        "max": max(maxs) if maxs else None,
        "percentiles": {k: None for k in summary.get("all", {}).get("percentiles", {})},
    }
    return out


class CodeUsage:
    """Codebook usage of VQ indices, mergeable across workers.

    State: ``counts`` ``(K,)`` int64 occurrences of each code in ``[0, K)`` and
    ``out_of_range``, the number of indices outside it (a sign of a wrong codebook size or
    corrupt data), which are kept out of ``counts`` and of every derived figure.
    """

    _KIND = "latentize.CodeUsage"

    def __init__(self, *, codebook_size: int) -> None:
        """
        Args:
            codebook_size: K, the number of codebook entries (>= 1).
        """
        if int(codebook_size) < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self._counts = np.zeros(self.codebook_size, dtype=np.int64)
        self._out_of_range = 0

    def update(self, indices: npt.ArrayLike) -> None:
        """Counts a batch of indices: any-shaped integer array, typically ``(N, h, w)``."""
        idx = np.asarray(indices)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be an integer array, got {idx.dtype}")
        flat = idx.reshape(-1)
        if flat.size == 0:
            return
        k = self.codebook_size
        if not (int(flat.min()) >= 0 and int(flat.max()) < k):
            keep = (flat >= 0) & (flat < k)
            self._out_of_range += int(flat.size - np.count_nonzero(keep))
            flat = flat[keep]
        # After the range check every value fits intp, whatever the input dtype (uint64 would
        # otherwise be refused by bincount's safe cast).
        self._counts += np.bincount(flat.astype(np.intp, copy=False), minlength=k).astype(np.int64, copy=False)

    def merge(self, other: CodeUsage) -> CodeUsage:
        """Adds ``other`` into this accumulator (in place) and returns ``self``."""
        if not isinstance(other, CodeUsage):
            raise TypeError(f"cannot merge {type(other).__name__} into CodeUsage")
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"codebook_size mismatch: {self.codebook_size} vs {other.codebook_size}")
        self._counts = self._counts + other._counts
        self._out_of_range += other._out_of_range
        return self

    def to_bytes(self) -> bytes:
        """The full state as an ``.npz`` byte string (no pickle); see :meth:`from_bytes`."""
        meta = {"codebook_size": self.codebook_size, "out_of_range": self._out_of_range}
        return _pack(self._KIND, meta, {"counts": self._counts})

    @classmethod
    def from_bytes(cls, data: bytes) -> CodeUsage:
        """Rebuilds an accumulator from :meth:`to_bytes` output.

        Raises:
            ValueError: ``data`` is not a serialised ``CodeUsage`` of this format version.
        """
        meta, arrays = _unpack(cls._KIND, data)
        out = cls(codebook_size=int(meta["codebook_size"]))
        counts = arrays.get("counts")
        if counts is None or counts.shape != (out.codebook_size,) or counts.dtype != np.int64:
            raise ValueError("CodeUsage: array 'counts' missing or malformed")
        out._counts = counts.copy()
        out._out_of_range = int(meta["out_of_range"])
        return out

    @property
    def counts(self) -> np.ndarray:
        """(K,) int64 occurrences per code."""
        return self._counts.copy()

    @property
    def total(self) -> int:
        """In-range indices counted (``counts.sum()``; excludes ``out_of_range``)."""
        return int(self._counts.sum())

    @property
    def out_of_range(self) -> int:
        """Indices < 0 or >= K seen."""
        return self._out_of_range

    def _probabilities(self) -> np.ndarray:
        """Empirical probabilities of the used codes (float64, sums to 1; empty if no data)."""
        used = self._counts[self._counts > 0].astype(np.float64)
        return used / used.sum() if used.size else used

    @property
    def perplexity(self) -> float:
        """``exp(-sum p ln p)`` over used codes, in [1, K]: diffusers' VectorQuantizer figure,
        i.e. the effective number of equally used codes. NaN when nothing was counted."""
        p = self._probabilities()
        return math.exp(-float(np.sum(p * np.log(p)))) if p.size else math.nan

    @property
    def entropy_bits(self) -> float:
        """Shannon entropy ``-sum p log2 p`` of code usage in bits; NaN when nothing was counted."""
        p = self._probabilities()
        return -float(np.sum(p * np.log2(p))) + 0.0 if p.size else math.nan

    @property
    def used(self) -> int:
        """Codes seen at least once."""
        return int(np.count_nonzero(self._counts))

    @property
    def usage(self) -> float:
        """Fraction of the codebook used, ``used / K`` in [0, 1]."""
        return self.used / self.codebook_size

    @property
    def dead(self) -> int:
        """Codes never seen, ``K - used``."""
        return self.codebook_size - self.used

    def dead_codes(self, limit: int | None = None) -> list[int]:
        """Ascending codes never seen, at most ``limit`` of them (all when ``None``)."""
        dead = np.flatnonzero(self._counts == 0)
        return [int(c) for c in (dead if limit is None else dead[: max(int(limit), 0)])]

    def top(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most frequent used codes, ties by ascending code.

        Returns:
            ``[{"code": int, "count": int, "fraction": float}, ...]`` with ``fraction`` =
            ``count / total``; never lists unused codes.
        """
        codes = np.flatnonzero(self._counts)
        order = np.lexsort((codes, -self._counts[codes]))[: max(int(n), 0)]
        total = self.total
        return [
            {
                "code": int(codes[i]),
                "count": int(self._counts[codes[i]]),
                "fraction": int(self._counts[codes[i]]) / total,
            }
            for i in order
        ]

    #: How many dead codes :meth:`to_dict` lists.
    DEAD_CODES_LISTED = 200

    def to_dict(self, *, top: int = 20) -> dict[str, Any]:
        """JSON-ready summary (plain ints/floats, ``None`` for NaN).

        Returns:
            ``{"codebook_size", "total", "out_of_range", "used", "usage", "dead", "dead_codes"
            (the first 200, ascending), "dead_codes_truncated", "perplexity", "entropy_bits",
            "top": [{"code", "count", "fraction"}, ...], "counts": [int] * K}``.
        """
        dead = self.dead
        return {
            "codebook_size": self.codebook_size,
            "total": self.total,
            "out_of_range": self._out_of_range,
            "used": self.used,
            "usage": self.usage,
            "dead": dead,
            "dead_codes": self.dead_codes(self.DEAD_CODES_LISTED),
            "dead_codes_truncated": dead > self.DEAD_CODES_LISTED,
            "perplexity": _json_float(self.perplexity),
            "entropy_bits": _json_float(self.entropy_bits),
            "top": self.top(top),
            "counts": [int(v) for v in self._counts],
        }

    def __repr__(self) -> str:
        return f"CodeUsage(codebook_size={self.codebook_size}, total={self.total}, used={self.used})"
