"""The report's figures as embedded PNGs: matplotlib on the Agg canvas, Pillow for image pairs.

Every function returns a :class:`Plot` whose ``src`` is a ``data:image/png;base64,...`` URI, so
the page embeds it and loads nothing. Plots are drawn with matplotlib ``Figure`` objects on the
Agg canvas directly, never through ``pyplot``: pyplot keeps a global registry of open figures (a
leak unless every figure is closed) and its state is shared between threads, while a bare
``Figure`` is owned by the call that made it. PNGs carry no "Software" text chunk, so the same
data gives byte-identical images across matplotlib versions.

Inputs are the report's figures as :mod:`latentize.qa.sections` reads them: a number the QA could
not compute is ``None`` (drawn as missing); a figure without any data to draw is None.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from latentize.qa.values import is_finite, number, text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "BLUE",
    "MAX_HISTOGRAMS",
    "ORANGE",
    "THUMB_MAX",
    "Plot",
    "codebook_plot",
    "histogram_plot",
    "mean_std_plot",
    "pair_image",
    "scale_plot",
]

#: Reconstruction thumbnails fit in a square of this many pixels.
THUMB_MAX = 256
#: At most this many per-channel histograms are drawn.
MAX_HISTOGRAMS = 128

_DPI = 96
_GREEN = "#1a7f37"
_RED = "#cf222e"
_GREY = "#6e7781"
BLUE = "#0969da"
ORANGE = "#bc4c00"


@dataclass(frozen=True)
class Plot:
    """One embedded image: ``src`` a PNG data URI, its alt text and its size in CSS pixels."""

    src: str
    alt: str
    width: int
    height: int


def _figure(width: float, height: float) -> Figure:
    # Imported here: `latentize` commands that never render a report skip matplotlib's import.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_plot(fig: Figure, *, alt: str) -> Plot:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas to this figure only; no global backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None}, facecolor="white")
    width, height = (int(round(v)) for v in fig.get_size_inches() * _DPI)
    return Plot(src=_png_data_uri(buf.getvalue()), alt=alt, width=width, height=height)


def _small_axes(ax: Axes, *, size: float = 8) -> None:
    ax.tick_params(labelsize=size)
    ax.grid(True, axis="y", alpha=0.3)


# --------------------------------------------------------------------------- scale check


def scale_plot(
    *,
    manifest: Mapping[str, Any],
    recommended: Mapping[str, Any],
    std: float | None,
    mean: float | None,
    tolerance: float | None,
    shift_tolerance: float | None,
) -> Plot | None:
    """The scale check at a glance: manifest vs recommended constants, and the normalised std
    and mean against their targets with the accepted band shaded.

    Args:
        manifest: the manifest's constants (``scaling_factor``, ``shift_factor``...).
        recommended: the constants the stored latents call for.
        std, mean: of the normalised latents, the figures the check judges.
        tolerance, shift_tolerance: the check's bands for the std and the mean.

    Returns:
        Up to three panels side by side, or None when none has data.
    """
    factors = ("scaling_factor", "shift_factor")
    have_factors = any(is_finite(d.get(f)) for d in (manifest, recommended) for f in factors)
    panels = [p for p, ok in (("factors", have_factors), ("std", is_finite(std)), ("mean", is_finite(mean))) if ok]
    if not panels:
        return None
    fig = _figure(4.2 * len(panels), 2.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "factors":
            _factors_panel(ax, manifest, recommended, factors)
        elif panel == "std":
            _target_panel(ax, panel, number(std), tolerance)
        else:
            _target_panel(ax, panel, number(mean), shift_tolerance)
        ax.tick_params(labelsize=8)
    return _figure_plot(fig, alt="scale check: constants and stored std/mean against their targets")


def _factors_panel(
    ax: Axes, manifest: Mapping[str, Any], recommended: Mapping[str, Any], factors: Sequence[str]
) -> None:
    x = np.arange(len(factors))
    sources = (("manifest", manifest, _GREY), ("recommended", recommended, BLUE))
    for offset, (label, source, colour) in zip((-0.2, 0.2), sources, strict=True):
        values = [number(source.get(f)) for f in factors]
        bars = ax.bar(x + offset, np.nan_to_num(values), width=0.38, label=label, color=colour)
        ax.bar_label(bars, labels=[text(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, list(factors))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title("manifest vs recommended constants", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.margins(y=0.2)


def _target_panel(ax: Axes, panel: str, value: float, tolerance: float | None) -> None:
    """One horizontal bar: the normalised std (target 1) or mean (target 0) and its band."""
    target = 1.0 if panel == "std" else 0.0
    tol = abs(float(tolerance)) if is_finite(tolerance) else None
    inside = True
    if tol is not None:
        # The std band is a ratio band (1/(1+t) .. 1+t): too wide and too narrow alike.
        lo, hi = (1.0 / (1.0 + tol), 1.0 + tol) if panel == "std" else (target - tol, target + tol)
        ax.axvspan(lo, hi, color=_GREEN, alpha=0.15, label=f"accepted {text(lo)} .. {text(hi)}")
        inside = lo <= value <= hi
    ax.barh([0], [value], height=0.5, color=_GREEN if inside else _RED)
    ax.axvline(target, color="black", linestyle="--", linewidth=1, label=f"target {text(target)}")
    ax.text(
        value,
        0.3,
        text(value),
        ha="center",
        va="bottom",
        fontsize=8,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
    )
    span = max(abs(value - target), tol or 0.0, 0.5) * 1.25
    if panel == "std":  # a std is never negative: the axis starts at 0
        ax.set_xlim(min(0.0, value), target + span)
    else:
        ax.set_xlim(target - span, target + span)
    ax.set_ylim(-0.6, 0.7)
    ax.set_yticks([])
    ax.set_title(f"normalised {panel} vs target {text(target)}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


# --------------------------------------------------------------------------- statistics


def mean_std_plot(
    means: Sequence[float | None],
    stds: Sequence[float | None],
    *,
    labels: Sequence[str],
    title: str,
    colour: str,
    targets: bool,
) -> Plot | None:
    """Per-channel mean as bars with ± std error bars.

    Args:
        means, stds: per channel (None: not computed, no finite value).
        labels: the channels' labels.
        title: the plot's title and alt text.
        colour: bar colour.
        targets: draw the ±1 lines that normalised latents should sit within.

    Returns:
        The plot, or None when no channel has a finite mean.
    """
    mean = np.array([number(m) for m in means])
    std = np.array([number(s) for s in stds])
    if not np.isfinite(mean).any():
        return None
    n = len(mean)
    fig = _figure(min(16.0, max(6.0, 0.32 * n + 2.5)), 3.2)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(mean), color=colour, alpha=0.8, label="mean")
    ax.errorbar(
        x,
        mean,
        yerr=np.where(np.isfinite(std), std, 0),
        fmt="none",
        ecolor="black",
        elinewidth=1,
        capsize=3 if n <= 48 else 0,
        label="± std",
    )
    ax.axhline(0, color="black", linewidth=0.6)
    if targets:
        # The targets of normalised latents: the band a correctly scaled channel sits in.
        for y in (-1.0, 1.0):
            ax.axhline(y, color=_GREY, linestyle=":", linewidth=1)
    if n <= 48:
        ax.set_xticks(x, list(labels))
    ax.set_xlabel("channel", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _small_axes(ax)
    return _figure_plot(fig, alt=title)


def histogram_plot(
    edges: Sequence[float], counts: Sequence[Sequence[int]], *, labels: Sequence[str], title: str
) -> Plot | None:
    """A grid of per-channel histograms with log counts (the first :data:`MAX_HISTOGRAMS`).

    Args:
        edges: (B + 1,) bin edges, shared by every channel.
        counts: (C, B) counts per channel.
        labels: channel labels, in order.
        title: the grid's title and alt text.

    Returns:
        The plot, or None without at least two edges and one channel.
    """
    if len(edges) < 2 or not counts:
        return None
    n = min(len(counts), MAX_HISTOGRAMS)
    ncols = min(8, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(1.95 * ncols + 0.3, 1.45 * nrows + 0.45)
    fig.suptitle(title, fontsize=9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    grid = np.asarray(edges, dtype=float)
    widths = np.diff(grid)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        values = np.asarray(counts[i], dtype=float)
        ax.set_title(f"ch {labels[i]}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6)
        if not (values > 0).any():  # a channel without a finite value
            ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            continue
        ax.bar(grid[:-1], values, width=widths, align="edge", color=BLUE, linewidth=0)
        # Log counts: the tails (outliers, saturation) are what a QA reader looks for.
        ax.set_yscale("log")
        ax.set_xlim(grid[0], grid[-1])
    return _figure_plot(fig, alt=title)


# --------------------------------------------------------------------------- codebook


def length_plot(lengths: Sequence[int], counts: Sequence[int], *, title: str) -> Plot | None:
    """Rows per token length of the caption embeddings, as bars (linear counts: the shape of
    the distribution, a pile-up at the family's maximum length, is what matters).

    Args:
        lengths: (L,) token lengths, ascending.
        counts: (L,) rows of each length.
        title: the plot's title and alt text.

    Returns:
        The plot, or None without a row.
    """
    values = np.asarray(counts, dtype=float)
    if values.size == 0 or not (values > 0).any():
        return None
    fig = _figure(7.0, 2.6)
    ax = fig.subplots()
    ax.bar(np.asarray(lengths, dtype=float), values, width=1.0, color=BLUE, linewidth=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("tokens", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    _small_axes(ax)
    return _figure_plot(fig, alt=title)


def codebook_plot(counts: Sequence[int], *, total: int) -> Plot | None:
    """Codebook usage: code frequencies sorted (log), and the histogram of counts per code.

    Args:
        counts: (K,) uses of each code.
        total: indices counted; draws the count every code would have under uniform use.

    Returns:
        The plot, or None without codes.
    """
    values = np.asarray(counts, dtype=float)
    if values.size == 0:
        return None
    fig = _figure(11.0, 3.4)
    left, right = fig.subplots(1, 2)
    ranked = np.sort(values)[::-1]
    positive = ranked[ranked > 0]
    dead = int((ranked <= 0).sum())
    if positive.size:
        left.plot(np.arange(1, positive.size + 1), positive, color=BLUE, drawstyle="steps-post")
        left.set_yscale("log")
    left.set_xlim(0, max(len(ranked), 1))
    left.axvline(positive.size, color=_RED, linestyle=":", linewidth=1)
    left.set_title(f"code frequency, sorted (codes after rank {positive.size:,}: {dead:,} dead)", fontsize=9)
    left.set_xlabel("rank", fontsize=8)
    left.set_ylabel("count", fontsize=8)
    _small_axes(left)
    right.hist(values, bins=min(60, max(10, int(np.sqrt(values.size)))), color=ORANGE, log=True)
    uniform = float(total) / values.size
    right.axvline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform {uniform:.3g}")
    right.legend(fontsize=7)
    right.set_title("histogram of counts per code", fontsize=9)
    right.set_xlabel("count of a code", fontsize=8)
    right.set_ylabel("codes", fontsize=8)
    _small_axes(right)
    return _figure_plot(fig, alt="codebook usage: sorted code frequencies and histogram of counts per code")


# --------------------------------------------------------------------------- images


def _as_rgb_uint8(array: Any) -> np.ndarray:
    """(H, W, 3) uint8 from what a caller may pass: gray, RGBA, float in [0, 1] or [0, 255]."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64))
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def pair_image(original: Any, decoded: Any, *, alt: str) -> Plot:
    """Original and decode side by side, each fitted into ``THUMB_MAX``² pixels, 4 px apart.

    Args:
        original: (H, W, 3) image: uint8 0..255, or float in 0..1 or 0..255; gray (H, W) and
            RGBA are accepted too.
        decoded: the same for the decode (it may differ in size).
        alt: the image's alt text.

    Raises:
        ValueError: an array is not an image.
    """
    thumbs = []
    for array in (original, decoded):
        im = Image.fromarray(_as_rgb_uint8(array), mode="RGB")
        im.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
        thumbs.append(im)
    gap = 4
    width = thumbs[0].width + gap + thumbs[1].width
    height = max(t.height for t in thumbs)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(thumbs[0], (0, 0))
    canvas.paste(thumbs[1], (thumbs[0].width + gap, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return Plot(src=_png_data_uri(buf.getvalue()), alt=alt, width=width, height=height)
